"""The Helm chart lints and renders with Helm's own engine, for the default and each region's values.

Helm itself runs here: the `helm` binary when it is on PATH, else Helm's Go
SDK as shipped in the `helm-python-sdk` wheel (no binary download needed).
Without either, only the checks that need no template engine run: Chart.yaml
and every values file are valid YAML and match values.schema.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

CHART = Path(__file__).resolve().parent.parent / "charts" / "continuum"
VALUE_FILES = ["values.yaml", "values-eu.yaml", "values-us.yaml"]
RELAY_KEY = "csk_" + "a" * 56


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def merged_values(name: str) -> dict[str, Any]:
    """Defaults overlaid with a region file, as `helm -f` merges maps."""
    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(
                out.get(key), dict) else value
        return out
    base = load_yaml(CHART / "values.yaml")
    return base if name == "values.yaml" else merge(base, load_yaml(CHART / name))


def render(values_file: str) -> list[dict[str, Any]]:
    """Manifests rendered by Helm (binary or SDK); skips when neither is installed."""
    overrides = {"relay": {"relayKey": RELAY_KEY}}
    if shutil.which("helm"):
        result = subprocess.run(
            ["helm", "template", "test", str(CHART), "-f", str(CHART / values_file),
             "--set", f"relay.relayKey={RELAY_KEY}"],
            capture_output=True, text=True, timeout=60, check=True)
        text = result.stdout
    else:
        helm_python = pytest.importorskip("helm_python")
        chart = helm_python.Chart.load(CHART)
        values = merged_values(values_file)
        values["relay"] = {**values["relay"], **overrides["relay"]}
        text = "\n---\n".join(chart.render(values, name="test", namespace="default").values())
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_chart_metadata_is_valid() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "continuum"
    assert chart["version"] and chart["appVersion"]


@pytest.mark.parametrize("values_file", VALUE_FILES)
def test_values_match_the_schema(values_file: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(merged_values(values_file), schema)


def test_schema_refuses_external_redis_without_url() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = merged_values("values.yaml")
    values["redis"] = {**values["redis"], "enabled": False, "externalUrl": ""}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, schema)


def test_chart_lints_clean() -> None:
    if shutil.which("helm"):
        subprocess.run(["helm", "lint", "--strict", str(CHART)], check=True, timeout=60)
        return
    helm_python = pytest.importorskip("helm_python")
    report = helm_python.lint(CHART, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []


@pytest.mark.parametrize("values_file", VALUE_FILES)
def test_rendered_manifests_wire_relays_to_one_store(values_file: str) -> None:
    docs = render(values_file)
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    values = merged_values(values_file)
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "ConfigMap", "Secret", "Ingress"):
        assert (kind, "test-continuum-relay" if kind != "Secret"
                else "test-continuum-relay-key") in kinds, kind
    assert ("StatefulSet", "test-continuum-redis") in kinds or not values["redis"]["enabled"]
    assert (("ServiceMonitor", "test-continuum-relay") in kinds) == \
        values["metrics"]["serviceMonitor"]["enabled"]

    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    expected_store = (values["redis"]["externalUrl"] if not values["redis"]["enabled"]
                      else "redis://test-continuum-redis:6379/0")
    assert config["CONTINUUM_STORE"] == expected_store
    assert all(name.startswith("CONTINUUM_") for name in config)

    relay = next(d for d in docs if d["kind"] == "Deployment"
                 and d["metadata"]["name"] == "test-continuum-relay")
    container = relay["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert {e["name"] for e in container["env"]} == {"CONTINUUM_RELAY_KEY"}

    ingress = next(d for d in docs if d["kind"] == "Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/v1/connect"
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
