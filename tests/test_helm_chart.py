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
import tempfile
from pathlib import Path
from typing import Any

import pytest

from continuum.settings import Settings
from proto import Identity, PublicKey
from proto.errors import InvalidFieldError

yaml = pytest.importorskip("yaml")

CHART = Path(__file__).resolve().parent.parent / "charts" / "continuum"
VALUE_FILES = ["values.yaml", "values-eu.yaml", "values-us.yaml"]
RELAY_KEY = "csk_" + "a" * 56


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def merged_values(name: str) -> dict[str, Any]:
    """Defaults overlaid with a region file, as `helm -f` merges maps."""
    base = load_yaml(CHART / "values.yaml")
    return base if name == "values.yaml" else deep_merge(base, load_yaml(CHART / name))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def render_with_notes(values_file: str, overrides: dict[str, Any] | None = None,
                      release: str = "test") -> tuple[list[dict[str, Any]], str | None]:
    """Manifests rendered by Helm (binary or SDK), and NOTES.txt (SDK only; `helm template` omits it).

    Skips when neither is installed.
    """
    overrides = deep_merge({"relay": {"relayKey": RELAY_KEY}}, overrides or {})
    notes = None
    if shutil.which("helm"):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as extra:
            yaml.safe_dump(overrides, extra)
            extra.flush()
            result = subprocess.run(
                ["helm", "template", release, str(CHART), "-f", str(CHART / values_file),
                 "-f", extra.name],
                capture_output=True, text=True, timeout=60, check=True)
        text = result.stdout
    else:
        helm_python = pytest.importorskip("helm_python")
        chart = helm_python.Chart.load(CHART)
        rendered = chart.render(deep_merge(merged_values(values_file), overrides),
                                name=release, namespace="default")
        notes = rendered.pop("continuum/templates/NOTES.txt", None)
        text = "\n---\n".join(rendered.values())
    return [doc for doc in yaml.safe_load_all(text) if doc], notes


def render(values_file: str, overrides: dict[str, Any] | None = None,
           release: str = "test") -> list[dict[str, Any]]:
    return render_with_notes(values_file, overrides, release)[0]


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


