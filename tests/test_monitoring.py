"""Monitoring that adds up, with the real promtool (Debian's ``prometheus`` package) and the real Helm engine.

- The shipped alerts pass ``promtool check rules`` (the file and the chart's PrometheusRule) and their own unit tests
  (``promtool test rules``: each alert fires where it should, and not before).
- Every dashboard query is evaluated by Prometheus's own engine (promtool's ``promql_expr_test``) over series as the
  chart's scrape set-up produces them: two gateway pods with their own ``airlock_*`` series and two engines whose
  ``vllm:*`` series come once each, from the engine pods; and again with each gateway pod re-exporting the engines'
  series as well (``metrics.engine_series: true`` with two gateways): the engine panels must not change. Every
  request and every engine is counted once.
- The chart's monitoring objects: ServiceMonitors for gateways and engines, the engines' metrics port and its own
  network policy, the PrometheusRule and the dashboard ConfigMap, read from the one copy in helm/airlock/files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from server.config import load_settings

from .conftest import ROOT
from .test_helm_chart import CHART, CUSTOM_KINDS, KUBERNETES, RELEASE, merged, of_kind, render

DASHBOARD = CHART / "files" / "airlock-dashboard.json"
ALERTS = CHART / "files" / "airlock-alerts.yaml"
ALERT_TESTS = Path(__file__).parent / "data" / "airlock-alerts-test.yaml"
# Grafana's variables, filled in as a query would see them: a 5-minute rate window, every model.
RATE_INTERVAL = "5m"

MONITORING = {"metrics": {
    "serviceMonitor": {"enabled": True, "scrapeTimeout": "15s", "labels": {"release": "prometheus"},
                       "relabelings": [{"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
                                        "targetLabel": "node"}],
                       "metricRelabelings": [{"action": "drop", "sourceLabels": ["__name__"],
                                              "regex": "vllm:request_params_.*"}]},
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"},
                       "additionalGroups": [{"name": "site.rules",
                                             "rules": [{"alert": "SiteAirlockDown", "expr": "up == 0"}]}]},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "labels": {"team": "ml"},
                         "annotations": {"grafana_folder": "Airlock"}},
}, "engine": {"replicas": 2}}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, ("promtool is missing: install Debian's `prometheus` package (the Makefile's packages step does); "
                   "the alert and dashboard tests need Prometheus's own PromQL engine")
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# --- alerts -------------------------------------------------------------------------------------------------------

def test_the_shipped_alerts_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 8 rules found" in run_promtool("check", "rules", str(ALERTS))
    tested = {test["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for test in case["alert_rule_test"]}
    shipped = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    assert tested == shipped, "every shipped alert has a unit test"
    run_promtool("test", "rules", str(ALERT_TESTS))


def test_the_prometheus_rule_is_the_shipped_file_plus_the_sites_groups(tmp_path: Path) -> None:
    (rule,) = of_kind(render(MONITORING), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    groups = rule["spec"]["groups"]
    assert groups == yaml.safe_load(ALERTS.read_text())["groups"] + MONITORING["metrics"]["prometheusRule"][
        "additionalGroups"]
    # The annotations' templates reach Prometheus as written (Helm does not read the file as a template).
    assert any("{{ $labels.replica }}" in str(r.get("annotations")) for g in groups for r in g["rules"])
    spec = tmp_path / "rule-spec.yaml"
    spec.write_text(yaml.safe_dump(rule["spec"]))
    assert "SUCCESS: 9 rules found" in run_promtool("check", "rules", str(spec))


# --- dashboard queries over the chart's series --------------------------------------------------------------------

GATEWAYS = [{"job": "airlock-gateway", "namespace": "airlock", "instance": f"10.0.0.{n}:9464",
             "pod": f"airlock-gateway-{name}", "service": "airlock-gateway", "endpoint": "metrics",
             "container": "gateway"} for n, name in ((1, "a"), (2, "b"))]
ENGINES = [{"job": f"airlock-engine-{n}", "namespace": "airlock", "instance": f"10.0.1.{n}:9465",
            "pod": f"airlock-engine-{n}-x", "service": f"airlock-engine-{n}", "endpoint": "metrics",
            "container": "engine"} for n in (0, 1)]
MODEL = {"model": "Qwen3-VL-8B-Instruct"}
BUCKETS = ("0.5", "1.0", "+Inf")


def counter(per_minute: float) -> str:
    """A counter over 11 one-minute samples: its rate is per_minute / 60 per second."""
    return f"0+{per_minute}x10"


Series = list[tuple[str, dict[str, str], str]]


def gauge(value: float) -> str:
    """A gauge holding ``value`` over the 11 samples (a single sample would be stale at the evaluation time)."""
    return f"{value}x10"


def histogram(name: str, labels: dict[str, str], per_minute: float, upper: str) -> Series:
    """Observations all below ``upper`` (and above the bucket before it)."""
    below = BUCKETS[: BUCKETS.index(upper)]
    return [(f"{name}_bucket", {**labels, "le": le}, counter(0 if le in below else per_minute)) for le in BUCKETS] + [
        (f"{name}_count", labels, counter(per_minute))]


def gateway_series(pod: int) -> Series:
    """One gateway pod's airlock_* series: pod a and pod b see different traffic."""
    a = pod == 0
    route = {**MODEL, "route": "/v1/chat/completions"}
    series = [
        ("airlock_requests_total", {**route, "status": "200"}, counter(60 if a else 120)),
        ("airlock_requests_total", {**route, "status": "503"}, counter(6 if a else 0)),
        ("airlock_requests_in_flight", {}, gauge(3 if a else 4)),
        ("airlock_queued_requests", MODEL, gauge(1 if a else 2)),
        ("airlock_rejected_requests_total", {"reason": "limits", "code": "rate_limited"}, counter(30)),
        ("airlock_upstream_errors_total", {"reason": "timeout"}, counter(6 if a else 0)),
        ("airlock_upstream_retries_total", {}, counter(12 if a else 6)),
        ("airlock_active_users", {}, gauge(5 if a else 7)),
        ("airlock_output_tokens_total", MODEL, counter(600 if a else 1200)),
        ("airlock_prompt_tokens_total", MODEL, counter(300)),
        ("airlock_replica_healthy", {"replica": "0"}, gauge(1)),
        ("airlock_replica_healthy", {"replica": "1"}, gauge(1 if a else 0)),
        ("airlock_ready", {}, gauge(1)),
        ("airlock_replica_outstanding", {"replica": "0"}, gauge(2 if a else 3)),
        ("airlock_replica_outstanding", {"replica": "1"}, gauge(1 if a else 0)),
        ("airlock_replica_max_in_flight", {"replica": "0"}, gauge(8)),
        ("airlock_replica_max_in_flight", {"replica": "1"}, gauge(8)),
        ("airlock_process_resident_memory_bytes", {}, gauge(100000000 if a else 200000000)),
        ("airlock_process_cpu_seconds_total", {}, counter(6 if a else 12)),
        ("airlock_documents_total", {"purpose": "request", "outcome": "rendered"}, counter(30)),
        ("airlock_documents_total", {"purpose": "request", "outcome": "unprocessable"}, counter(6 if a else 0)),
        ("airlock_document_pages_total", {"purpose": "request"}, counter(60)),
    ]
    series += histogram("airlock_request_duration_seconds", {**route, "stream": "false"}, 60, "1.0")
    series += histogram("airlock_time_to_first_token_seconds", {**route, "stream": "true"}, 60, "1.0")
    series += histogram("airlock_queue_wait_seconds", MODEL, 60, "0.5")
    series += histogram("airlock_gateway_overhead_seconds", {"stage": "before_forward"}, 60, "0.5")
    series += histogram("airlock_output_tokens_per_second", MODEL, 60, "1.0")
    series += histogram("airlock_document_render_seconds", {"purpose": "request"}, 30, "0.5")
    return series


