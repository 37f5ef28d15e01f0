"""deploy/grafana's dashboard uses only metrics the code exports, with labels they carry.

The names and labels come from the real code: the worker's metrics (workers.metrics), the API's
request metrics and its fleet collector (producer.api.metrics, reading a real Redis). A renamed
metric or label breaks this test instead of leaving an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "scalecap-fleet.json"


SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                   "info": ("_info",)}


def _declare(out: dict[str, set[str]], name: str, kind: str, labels: tuple[str, ...]) -> None:
    for suffix in SAMPLE_SUFFIXES.get(kind, ("",)):
        out.setdefault(name + suffix, set()).update(labels, {"le"} if suffix == "_bucket" else ())


def exported(redis_url: str) -> dict[str, set[str]]:
    """{sample name: label names} of every metric the worker and the API declare."""
    from prometheus_client.metrics import MetricWrapperBase

    import workers.metrics as worker_metrics
    from producer.api.metrics import ApiMetrics, FleetCollector
    from producer.client import FleetClient
    from scalecap.settings import Settings

    out: dict[str, set[str]] = {}
    api = ApiMetrics()
    for metric in [*vars(worker_metrics).values(), api.requests, api.latency]:
        if isinstance(metric, MetricWrapperBase):
            _declare(out, metric._name, metric._type, metric._labelnames)
    settings = Settings(broker_url=redis_url)
    for family in FleetCollector(FleetClient(settings), settings, None).collect():  # reads Redis
        _declare(out, family.name, family.type, family._labelnames)
    return out


def expressions(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture
def names(redis_url: str) -> dict[str, set[str]]:
    return exported(redis_url)


def test_dashboard_is_well_formed(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model"}
    for p in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def test_every_query_parses_as_promql(dashboard):
    import promql_parser  # Prometheus' grammar (the promql-parser crate), a dev dependency

    for expr in expressions(dashboard):
        promql_parser.parse(grafana_to_promql(expr))
    with pytest.raises(ValueError):  # the parser does refuse a broken query
        promql_parser.parse("sum by (model (rate(scalecap_worker_images_total[5m]))")


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what Grafana would put there."""
    if expr.startswith("label_values("):  # a Grafana template function, not PromQL
        return expr[len("label_values("):].split(",")[0]
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")


def problems(expr: str, names: dict[str, set[str]]) -> list[str]:
    """What in one PromQL expression names a metric or label the code does not export."""
    metrics = re.findall(r"\bscalecap_[a-z0-9_]+", expr)
    out = [f"{m} is not exported" for m in metrics if m not in names]
    labels_here = set().union(*(names.get(m, set()) for m in metrics))
    used = [label for selector in re.findall(r"\{([^}]*)\}", expr)
            for label in re.findall(r"([a-z_]+)\s*!?=~?", selector)]
    for clause in re.findall(r"\b(?:by|on|group_left)\s*\(([^)]*)\)", expr):
        used += [label for label in re.findall(r"[a-z_]+", clause) if label not in {"job", "instance"}]
    out += [f"label {label} is on none of {metrics}" for label in used if label not in labels_here]
    return out


def test_every_metric_and_label_in_the_dashboard_is_exported(dashboard, names):
    used_metrics = set()
    for expr in expressions(dashboard):
        assert problems(expr, names) == [], expr
        used_metrics.update(re.findall(r"\bscalecap_[a-z0-9_]+", expr))
    # Every worker and API metric the issue asks for has a panel.
    for wanted in ("scalecap_worker_images_total", "scalecap_worker_stage_seconds_bucket",
                   "scalecap_worker_tokens_total", "scalecap_worker_images_in_flight",
                   "scalecap_worker_engine_start_seconds", "scalecap_worker_retries_total",
                   "scalecap_worker_dead_letters_total", "scalecap_api_queue_depth", "scalecap_api_batches",
                   "scalecap_api_requests_total", "scalecap_api_request_duration_seconds_bucket"):
        assert wanted in used_metrics, wanted


@pytest.mark.parametrize("expr", [
    "sum(rate(scalecap_worker_image_total[5m]))",                          # misspelt metric
    "sum(rate(scalecap_api_request_seconds_bucket[5m]))",                  # the API's name is another
    'sum by (route) (rate(scalecap_worker_images_total{model="m"}[5m]))',  # label of another metric
    'scalecap_api_batches{model="m"}',
])
def test_the_check_refuses_what_is_not_exported(names, expr):
    assert problems(expr, names)
    assert problems("sum by (model, outcome) (rate(scalecap_worker_images_total[5m]))", names) == []