@pytest.mark.parametrize("values_file", VALUE_FILES)
def test_chart_lints_clean(values_file: str) -> None:
    if shutil.which("helm"):
        subprocess.run(["helm", "lint", "--strict", str(CHART), "-f", str(CHART / values_file)],
                       check=True, timeout=60)
        return
    helm_python = pytest.importorskip("helm_python")
    report = helm_python.lint(CHART, merged_values(values_file), strict=True)
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
    relay = next(d for d in docs if d["kind"] == "Deployment"
                 and d["metadata"]["name"] == "test-continuum-relay")
    container = relay["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    if values["redis"]["enabled"]:  # with a password (redis.auth), set in the pod, not here
        assert "CONTINUUM_STORE" not in config
        assert env["CONTINUUM_STORE"]["value"] == \
            "redis://:$(REDIS_PASSWORD)@test-continuum-redis:6379/0"
    elif values["regions"]["name"]:  # other regions use it too: its password in a Secret
        assert "CONTINUUM_STORE" not in config
        regions = find(docs, "Secret", "test-continuum-regions")
        assert regions is not None
        assert regions["stringData"]["CONTINUUM_STORE"] == values["redis"]["externalUrl"]
        assert set(env) == {"CONTINUUM_RELAY_KEY"}
    else:
        assert config["CONTINUUM_STORE"] == values["redis"]["externalUrl"]
        assert set(env) == {"CONTINUUM_RELAY_KEY"}
    assert all(name.startswith("CONTINUUM_") for name in config)
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"

    ingress = next(d for d in docs if d["kind"] == "Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/v1/connect"
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600


# --- the oracle and access control -------------------------------------------------

ORACLE = Identity.generate()
ORACLE_KEYS = {"oracle": {"identityKey": ORACLE.secret_text(), "publicKey": ORACLE.public.text}}


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def oracle_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(docs, "Deployment", "test-continuum-oracle")
    assert deployment is not None
    return deployment["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def relay_config(docs: list[dict[str, Any]]) -> dict[str, str]:
    config = find(docs, "ConfigMap", "test-continuum-relay")
    assert config is not None
    return config["data"]


def test_oracle_serves_on_all_interfaces_as_one_process() -> None:
    docs = render("values.yaml", ORACLE_KEYS)
    deployment = find(docs, "Deployment", "test-continuum-oracle")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    oracle = oracle_pod(docs)["containers"][0]
    assert oracle["command"] == ["continuum-oracle", "serve"]
    env = env_of(oracle)
    assert env["CONTINUUM_ORACLE_HOST"]["value"] == "0.0.0.0"
    port = int(env["CONTINUUM_ORACLE_PORT"]["value"])
    assert oracle["ports"][0]["containerPort"] == port
    service = find(docs, "Service", "test-continuum-oracle")
    assert service["spec"]["ports"][0]["port"] == port
    # Peer changes go through the in-cluster relay Service, on its real port.
    relay_port = find(docs, "Service", "test-continuum-relay")["spec"]["ports"][0]["port"]
    assert env["CONTINUUM_ORACLE_RELAYS"]["value"] == \
        f"ws://test-continuum-relay:{relay_port}/v1/connect"
    assert env["CONTINUUM_ORACLE_SECURE_COOKIES"]["value"] == "false"


def test_oracle_key_comes_from_a_0400_secret_mounted_read_only() -> None:
    docs = render("values.yaml", ORACLE_KEYS)
    pod = oracle_pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_volume = next(v for v in volumes.values() if "secret" in v)
    assert secret_volume["secret"]["defaultMode"] == 0o400
    secret = find(docs, "Secret", secret_volume["secret"]["secretName"])
    assert secret is not None and secret["stringData"]["identity.key"] == ORACLE.secret_text()
    assert "0400" in json.dumps(pod["initContainers"][0]["command"])

    oracle = pod["containers"][0]
    key_file = Path(env_of(oracle)["CONTINUUM_ORACLE_IDENTITY_FILE"]["value"])
    mount = next(m for m in oracle["volumeMounts"] if key_file.parent == Path(m["mountPath"]))
    assert mount.get("readOnly") is True
    # The oracle itself never sees the Secret volume (fsGroup makes it group-readable).
    assert secret_volume["name"] not in {m["name"] for m in oracle["volumeMounts"]}
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"


def test_identity_copy_passes_the_oracles_key_file_check(tmp_path: Path) -> None:
    """Run the init container's own command: its copy loads, the Secret file as mounted does not."""
    pod = oracle_pod(render("values.yaml", ORACLE_KEYS))
    init = pod["initContainers"][0]
    # With fsGroup the kubelet leaves a Secret file 0440 whatever defaultMode says.
    assert pod["securityContext"]["fsGroup"]
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "identity.key").write_text(ORACLE.secret_text() + "\n")
    (secret_dir / "identity.key").chmod(0o440)
    with pytest.raises(PermissionError):
        Identity.load(secret_dir / "identity.key")

    secret_volume = next(v["name"] for v in pod["volumes"] if "secret" in v)
    where = {m["mountPath"]: str(secret_dir if m["name"] == secret_volume
                                 else tmp_path / m["name"]) for m in init["volumeMounts"]}
    for path in where.values():
        Path(path).mkdir(exist_ok=True)
    command = list(init["command"])
    for i, arg in enumerate(command):
        for mount_path, local in where.items():
            if arg.startswith(mount_path + "/"):
                command[i] = local + arg[len(mount_path):]
    subprocess.run(command, check=True, timeout=10)

    oracle = pod["containers"][0]
    key_file = Path(env_of(oracle)["CONTINUUM_ORACLE_IDENTITY_FILE"]["value"])
    mount = next(m for m in oracle["volumeMounts"] if key_file.parent == Path(m["mountPath"]))
    copied = tmp_path / mount["name"] / key_file.name
    assert Identity.load(copied).public == ORACLE.public


def test_existing_secret_is_used_and_none_is_created() -> None:
    docs = render("values.yaml", {"oracle": {"existingSecret": "fleet-oracle-key"}})
    secret_volume = next(v for v in oracle_pod(docs)["volumes"] if "secret" in v)
    assert secret_volume["secret"]["secretName"] == "fleet-oracle-key"
    assert not [d for d in docs if d["kind"] == "Secret" and "oracle" in d["metadata"]["name"]]


def test_sqlite_on_a_kept_volume_without_a_dsn() -> None:
    docs = render("values.yaml", ORACLE_KEYS)
    pod = oracle_pod(docs)
    oracle = pod["containers"][0]
    database = env_of(oracle)["CONTINUUM_ORACLE_DATABASE"]["value"]
    assert database.startswith("sqlite:////")
    db_dir = Path(database[len("sqlite:///"):]).parent
    mount = next(m for m in oracle["volumeMounts"] if Path(m["mountPath"]) == db_dir)
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]
    pvc = find(docs, "PersistentVolumeClaim", claim["claimName"])
    assert pvc["spec"]["resources"]["requests"]["storage"] == \
        merged_values("values.yaml")["oracle"]["storage"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_postgres_dsn_lives_only_in_a_secret() -> None:
    dsn = "postgresql://oracle:s3cret-pw@db.internal:5432/continuum"
    docs = render("values.yaml", deep_merge(ORACLE_KEYS, {"oracle": {"databaseUrl": dsn}}))
    oracle = oracle_pod(docs)["containers"][0]
    ref = env_of(oracle)["CONTINUUM_ORACLE_DATABASE"]["valueFrom"]["secretKeyRef"]
    secret = find(docs, "Secret", ref["name"])
    assert secret["stringData"][ref["key"]] == dsn
    # Nowhere else: not in a pod spec, a ConfigMap, or an annotation.
    elsewhere = [d for d in docs if d is not secret]
    assert "s3cret-pw" not in yaml.safe_dump_all(elsewhere)
    assert find(docs, "PersistentVolumeClaim", "test-continuum-oracle") is None


@pytest.mark.parametrize("require", [True, False])
def test_relays_learn_the_oracle_when_its_key_is_set(require: bool) -> None:
    docs = render("values.yaml", deep_merge(ORACLE_KEYS, {"relay": {"requireEnrollment": require}}))
    config = relay_config(docs)
    port = find(docs, "Service", "test-continuum-oracle")["spec"]["ports"][0]["port"]
    assert config["CONTINUUM_ORACLE_URL"] == f"https://test-continuum-oracle:{port}"
    assert config["CONTINUUM_ORACLE_KEY"] == ORACLE.public.text
    assert config["CONTINUUM_REQUIRE_ENROLLMENT"] == str(require).lower()


def test_relays_without_an_oracle_key_get_no_oracle_settings() -> None:
    config = relay_config(render("values.yaml"))
    assert not {"CONTINUUM_ORACLE_URL", "CONTINUUM_ORACLE_KEY",
                "CONTINUUM_REQUIRE_ENROLLMENT"} & set(config)


def test_one_oracle_for_both_regions() -> None:
    eu, us = merged_values("values-eu.yaml"), merged_values("values-us.yaml")
    eu_docs, us_docs = render("values-eu.yaml"), render("values-us.yaml")
    # EU hosts it behind TLS, so the dashboard cookie is Secure.
    assert find(eu_docs, "Deployment", "test-continuum-oracle") is not None
    eu_ingress = find(eu_docs, "Ingress", "test-continuum-oracle")
    assert eu_ingress["spec"]["tls"][0]["hosts"] == [eu["oracle"]["ingress"]["host"]]
    assert env_of(oracle_pod(eu_docs)["containers"][0])[
        "CONTINUUM_ORACLE_SECURE_COOKIES"]["value"] == "true"
    # US runs none and its relays poll the EU oracle's public URL with the same key.
    assert not [d for d in us_docs if "oracle" in d["metadata"]["name"]]
    us_config = relay_config(us_docs)
    assert us_config["CONTINUUM_ORACLE_URL"] == us["oracle"]["externalUrl"] == \
        f"https://{eu['oracle']['ingress']['host']}"
    assert us_config["CONTINUUM_ORACLE_KEY"] == eu["oracle"]["publicKey"] == \
        relay_config(eu_docs)["CONTINUUM_ORACLE_KEY"]
    assert us_config["CONTINUUM_REQUIRE_ENROLLMENT"] == "true"


def test_region_placeholder_key_cannot_be_mistaken_for_a_real_one() -> None:
    """The example key fits the schema but fails its checksum, so relays refuse to start with it."""
    with pytest.raises(InvalidFieldError, match="checksum"):
        PublicKey.from_text(merged_values("values-eu.yaml")["oracle"]["publicKey"])


def test_other_regions_relay_keys_reach_the_oracle_and_placeholders_are_refused() -> None:
    """The EU oracle lets the US relays fetch its access list; its own relays need no entry."""
    relay_keys = [Identity.generate().public.text for _ in range(2)]
    docs = render("values.yaml", deep_merge(ORACLE_KEYS, {"oracle": {"relayKeys": relay_keys}}))
    env = env_of(oracle_pod(docs)["containers"][0])
    assert env["CONTINUUM_ORACLE_RELAY_KEYS"]["value"] == ",".join(relay_keys)
    assert "CONTINUUM_ORACLE_RELAY_KEYS" not in env_of(
        oracle_pod(render("values.yaml", ORACLE_KEYS))["containers"][0])
    (placeholder,) = merged_values("values-eu.yaml")["oracle"]["relayKeys"]
    assert env_of(oracle_pod(render("values-eu.yaml"))["containers"][0])[
        "CONTINUUM_ORACLE_RELAY_KEYS"]["value"] == placeholder
    with pytest.raises(InvalidFieldError, match="checksum"):  # the oracle refuses to start
        PublicKey.from_text(placeholder)


def test_notes_guide_setup_and_warn_without_access_control() -> None:
    pytest.importorskip("helm_python")
    if shutil.which("helm"):
        pytest.skip("`helm template` does not render NOTES.txt")
    _, bare = render_with_notes("values.yaml")
    assert "continuum-oracle show-key" in bare
    assert "continuum-oracle create-admin admin" in bare
    assert "kubectl -n default exec deploy/test-continuum-oracle" in bare
    assert "WITHOUT access control" in bare
    _, keyed = render_with_notes("values.yaml", ORACLE_KEYS)
    assert "show-key" not in keyed and "WITHOUT" not in keyed
    assert "create-admin admin" in keyed
    _, us = render_with_notes("values-us.yaml")
    assert "create-admin" not in us and "WITHOUT" not in us


def test_notes_make_the_metrics_token_a_read_token() -> None:
    """The oracle's scrape token sits in a Secret: the notes make it a `read` token, which
    can scrape and read but never change a device or manage admins (audit F1)."""
    pytest.importorskip("helm_python")
    if shutil.which("helm"):
        pytest.skip("`helm template` does not render NOTES.txt")
    _, without = render_with_notes("values.yaml")
    assert "create-token" not in without  # no ServiceMonitor: nothing to scrape with
    monitored = {"metrics": {"serviceMonitor": {"enabled": True}}}
    _, unset = render_with_notes("values.yaml", monitored)
    assert ("kubectl -n default exec deploy/test-continuum-oracle -- continuum-oracle"
            " create-token prometheus --scope read") in unset
    assert "set metrics.oracleToken.secretName=test-continuum-oracle-metrics" in unset
    assert ("create secret generic test-continuum-oracle-metrics --from-literal=token=cot_"
            in unset)
    named = deep_merge(monitored, {"metrics": {"oracleToken": {"secretName": "scrape",
                                                               "secretKey": "bearer"}}})
    _, given = render_with_notes("values.yaml", named)
    assert "create-token prometheus --scope read" in given
    assert "Prometheus scrapes the oracle with the API token in Secret scrape" in given
    assert "create secret generic scrape --from-literal=bearer=cot_" in given


def schema_errors(values: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)]


@pytest.mark.parametrize("override", [
    {"oracle": {"replicas": 2}},  # exactly one oracle process
    {"oracle": {"enabled": False, "publicKey": ORACLE.public.text}},  # relays need a URL
    {"oracle": {"publicKey": ORACLE.public.text[:-1]}},  # truncated paste
    {"oracle": {"databaseUrl": "mysql://x@y/z"}},
    {"oracle": {"settings": {"CONTINUUM_ORACLE_HOST": "127.0.0.1"}}},  # chart-managed
    {"relay": {"settings": {"CONTINUUM_ORACLE_URL": "http://elsewhere"}}},
    {"oracle": {"relayKeys": ["cpk_tooshort"]}},
    {"oracle": {"settings": {"CONTINUUM_ORACLE_RELAY_KEYS": "cpk_x"}}},  # chart-managed
    {"oracle": {"enabled": False, "publicKey": ORACLE.public.text,  # relays poll over https
                "externalUrl": "http://oracle.eu.example.com"}},
    {"relay": {"accessListExpired": "ignore"}},
    {"relay": {"settings": {"CONTINUUM_ACCESS_LIST_EXPIRED": "alarm"}}},  # chart-managed
    {"oracle": {"settings": {"CONTINUUM_ORACLE_TLS_CERT": "/x.crt"}}},  # chart-managed
    {"regions": {"others": ["us"]}},  # other regions need this one's name
    {"regions": {"name": "EU"}},
    {"regions": {"name": "eu", "others": ["us", "us"]}},
    {"regions": {"name": "eu", "others": ["us"], "storeUrls": {"us": "memory"}}},
    {"regions": {"name": "eu", "storeUrls": {"us": "redis://a,b"}}},  # one comma-separated list
    {"relay": {"settings": {"CONTINUUM_REGION_STORES": "us=redis://x"}}},  # chart-managed
    {"oracle": {"settings": {"CONTINUUM_ORACLE_REGION": "eu"}}},  # chart-managed
    {"ingress": {"forwardedHeader": "x-real-ip"}},  # a header the relays cannot read
])
def test_schema_refuses(override: dict[str, Any]) -> None:
    assert schema_errors(deep_merge(merged_values("values.yaml"), override))


def test_relays_and_the_oracle_trust_only_the_ingress_for_forwarded_addresses() -> None:
    docs = render("values.yaml", deep_merge(ORACLE_KEYS, {
        "ingress": {"trustedProxies": ["10.42.0.0/16", "fd00::/8"]},
        "oracle": {"ingress": {"enabled": True}}}))
    assert relay_config(docs)["CONTINUUM_TRUSTED_PROXIES"] == "10.42.0.0/16,fd00::/8"
    assert relay_config(docs)["CONTINUUM_FORWARDED_HEADER"] == "x-forwarded-for"  # ingress-nginx's
    oracle = find(docs, "Deployment", "test-continuum-oracle")
    env = {e["name"]: e.get("value") for e in oracle["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CONTINUUM_ORACLE_TRUSTED_PROXIES"] == "10.42.0.0/16,fd00::/8"
    assert env["CONTINUUM_ORACLE_FORWARDED_HEADER"] == "x-forwarded-for"
    without = render("values.yaml", {"ingress": {"enabled": False}})
    assert "CONTINUUM_TRUSTED_PROXIES" not in relay_config(without)  # no proxy: trust none



# --- https to the oracle, wss:// to the relays ----------------------------------------

def pod_of(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    deployment = find(docs, "Deployment", name)
    assert deployment is not None
    return deployment["spec"]["template"]["spec"]


def mounted_secret(pod: dict[str, Any], container: dict[str, Any], path: str
                   ) -> tuple[str, list[str]]:
    """The Secret and the keys of it mounted where `path` lives in `container`."""
    mount = next(m for m in container["volumeMounts"]
                 if Path(path).parent == Path(m["mountPath"]))
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert Path(path).name in [item["path"] for item in volume["items"]]
    return volume["secretName"], [item["key"] for item in volume["items"]]


def test_relays_reach_the_in_cluster_oracle_over_https_verified_by_its_ca() -> None:
    from continuum.settings import Settings
    from oracle.settings import OracleSettings
    docs = render("values.yaml", ORACLE_KEYS)
    config = relay_config(docs)
    port = find(docs, "Service", "test-continuum-oracle")["spec"]["ports"][0]["port"]
    assert config["CONTINUUM_ORACLE_URL"] == f"https://test-continuum-oracle:{port}"
    assert config["CONTINUUM_ACCESS_LIST_EXPIRED"] == "fail-closed"
    relay_pod = pod_of(docs, "test-continuum-relay")
    secret, keys = mounted_secret(relay_pod, relay_pod["containers"][0],
                                  config["CONTINUUM_ORACLE_CA_FILE"])
    assert (secret, keys) == ("test-continuum-oracle-tls", ["ca.crt"])  # never the oracle's key

    oracle_pod_spec = pod_of(docs, "test-continuum-oracle")
    oracle = oracle_pod_spec["containers"][0]
    env = {name: e["value"] for name, e in env_of(oracle).items() if "value" in e}
    for variable, key in (("CONTINUUM_ORACLE_TLS_CERT", "tls.crt"),
                          ("CONTINUUM_ORACLE_TLS_KEY", "tls.key")):
        secret, keys = mounted_secret(oracle_pod_spec, oracle, env[variable])
        assert secret == "test-continuum-oracle-tls" and key in keys
    assert oracle["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert oracle["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    # The services accept what the chart gives them.
    Settings.from_sources([], config).validate()
    OracleSettings.from_sources([], {**env, "CONTINUUM_ORACLE_RELAYS": env[
        "CONTINUUM_ORACLE_RELAYS"]})[0].validate()


def test_plain_http_to_the_oracle_only_when_turned_off() -> None:
    docs = render("values.yaml", deep_merge(ORACLE_KEYS, {"oracle": {"tls": {"enabled": False}}}))
    config = relay_config(docs)
    assert config["CONTINUUM_ORACLE_URL"].startswith("http://")
    assert "CONTINUUM_ORACLE_CA_FILE" not in config
    assert "volumes" not in pod_of(docs, "test-continuum-relay")
    oracle = pod_of(docs, "test-continuum-oracle")["containers"][0]
    assert "CONTINUUM_ORACLE_TLS_CERT" not in env_of(oracle)
    assert oracle["readinessProbe"]["httpGet"]["scheme"] == "HTTP"


def test_another_regions_oracle_is_verified_by_the_system_store_or_a_given_ca() -> None:
    config = relay_config(render("values-us.yaml"))
    assert config["CONTINUUM_ORACLE_URL"].startswith("https://")
    assert "CONTINUUM_ORACLE_CA_FILE" not in config  # a public certificate
    docs = render("values-us.yaml", {"relay": {"oracleCaSecret": "fleet-ca"}})
    relay_pod = pod_of(docs, "test-continuum-relay")
    assert mounted_secret(relay_pod, relay_pod["containers"][0], relay_config(docs)[
        "CONTINUUM_ORACLE_CA_FILE"]) == ("fleet-ca", ["ca.crt"])
    with pytest.raises(Exception, match="https"):  # the schema refuses it (and the template)
        render("values-us.yaml", {"oracle": {"externalUrl": "http://oracle.eu.example.com"}})


def test_the_relay_ingress_serves_wss_unless_plaintext_is_asked_for() -> None:
    ingress = find(render("values.yaml"), "Ingress", "test-continuum-relay")
    assert ingress["spec"]["tls"] == [{"hosts": ["relay.example.com"],
                                       "secretName": "test-continuum-relay-tls"}]
    eu = find(render("values-eu.yaml"), "Ingress", "test-continuum-relay")
    assert eu["spec"]["tls"][0]["secretName"] == "eu-relay-tls"
    plain = find(render("values.yaml", {"ingress": {"plaintext": True}}), "Ingress",
                 "test-continuum-relay")
    assert "tls" not in plain["spec"]


def test_notes_name_the_tls_secrets_to_create() -> None:
    pytest.importorskip("helm_python")
    if shutil.which("helm"):
        pytest.skip("`helm template` does not render NOTES.txt")
    _, notes = render_with_notes("values.yaml", ORACLE_KEYS)
    assert "wss://relay.example.com/v1/connect" in notes
    assert "Oracle: https://test-continuum-oracle:" in notes
    assert "create secret generic test-continuum-oracle-tls" in notes
    assert "subjectAltName=DNS:test-continuum-oracle,DNS:test-continuum-oracle.default.svc" in notes
    assert "fail-closed" in notes
    _, plain = render_with_notes("values.yaml", {"ingress": {"plaintext": True},
                                                 "oracle": {"tls": {"enabled": False}}})
    assert "WARNING: ingress.plaintext" in plain and "test-continuum-oracle-tls" not in plain


# --- one worldwide network: the region map -------------------------------------------------


def regions_secret(docs: list[dict[str, Any]]) -> dict[str, str]:
    secret = find(docs, "Secret", "test-continuum-regions")
    assert secret is not None
    return secret["stringData"]


@pytest.mark.parametrize("region, other", [("eu", "us"), ("us", "eu")])
def test_each_region_reaches_every_regions_store_through_a_secret(region: str,
                                                                  other: str) -> None:
    """values-eu/us: the relays know their region, find every other region's Redis URL
    (TLS, a password) in a Secret, never in the ConfigMap, and those settings are ones the
    relay itself accepts (its own parser), with the passwords masked in its start-up log."""
    from continuum.settings import Settings
    docs = render(f"values-{region}.yaml")
    values = merged_values(f"values-{region}.yaml")
    config, secret = relay_config(docs), regions_secret(docs)
    assert config["CONTINUUM_REGION"] == region
    assert not any("PASSWORD" in value for value in config.values())
    assert secret["CONTINUUM_REGION_STORES"] == f"{other}={values['regions']['storeUrls'][other]}"
    assert secret["CONTINUUM_STORE"] == values["redis"]["externalUrl"]
    assert all(url.startswith("rediss://") for url in (
        secret["CONTINUUM_STORE"], secret["CONTINUUM_REGION_STORES"].split("=", 1)[1]))
    relay = find(docs, "Deployment", "test-continuum-relay")
    sources = relay["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "test-continuum-regions"}} in sources
    # (The example's oracle key is a placeholder the relay refuses: a real one instead.)
    settings = Settings.from_sources([], {**config, **secret,
                                          "CONTINUUM_ORACLE_KEY": ORACLE.public.text})
    assert settings.region_store_urls() == {region: values["redis"]["externalUrl"],
                                            other: values["regions"]["storeUrls"][other]}
    assert "PASSWORD" not in json.dumps(settings.describe())


def test_both_regions_name_the_same_redis_for_each_region() -> None:
    """The EU relays reach the US Redis at the URL the US relays use, and the other way."""
    eu, us = merged_values("values-eu.yaml"), merged_values("values-us.yaml")
    assert eu["regions"]["storeUrls"]["us"] == us["redis"]["externalUrl"]
    assert us["regions"]["storeUrls"]["eu"] == eu["redis"]["externalUrl"]


def test_the_oracle_homes_devices_in_its_region_and_knows_the_others() -> None:
    env = env_of(oracle_pod(render("values-eu.yaml"))["containers"][0])
    assert env["CONTINUUM_ORACLE_REGION"]["value"] == "eu"
    assert env["CONTINUUM_ORACLE_OTHER_REGIONS"]["value"] == "us"
    plain = env_of(oracle_pod(render("values.yaml", ORACLE_KEYS))["containers"][0])
    assert "CONTINUUM_ORACLE_REGION" not in plain


def test_without_regions_nothing_about_them_is_rendered() -> None:
    docs = render("values.yaml")
    assert "CONTINUUM_REGION" not in relay_config(docs)
    assert find(docs, "Secret", "test-continuum-regions") is None


def test_an_existing_regions_secret_is_used_and_none_is_made() -> None:
    docs = render("values-eu.yaml", {"regions": {"existingSecret": "my-region-stores"}})
    assert find(docs, "Secret", "test-continuum-regions") is None
    relay = find(docs, "Deployment", "test-continuum-relay")
    assert {"secretRef": {"name": "my-region-stores"}} in \
        relay["spec"]["template"]["spec"]["containers"][0]["envFrom"]


def test_a_region_without_a_store_url_does_not_render() -> None:
    with pytest.raises(Exception, match="storeUrls.ap"):
        render("values-eu.yaml", {"regions": {"others": ["us", "ap"]}})


def test_redis_keeps_a_relays_stream_frames_up_to_its_credit_pool() -> None:
    """Redis's default `client-output-buffer-limit pubsub 32mb 8mb 60` dropped a relay's stream
    bus subscriber far below the credit it may pass on (256 MiB), ending every stream across
    relays there: the chart's Redis buffers at least the pool for a subscriber."""
    redis = next(d for d in render("values.yaml") if d["kind"] == "StatefulSet"
                 and d["metadata"]["name"] == "test-continuum-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    limit = args[args.index("--client-output-buffer-limit") + 1].split()
    assert limit[0] == "pubsub"
    hard, soft = limit[1], limit[2]
    assert hard.endswith("gb") and int(hard[:-2]) * 1024**3 >= Settings().stream_relay_window_bytes
    assert soft == "0"  # no soft limit: a relay busy for a minute is not dropped either