def engine_series(replica: int) -> Series:
    """One engine's vllm:* series as its metrics listener exports them (labelled by replica), and its scrape gauge."""
    first = replica == 0
    labels = {"model_name": MODEL["model"], "engine": "0", "replica": str(replica)}
    series = [
        ("vllm:num_requests_running", labels, gauge(4 if first else 2)),
        ("vllm:num_requests_waiting", labels, gauge(1 if first else 0)),
        ("vllm:kv_cache_usage_perc", labels, gauge(0.5 if first else 0.25)),
        ("vllm:generation_tokens_total", labels, counter(1200 if first else 600)),
        ("vllm:prompt_tokens_total", labels, counter(300 if first else 60)),
        ("vllm:prefix_cache_hits_total", labels, counter(30 if first else 0)),
        ("vllm:prefix_cache_queries_total", labels, counter(60)),
        ("airlock_engine_scrape_ok", {"replica": str(replica)}, gauge(1)),
    ]
    series += histogram("vllm:time_to_first_token_seconds", labels, 60, "1.0" if first else "0.5")
    series += histogram("vllm:e2e_request_latency_seconds", labels, 60, "1.0" if first else "0.5")
    return series


def quantile(q: float, lower: float, upper: float) -> float:
    """histogram_quantile's linear interpolation within the one bucket holding every observation."""
    return lower + (upper - lower) * q


