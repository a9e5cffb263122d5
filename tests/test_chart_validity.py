"""Every manifest the chart renders is a valid Kubernetes object, for every values file and
every optional feature, checked offline against the Kubernetes API schemas
(`kubernetes-validate`, strict: an unknown field is an error, as `kubectl apply
--validate=strict` makes it); the Prometheus operator's objects against the fields of
their CRDs the chart uses; and the alert rules and the Grafana dashboard name only
metrics the relay and the oracle really export.  Also: names honour
nameOverride/fullnameOverride, every object says who manages it, pods go where the
scheduling values say, Redis runs unprivileged behind a password the relays get from a
Secret, and NetworkPolicies confine Redis and the oracle.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_helm_chart import CHART, ORACLE_KEYS, VALUE_FILES, deep_merge, find, render

from continuum.metrics import RelayMetrics
from oracle.metrics import OracleMetrics

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

KUBERNETES = "1.30.0"  # the oldest Kubernetes the chart supports (topology spread, PDB v1)

EVERYTHING = deep_merge(ORACLE_KEYS, {
    "networkPolicy": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True},
                "oracleToken": {"secretName": "oracle-metrics-token"},
                "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                "grafanaDashboard": {"enabled": True}},
    "relay": {"nodeSelector": {"pool": "edge"},
              "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
              "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                  "nodeSelectorTerms": [{"matchExpressions": [
                      {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}}},
    "oracle": {"nodeSelector": {"pool": "control"}, "databaseUrl": "postgresql://o@db/o",
               "ingress": {"enabled": True, "tlsSecret": "oracle-tls"}},
    "redis": {"nodeSelector": {"pool": "data"},
              "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                             "whenUnsatisfiable": "DoNotSchedule"}]},
})
SCENARIOS = {
    "defaults": {},
    "everything": EVERYTHING,
    "no redis password": {"redis": {"auth": {"enabled": False}}},
    "redis password of ours": {"redis": {"auth": {"existingSecret": "our-redis",
                                                  "secretKey": "pw"}}},
    "no autoscaling, no ingress": {"relay": {"autoscaling": {"enabled": False}},
                                   "ingress": {"enabled": False}},
    "names overridden": {"nameOverride": "mesh", "fullnameOverride": "fleet"},
}

# The Prometheus operator's objects (not in the Kubernetes schemas): the fields of the
# monitoring.coreos.com/v1 CRDs the chart writes, unknown fields refused as the CRDs do.
_OBJECT_META = {"type": "object", "required": ["name"]}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"], "properties": {
    "port": {"type": "string"}, "path": {"type": "string"},
    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
    "scheme": {"enum": ["http", "https"]},
    "tlsConfig": {"type": "object", "additionalProperties": False, "properties": {
        "serverName": {"type": "string"},
        "ca": {"type": "object", "additionalProperties": False, "properties": {
            "secret": {"type": "object", "additionalProperties": False,
                       "required": ["name", "key"],
                       "properties": {"name": {"type": "string"}, "key": {"type": "string"}}}}}}},
    "authorization": {"type": "object", "additionalProperties": False, "properties": {
        "type": {"type": "string"},
        "credentials": {"type": "object", "additionalProperties": False, "required": ["key"],
                        "properties": {"name": {"type": "string"}, "key": {"type": "string"}}}}}}}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_RULE = {"type": "object", "additionalProperties": False, "required": ["expr"], "properties": {
    "alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": "string"},
    "for": _DURATION,
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _OBJECT_META,
            "spec": {"type": "object", "additionalProperties": False,
                     "required": ["selector", "endpoints"], "properties": {
                         "selector": {"type": "object", "properties": {
                             "matchLabels": {"type": "object",
                                             "additionalProperties": {"type": "string"}}}},
                         "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}}},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _OBJECT_META,
            "spec": {"type": "object", "additionalProperties": False, "properties": {
                "groups": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["name", "rules"], "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "rules": {"type": "array", "items": _RULE}}}}}}}},
}


def rendered(values_file: str, scenario: str) -> list[dict[str, Any]]:
    return render(values_file, SCENARIOS[scenario])


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("values_file", VALUE_FILES)
def test_every_manifest_is_a_valid_kubernetes_object(values_file: str, scenario: str) -> None:
    docs = rendered(values_file, scenario)
    assert docs
    for doc in docs:
        what = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        crd = CRDS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            jsonschema.validate(doc, crd)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, what
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", what
        assert labels["app.kubernetes.io/instance"] == "test", what


def test_a_broken_manifest_is_caught() -> None:
    """The check above has teeth: a misspelt field or a wrong type is an error."""
    deployment = find(render("values.yaml"), "Deployment", "test-continuum-relay")
    assert deployment is not None
    deployment["spec"]["template"]["spec"]["nodeselector"] = {"a": "b"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    rule = find(render("values.yaml", EVERYTHING), "PrometheusRule", "test-continuum")
    assert rule is not None
    rule["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, CRDS[("monitoring.coreos.com/v1", "PrometheusRule")])


def _names(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def test_names_are_not_doubled_and_honour_the_overrides() -> None:
    plain = _names(render("values.yaml", release="continuum"))
    assert ("Deployment", "continuum-relay") in plain
    assert not any("continuum-continuum" in name for _, name in plain)
    assert ("Deployment", "test-mesh-relay") in _names(render("values.yaml", {"nameOverride": "mesh"}))
    fleet = render("values.yaml", deep_merge(ORACLE_KEYS, {"fullnameOverride": "fleet"}))
    assert ("Deployment", "fleet-relay") in _names(fleet)
    assert ("Deployment", "fleet-oracle") in _names(fleet)
    config = find(fleet, "ConfigMap", "fleet-relay")["data"]
    assert config["CONTINUUM_ORACLE_URL"].startswith("https://fleet-oracle:")
    relay = find(fleet, "Deployment", "fleet-relay")
    store = {e["name"]: e for e in relay["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "@fleet-redis:6379" in store["CONTINUUM_STORE"]["value"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_selectors_select_their_own_pods(scenario: str) -> None:
    docs = rendered("values.yaml", scenario)
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selected = spec["selector"]["matchLabels"]
            assert selected.items() <= pods[doc["metadata"]["name"]].items()
        elif doc["kind"] == "Service":
            assert any(spec["selector"].items() <= labels.items() for labels in pods.values())
        elif doc["kind"] == "PodDisruptionBudget":
            assert spec["selector"]["matchLabels"].items() <= pods[doc["metadata"]["name"]].items()


def _pod(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    workload = find(docs, kind, name)
    assert workload is not None, (kind, name)
    return workload["spec"]["template"]["spec"]


def test_pods_go_where_the_scheduling_values_say() -> None:
    docs = render("values.yaml", EVERYTHING)
    relay = _pod(docs, "Deployment", "test-continuum-relay")
    assert relay["nodeSelector"] == {"pool": "edge"}
    assert relay["tolerations"] == EVERYTHING["relay"]["tolerations"]
    assert relay["affinity"] == EVERYTHING["relay"]["affinity"]
    relay_labels = find(docs, "Deployment", "test-continuum-relay")["spec"]["template"][
        "metadata"]["labels"]
    spread = relay["topologySpreadConstraints"]  # the defaults: zones, then nodes
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone",
                                                  "kubernetes.io/hostname"]
    assert all(c["labelSelector"]["matchLabels"].items() <= relay_labels.items() for c in spread)
    assert _pod(docs, "Deployment", "test-continuum-oracle")["nodeSelector"] == {"pool": "control"}
    redis = _pod(docs, "StatefulSet", "test-continuum-redis")
    assert redis["nodeSelector"] == {"pool": "data"}
    assert redis["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"][
        "app.kubernetes.io/component"] == "redis"
    plain = _pod(render("values.yaml"), "Deployment", "test-continuum-relay")
    assert "nodeSelector" not in plain and "tolerations" not in plain


def test_redis_runs_unprivileged_and_only_with_the_password() -> None:
    docs = render("values.yaml")
    redis = _pod(docs, "StatefulSet", "test-continuum-redis")
    assert redis["securityContext"]["runAsNonRoot"] is True
    assert redis["securityContext"]["runAsUser"] == 999 == redis["securityContext"]["fsGroup"]
    container = redis["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    secret = find(docs, "Secret", "test-continuum-redis")
    assert secret is not None and len(secret["data"]["redis-password"]) >= 32
    redis_env = {e["name"]: e for e in container["env"]}
    assert "$(REDIS_PASSWORD)" in container["args"][container["args"].index("--requirepass") + 1]
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):  # the server, and its probe's redis-cli
        assert redis_env[name]["valueFrom"]["secretKeyRef"] == {"name": "test-continuum-redis",
                                                                "key": "redis-password"}
    relay = _pod(docs, "Deployment", "test-continuum-relay")["containers"][0]
    env = [e["name"] for e in relay["env"]]
    # Kubernetes expands $(REDIS_PASSWORD) only from variables defined before it.
    assert env.index("REDIS_PASSWORD") < env.index("CONTINUUM_STORE")
    relay_env = {e["name"]: e for e in relay["env"]}
    assert relay_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
        redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    expanded = relay_env["CONTINUUM_STORE"]["value"].replace("$(REDIS_PASSWORD)", "pw-123")
    url = urlsplit(expanded)
    assert (url.scheme, url.password, url.hostname, url.port) == \
        ("redis", "pw-123", "test-continuum-redis", 6379)

    chosen = render("values.yaml", {"redis": {"auth": {"password": "Chosen-pass.1"}}})
    assert "Chosen-pass.1" not in json.dumps([d for d in chosen if d["kind"] != "Secret"])
    ours = render("values.yaml", {"redis": {"auth": {"existingSecret": "our-redis",
                                                     "secretKey": "pw"}}})
    assert find(ours, "Secret", "test-continuum-redis") is None
    ref = {e["name"]: e for e in _pod(ours, "Deployment", "test-continuum-relay")[
        "containers"][0]["env"]}["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "our-redis", "key": "pw"}
    off = render("values.yaml", {"redis": {"auth": {"enabled": False}}})
    assert find(off, "ConfigMap", "test-continuum-relay")["data"]["CONTINUUM_STORE"] == \
        "redis://test-continuum-redis:6379/0"


def test_network_policies_confine_redis_and_the_oracle() -> None:
    docs = render("values.yaml", EVERYTHING)
    relay_labels = find(docs, "Deployment", "test-continuum-relay")["spec"]["template"][
        "metadata"]["labels"]
    redis = find(docs, "NetworkPolicy", "test-continuum-redis")["spec"]
    (rule,) = redis["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [
        {k: relay_labels[k] for k in rule["from"][0]["podSelector"]["matchLabels"]}]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    oracle = find(docs, "NetworkPolicy", "test-continuum-oracle")["spec"]
    peers = oracle["ingress"][0]["from"]
    assert peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "relay"
    assert peers[1:] == EVERYTHING["networkPolicy"].get("oracleClients", [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    relay = find(docs, "NetworkPolicy", "test-continuum-relay")["spec"]
    assert relay["ingress"] == [{"ports": [{"port": 8470, "protocol": "TCP"}]}]
    assert not [d for d in render("values.yaml") if d["kind"] == "NetworkPolicy"]


# --- what the alerts and the dashboard refer to ----------------------------------------

def exported_metrics() -> set[str]:
    """Every series name the relay and the oracle export (counters as _total, histograms
    as _bucket/_count/_sum), from their real registries; plus Prometheus's own `up`."""
    names = {"up"}
    for registry in (RelayMetrics().registry, OracleMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                        "gauge": ("",)}.get(family.type, ("",))
            names.update(family.name + s for s in suffixes)
    return names


