"""deploy/grafana/chat-dashboard.json: every query names only metrics the app
exports, and the panels an on-call person needs are there.

The exported names come from the app itself: a subprocess renders the
exposition exactly as a scrape does in production (multiprocess mode, a
worker that counted and sampled its process), and its sample names
(`chat_delivery_seconds_bucket`, `..._total`, ...) are what a query may name.
The metric names of a PromQL expression are read by removing what is not a
metric (strings, label matchers, ranges, `by (...)` lists, function and
aggregation names, keywords, numbers, Grafana variables); a misspelled name
planted in a copy of a query must be caught.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.services import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "chat-dashboard.json"

EXPOSITION = r"""
import os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from app.observability import multiproc
multiproc.prepare(sys.argv[1])
from app.observability import metrics
metrics.delivered()
metrics.latency(time.time())
metrics.flush()
metrics.sample_process()
sys.stdout.write(metrics.render()[0].decode())
"""

# PromQL words that are not metric names.
FUNCTIONS_AND_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "atan2", "inf", "nan"}


def exported_names(tmp_path) -> set[str]:
    result = subprocess.run([sys.executable, "-c", EXPOSITION, str(tmp_path / "chat-metrics-test")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {s.name for family in text_string_to_metric_families(result.stdout) for s in family.samples}


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    text = re.sub(r"\{[^{}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word in FUNCTIONS_AND_AGGREGATIONS or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])
            if "expr" in target]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_names(tmp_path_factory.mktemp("exposition"))


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def test_the_parser_reads_the_metric_names():
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(chat_delivery_seconds_bucket[$__rate_interval])))') \
        == {"chat_delivery_seconds_bucket"}
    assert metric_names('sum(rate(x_total{outcome!="accepted", a=~"b|c"}[5m])) / sum(rate(y_total[5m] offset 1h))') \
        == {"x_total", "y_total"}
    assert metric_names("process_open_fds / on (pid) group_left process_max_fds > bool 0.9") \
        == {"process_open_fds", "process_max_fds"}
    assert metric_names('label_replace(up, "a", "$1", "b", "(.*)")') == {"up"}


def test_every_query_names_only_exported_metrics(dashboard, exported):
    assert {"chat_websocket_connections", "chat_deliveries_total", "chat_delivery_seconds_bucket",
            "chat_websocket_handshakes_total", "process_cpu_seconds_total"} <= exported, sorted(exported)
    found = queries(dashboard)
    assert len(found) >= 10, found
    problems = []
    for title, expr in found:
        names = metric_names(expr)
        if not names:
            problems.append(f"{title}: {expr!r} names no metric")
        problems += [f"{title}: {expr!r} names {name}, which the app does not export" for name in names - exported]
        if expr.count("(") != expr.count(")"):
            problems.append(f"{title}: unbalanced parentheses in {expr!r}")
    assert not problems, "\n".join(problems)


def test_a_misspelled_metric_is_caught(dashboard, exported):
    """Negative control: the same check on a copy with one name changed."""
    broken = json.loads(json.dumps(dashboard).replace("chat_deliveries_total", "chat_delivered_total", 1))
    unknown = {name for _, expr in queries(broken) for name in metric_names(expr)} - exported
    assert unknown == {"chat_delivered_total"}, unknown


def test_the_first_panels_an_on_call_person_needs(dashboard):
    named = {name for _, expr in queries(dashboard) for name in metric_names(expr)}
    for needed in ("chat_websocket_connections", "chat_delivery_seconds_bucket", "chat_messages_stored_total",
                   "chat_deliveries_total", "chat_websocket_handshakes_total", "chat_messages_rejected_total",
                   "chat_rate_limited_total", "chat_resync_frames_total", "process_cpu_seconds_total",
                   "process_resident_memory_bytes"):
        assert needed in named, f"no panel shows {needed}"
    # Every panel reads the data source the importer picks, and has a title and a description.
    for panel in panels(dashboard):
        assert panel["title"] and panel.get("description"), panel.get("id")
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), ids