# What each query must give: each request and each engine counted once (rates per second).
EXPECTED: dict[tuple[int, str], list[tuple[dict[str, str], float]]] = {
    (2, "A"): [({"status": "200"}, 3.0), ({"status": "503"}, 0.1)],
    (3, "A"): [({}, 0.1 / 3.1)],
    (4, "A"): [({}, 7.0)],
    (4, "B"): [(MODEL, 3.0)],
    (5, "A"): [({"reason": "limits"}, 1.0)],
    (6, "A"): [({"reason": "timeout"}, 0.1)],
    (6, "B"): [({}, 0.2 + 0.1)],  # promtool compares exactly: the float sum Prometheus makes
    (7, "A"): [({}, 7.0)],
    (9, "A"): [({}, quantile(0.5, 0.5, 1))],
    (9, "B"): [({}, quantile(0.95, 0.5, 1))],
    (9, "C"): [({}, quantile(0.99, 0.5, 1))],
    (10, "A"): [({}, quantile(0.5, 0.5, 1))],
    (10, "B"): [({}, quantile(0.95, 0.5, 1))],
    (11, "A"): [({}, quantile(0.5, 0, 0.5))],
    (11, "B"): [({}, quantile(0.95, 0, 0.5))],
    (12, "A"): [({"stage": "before_forward"}, quantile(0.5, 0, 0.5))],
    (12, "B"): [({"stage": "before_forward"}, quantile(0.99, 0, 0.5))],
    (13, "A"): [(MODEL, 30.0)],
    (13, "B"): [({}, quantile(0.5, 0.5, 1))],
    (14, "A"): [(MODEL, 10.0)],
    (16, "A"): [({"replica": "0"}, 1.0), ({"replica": "1"}, 1.0)],
    (16, "B"): [({}, 1.0)],
    (17, "A"): [({"replica": "0"}, 5.0), ({"replica": "1"}, 1.0)],
    (17, "B"): [({"replica": "0"}, 16.0), ({"replica": "1"}, 16.0)],
    (18, "A"): [({"replica": "0"}, 1.0), ({"replica": "1"}, 1.0)],
    (20, "A"): [({"replica": "0"}, 4.0), ({"replica": "1"}, 2.0)],
    (20, "B"): [({"replica": "0"}, 1.0), ({"replica": "1"}, 0.0)],
    (21, "A"): [({"replica": "0"}, 0.5), ({"replica": "1"}, 0.25)],
    (22, "A"): [({"replica": "0"}, 20.0), ({"replica": "1"}, 10.0)],
    (22, "B"): [({"replica": "0"}, 5.0), ({"replica": "1"}, 1.0)],
    (23, "A"): [({"replica": "0"}, quantile(0.95, 0.5, 1)), ({"replica": "1"}, quantile(0.95, 0, 0.5))],
    (24, "A"): [({"replica": "0"}, quantile(0.95, 0.5, 1)), ({"replica": "1"}, quantile(0.95, 0, 0.5))],
    (25, "A"): [({"replica": "0"}, 0.5), ({"replica": "1"}, 0.0)],
    (27, "A"): [({"instance": GATEWAYS[0]["instance"]}, 1e8), ({"instance": GATEWAYS[1]["instance"]}, 2e8)],
    (28, "A"): [({"instance": GATEWAYS[0]["instance"]}, 0.1), ({"instance": GATEWAYS[1]["instance"]}, 0.2)],
    (30, "A"): [({"outcome": "rendered"}, 1.0), ({"outcome": "unprocessable"}, 0.1)],
    (30, "B"): [({}, 2.0)],
    (31, "A"): [({}, quantile(0.5, 0, 0.5))],
    (31, "B"): [({}, quantile(0.95, 0, 0.5))],
}