_METRIC = re.compile(r"\b((?:continuum|process|python)_[a-zA-Z0-9_]+|up)\b(?=\s*[{\[)])")


def referenced(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def test_every_alert_names_exported_metrics_and_the_scraped_jobs() -> None:
    docs = render("values.yaml", EVERYTHING)
    rule = find(docs, "PrometheusRule", "test-continuum")
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"ContinuumRelayDown", "ContinuumStoreUnavailable", "ContinuumRefusalSpike",
            "ContinuumMailboxesDeep", "ContinuumSilentDevices",
            "ContinuumOraclePushBacklog"} <= set(alerts)
    exported = exported_metrics()
    monitors = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceMonitor"}
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for name, alert in alerts.items():
        used = referenced(alert["expr"])
        assert used and used <= exported, (name, used - exported)
        jobs = set(re.findall(r'job="([^"]+)"', alert["expr"]))
        assert jobs and jobs <= monitors & services, (name, jobs)  # each job is scraped
    assert "> 0.2" in alerts["ContinuumRefusalSpike"]["expr"]
    tuned = render("values.yaml", deep_merge(EVERYTHING, {"metrics": {"prometheusRule": {
        "pushBacklog": 7}}}))
    backlog = {r["alert"]: r for g in find(tuned, "PrometheusRule", "test-continuum")["spec"][
        "groups"] for r in g["rules"]}["ContinuumOraclePushBacklog"]
    assert backlog["expr"].endswith("> 7")