def dashboard_queries() -> dict[tuple[int, str], str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = {(panel["id"], target["refId"]): target["expr"]
               for panel in panels for target in panel.get("targets", [])}
    assert len(queries) >= 30
    return {key: expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*")
            for key, expr in queries.items()}


def series_text(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


# Where the engines' vllm:* series (and airlock_engine_scrape_ok) come from:
# - "chart": each engine pod's listener, once (the gateways: metrics.engine_series false);
# - "gateways": each of the two gateway pods re-exports every engine (metrics.engine_series true with two gateways);
# - "both": the engine pods and both gateways (a chart whose gateway.settings turn engine_series back on);
# - "systemd": one gateway re-exports them (airlock up / airlock gateway with engine_series true), scraped by a
#   static job with no Kubernetes labels. One gateway sees only its own traffic, so there only the engine panels are
#   compared (each engine counted once, as in the chart).
SYSTEMD = {"job": "airlock", "instance": "127.0.0.1:9464"}
SCENARIOS = ("chart", "gateways", "both", "systemd")
ENGINE_PANELS = {18, 20, 21, 22, 23, 24, 25}


def input_series(scenario: str) -> list[dict[str, str]]:
    scraped: Series = []
    gateways = [SYSTEMD] if scenario == "systemd" else GATEWAYS
    for pod, target in enumerate(gateways):
        scraped += [(name, {**labels, **target}, values) for name, labels, values in gateway_series(pod)]
        if scenario != "chart":  # what a gateway with metrics.engine_series: true exports
            scraped += [(name, {**labels, **target}, values) for replica in (0, 1)
                        for name, labels, values in engine_series(replica)]
    if scenario in ("chart", "both"):
        for replica, target in enumerate(ENGINES):
            scraped += [(name, {**labels, **target}, values) for name, labels, values in engine_series(replica)]
    return [{"series": series_text(name, labels), "values": values} for name, labels, values in scraped]


def expression_tests(scenario: str) -> list[dict[str, Any]]:
    queries = dashboard_queries()
    assert set(queries) == set(EXPECTED), "every dashboard query has its expected values here, and no other"
    return [{"expr": expr, "eval_time": "10m",
             "exp_samples": [{"labels": series_text("", labels), "value": value} for labels, value in EXPECTED[key]]}
            for key, expr in sorted(queries.items()) if scenario != "systemd" or key[0] in ENGINE_PANELS]


def test_every_dashboard_query_counts_each_request_and_each_engine_once(tmp_path: Path) -> None:
    """promtool evaluates each query at 10 minutes over the series above; any double count fails its
    expected value, wherever the engines' series come from (the chart's engine pods, gateways that re-export them,
    both, or the one gateway of a systemd install)."""
    tests = [{"interval": "1m", "input_series": input_series(scenario), "promql_expr_test": expression_tests(scenario)}
             for scenario in SCENARIOS]
    assert len(tests[-1]["promql_expr_test"]) == 9  # the systemd scenario: every engine query
    unit = tmp_path / "dashboard-test.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
    run_promtool("test", "rules", str(unit))


def test_the_old_engine_panels_would_have_double_counted(tmp_path: Path) -> None:
    """The test above can fail: the panels as they were (sum by replica over every scrape target) give twice the
    value when both gateways export the engines' series."""
    old = 'sum by (replica) (vllm:num_requests_running)'
    tests = [{"interval": "1m", "input_series": input_series("gateways"), "promql_expr_test": [
        {"expr": old, "eval_time": "10m",
         "exp_samples": [{"labels": '{replica="0"}', "value": 8}, {"labels": '{replica="1"}', "value": 4}]}]}]
    unit = tmp_path / "old-panel-test.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
    run_promtool("test", "rules", str(unit))


# --- the chart's monitoring objects -------------------------------------------------------------------------------

def test_service_monitors_scrape_the_gateways_and_each_engine_once_with_timeout_and_relabelings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = render(MONITORING)
    monitors = {m["metadata"]["labels"]["app.kubernetes.io/component"]: m for m in of_kind(documents, "ServiceMonitor")}
    assert set(monitors) == {"gateway", "engine"}
    wanted = MONITORING["metrics"]["serviceMonitor"]
    for component, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "15s",
                            "relabelings": wanted["relabelings"], "metricRelabelings": wanted["metricRelabelings"]}
    services = {s["metadata"]["name"]: s for s in of_kind(documents, "Service")}
    deployments = {d["metadata"]["name"]: d for d in of_kind(documents, "Deployment")}
    configs = {c["metadata"]["name"]: c for c in of_kind(documents, "ConfigMap")}
    gateway_settings = yaml.safe_load(configs[f"{RELEASE}-gateway"]["data"]["airlock.yaml"])
    assert gateway_settings["metrics"]["engine_series"] is False  # the gateways leave the engines' series out
    engine_config = tmp_path / "airlock.yaml"
    engine_config.write_text(configs[f"{RELEASE}-engine"]["data"]["airlock.yaml"])
    for index in (0, 1):
        name = f"{RELEASE}-engine-{index}"
        service = services[name]
        assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"
        assert {"name": "metrics", "port": 9465, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 9465, "protocol": "TCP"} in container["ports"]
        # The engine pod's settings as `airlock engine` reads them (the ConfigMap, then the environment).
        for item in container["env"]:
            if item["name"].startswith("AIRLOCK_"):
                monkeypatch.setenv(item["name"], item["value"])
        settings = load_settings(engine_config)
        assert (settings.engine.metrics_port, settings.engine.metrics_host) == (9465, "0.0.0.0")
        assert settings.engine.metrics_replica_offset == index  # the replica label the gateway gives it
    gateway_names = {u["url"] for u in gateway_settings["upstreams"]}
    assert gateway_names == {f"https://{RELEASE}-engine-{i}:8100" for i in (0, 1)}  # upstream i is replica i


def test_the_engines_metrics_port_is_open_to_metrics_from_only_by_a_policy_of_its_own() -> None:
    documents = render(MONITORING)
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(documents, "NetworkPolicy")}
    policy = policies[f"{RELEASE}-engine-metrics"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert policy["policyTypes"] == ["Ingress"]  # the engines' empty egress stays theirs
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 9465, "protocol": "TCP"}]
    assert rule["from"] == merged({})["networkPolicy"]["metricsFrom"]
    # The engine's own port stays for the gateway alone.
    (engine_rule,) = policies[f"{RELEASE}-engine"]["ingress"]
    assert engine_rule["ports"] == [{"port": 8100, "protocol": "TCP"}]
    assert not [p for p in of_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")]


def test_the_dashboard_config_map_is_the_shipped_file_labelled_for_grafanas_sidecar() -> None:
    (dashboard,) = [c for c in of_kind(render(MONITORING), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    meta = dashboard["metadata"]
    assert meta["namespace"] == "monitoring" and meta["annotations"] == {"grafana_folder": "Airlock"}
    assert meta["labels"]["grafana_dashboard"] == "1" and meta["labels"]["team"] == "ml"
    assert dashboard["data"]["airlock-dashboard.json"] == DASHBOARD.read_text()
    for document in render(MONITORING):  # the new and changed objects too (custom resources are checked above)
        if document["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
    custom = render({"metrics": {"grafanaDashboard": {"enabled": True, "label": "dashboards",
                                                      "labelValue": "airlock"}}})
    (other,) = [c for c in of_kind(custom, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert other["metadata"]["labels"]["dashboards"] == "airlock" and other["metadata"]["namespace"] == "airlock"
    # Off by default, as the ServiceMonitors and the PrometheusRule: each needs something the cluster may not have.
    defaults = render({})
    assert not [c for c in of_kind(defaults, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert not of_kind(defaults, "PrometheusRule") and not of_kind(defaults, "ServiceMonitor")


@pytest.mark.parametrize(("overrides", "where"), [
    ({"metrics": {"serviceMonitor": {"scrapeTimeout": "ten seconds"}}}, "scrapeTimeout"),
    ({"metrics": {"serviceMonitor": {"relabelings": "drop"}}}, "relabelings"),
    ({"metrics": {"prometheusRule": {"additionalGroups": [{"rules": []}]}}}, "name"),
    ({"metrics": {"grafanaDashboard": {"label": ""}}}, "label"),
    ({"metrics": {"grafanaDashboard": {"folder": "Airlock"}}}, "folder"),
    ({"metrics": {"enginePort": 80}}, "enginePort"),
])
def test_the_schema_refuses_bad_monitoring_values(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmError) as refused:
        helm.Chart.load(CHART).validate_schema(merged(overrides))
    assert where in str(refused.value)


def test_the_engine_metrics_port_must_not_be_the_engines_own() -> None:
    with pytest.raises(helm.HelmError, match=r"metrics\.enginePort must differ from engine\.port"):
        render({"metrics": {"enginePort": 8100}})


def monitoring_yaml_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Monitoring\n"):readme.index("\n## Command line\n")]
    return re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_monitoring_values_render_as_written(tmp_path: Path) -> None:
    (values,) = [block for block in monitoring_yaml_blocks() if "grafanaDashboard" in block]
    parsed = yaml.safe_load(values)
    helm.Chart.load(CHART).validate_schema(merged(parsed))
    documents = render(parsed)
    assert len(of_kind(documents, "ServiceMonitor")) == 2 and of_kind(documents, "PrometheusRule")
    assert [c for c in of_kind(documents, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


def test_the_readme_monitoring_settings_load_as_written(tmp_path: Path) -> None:
    (engines,) = [block for block in monitoring_yaml_blocks() if "metrics_replica_offset" in block]
    (gateway,) = [block for block in monitoring_yaml_blocks() if "engine_series: false" in block]
    engine_file, gateway_file = tmp_path / "engines.yaml", tmp_path / "gateway.yaml"
    engine_file.write_text(engines)
    gateway_file.write_text(gateway)
    assert load_settings(engine_file).engine.metrics_port == 9465
    assert load_settings(gateway_file).metrics.engine_series is False


def test_the_readme_points_at_the_one_copy_of_the_dashboard_and_alerts() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "helm/airlock/files/airlock-dashboard.json" in readme and "helm/airlock/files/airlock-alerts.yaml" in readme
    assert not (ROOT / "deploy" / "grafana").exists() and not (ROOT / "deploy" / "prometheus").exists()


# --- Values Prometheus or the pod would refuse later (newcomer review of issue 18) ---------------------------------


@pytest.mark.parametrize(("interval", "timeout"), [("30s", "1m"), ("1m", "1m30s"), ("1m30s", "91s"),
                                                   ("500ms", "1s"), ("1h", "1h1ms")])
def test_a_scrape_timeout_longer_than_the_interval_is_refused(interval: str, timeout: str) -> None:
    """Prometheus refuses a scrape_timeout greater than the scrape_interval (prometheus/config/config.go:
    "scrape timeout greater than scrape interval"); the operator would pass it on and the scrape config be dropped."""
    with pytest.raises(helm.HelmError, match=r"scrapeTimeout .* longer than .*interval"):
        render({"metrics": {"serviceMonitor": {"enabled": True, "interval": interval, "scrapeTimeout": timeout}}})


@pytest.mark.parametrize(("interval", "timeout"), [("1m30s", "1m"), ("30s", "30s"), ("2m", "90s"), ("1h", "59m59s"),
                                                   ("1d", "1h"), ("1s", "999ms")])
def test_prometheus_durations_within_the_interval_render(interval: str, timeout: str) -> None:
    documents = render({"metrics": {"serviceMonitor": {"enabled": True, "interval": interval,
                                                       "scrapeTimeout": timeout}}})
    for monitor in of_kind(documents, "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (interval, timeout)


@pytest.mark.parametrize("duration", ["0s", "1m1h", "1.5m", ""])
def test_a_duration_prometheus_cannot_parse_is_refused(duration: str) -> None:
    with pytest.raises(helm.HelmError, match="interval"):
        render({"metrics": {"serviceMonitor": {"enabled": True, "interval": duration, "scrapeTimeout": "1s"}}})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"metrics": {"port": 8000}}, r"metrics\.port 8000 is the gateway's API port"),
    ({"metrics": {"port": 8443}, "gateway": {"service": {"port": 8443}}},
     r"metrics\.port 8443 is the gateway's API port"),
])
def test_the_gateway_metrics_port_must_not_be_its_api_port(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(overrides)


def test_the_gateway_metrics_port_may_equal_an_engine_port_on_other_pods() -> None:
    """The gateway's ports and the engines' are on different pods and Services: no duplicate."""
    documents = render({"metrics": {"port": 8100}})
    for kind in ("Deployment", "Service"):
        for document in of_kind(documents, kind):
            spec = document["spec"]
            ports = [p.get("containerPort", p.get("port")) for container in (
                spec["template"]["spec"]["containers"] if kind == "Deployment" else [spec])
                for p in container.get("ports", [])]
            assert len(ports) == len(set(ports)), document["metadata"]["name"]


@pytest.mark.parametrize(("setting", "value", "instead"), [
    ("port", 9999, "metrics.port"),
    ("engine_series", True, "metrics.enginePort"),
    ("listener", "main", "ServiceMonitor"),
    ("host", "127.0.0.1", "ServiceMonitor"),
])
def test_metrics_settings_the_chart_owns_are_refused_not_overridden(setting: str, value: Any, instead: str) -> None:
    with pytest.raises(helm.HelmError) as error:
        render({"gateway": {"settings": {"metrics": {setting: value}}}})
    assert f"gateway.settings.metrics.{setting} is set by the chart" in str(error.value)
    assert instead in str(error.value)


def test_other_metrics_settings_still_reach_the_gateway() -> None:
    documents = render({"gateway": {"settings": {"metrics": {"engine_timeout_s": 3.0, "groups": ["ops"]}}}})
    (config,) = [c for c in of_kind(documents, "ConfigMap") if c["metadata"]["name"] == "airlock-gateway"]
    metrics = yaml.safe_load(config["data"]["airlock.yaml"])["metrics"]
    assert metrics["engine_timeout_s"] == 3.0 and metrics["port"] == 9464 and metrics["engine_series"] is False


def test_the_readme_systemd_scrape_config_reaches_the_3a_gateway(tmp_path: Path) -> None:
    """The prometheus.yml of "Where /metrics lives" scrapes the gateway of section 3a as it is set up there: HTTPS
    on its port, with the CA that issued its certificate, and an API key (/metrics on the main listener needs a
    sign-in); promtool checks the file, with the files it names in place."""
    readme = (ROOT / "README.md").read_text()
    section_3a = readme[readme.index("### 3a. Bare metal (systemd)"):readme.index("### 3b. Kubernetes (Helm)")]
    (gateway_block,) = [b for b in re.findall(r"```yaml\n(.*?)```", section_3a, flags=re.DOTALL)
                        if b.startswith("gateway:")]
    gateway = yaml.safe_load(gateway_block)
    assert "metrics" not in gateway  # the main listener: sign-in and TLS as the API
    (block,) = [b for b in monitoring_yaml_blocks() if b.startswith("# prometheus.yml")]
    (job,) = yaml.safe_load(block)["scrape_configs"]
    assert job["scheme"] == "https"
    (target,) = job["static_configs"][0]["targets"]
    assert target.endswith(f":{gateway['gateway']['port']}")
    ca_file = Path(job["tls_config"]["ca_file"])
    key_file = Path(job["authorization"]["credentials_file"])
    assert "IPAddressAllow=" in readme[readme.index("\n## Monitoring\n"):readme.index("**Each engine counted once.**")]
    # promtool resolves the files: check the config with them moved under tmp_path.
    for path in (ca_file, key_file):
        (tmp_path / path.name).write_text("placeholder\n")
    job["tls_config"]["ca_file"] = str(tmp_path / ca_file.name)
    job["authorization"]["credentials_file"] = str(tmp_path / key_file.name)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    run_promtool("check", "config", str(config))