def test_the_grafana_dashboard_is_shipped_whole_and_plots_exported_metrics() -> None:
    source = (CHART / "dashboards" / "continuum.json").read_text()
    dashboard = json.loads(source)
    docs = render("values.yaml", EVERYTHING)
    config = find(docs, "ConfigMap", "test-continuum-grafana-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config["data"]["continuum.json"]) == dashboard
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 12
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    exported = exported_metrics()
    exprs = [t["expr"] for p in panels for t in p["targets"]] + [
        v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for expr in exprs:
        used = referenced(expr) | set(re.findall(r"label_values\((\w+)", expr))
        assert used and used <= exported, (expr, used - exported)
    plotted = set().union(*map(referenced, exprs))
    for family in ("continuum_store_operation_seconds_bucket", "continuum_connections",
                   "process_cpu_seconds_total", "continuum_oracle_devices_online",
                   "continuum_oracle_devices_silent", "continuum_oracle_push_queue"):
        assert family in plotted, family


def test_values_files_and_overrides_match_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    from test_helm_chart import merged_values
    for values_file in VALUE_FILES:
        for overrides in SCENARIOS.values():
            jsonschema.validate(deep_merge(merged_values(values_file), overrides), schema)
    base = merged_values("values.yaml")
    for bad in ({"nameOverride": "Mesh!"}, {"redis": {"auth": {"password": "a b@c"}}},
                {"relay": {"topologySpreadConstraints": [{"maxSkew": 1}]}},
                {"metrics": {"prometheusRule": {"refusalRatio": 2}}},
                {"networkPolicy": {"enabled": "yes"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(deep_merge(base, bad), schema)
