#!/usr/bin/env python3
"""Generates kgpool-dashboard.json (Grafana, schemaVersion 39) from the panel list below.

    python3 deploy/grafana/make_dashboard.py           # rewrite kgpool-dashboard.json
    python3 deploy/grafana/make_dashboard.py --check   # exit 1 if the JSON is out of date

The JSON is committed so operators can import or provision it without running anything; edit
this file, not the JSON, and regenerate. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("kgpool-dashboard.json")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = 'job=~"$job", instance=~"$instance"'
RSEL = SEL + ', route=~"$route"'
QUANTILES = (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99"))

Panel = dict[str, Any]


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


def timeseries(title: str, desc: str, unit: str, targets: list[tuple[str, str]], *,
               stack: bool = False, bars: bool = False, w: int = 12, h: int = 8,
               min0: bool = True) -> Panel:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else (25 if stack else 5),
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if min0:
        defaults["min"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": [target(e, leg, chr(ord("A") + i)) for i, (e, leg) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "_size": (w, h),
    }


def stat(title: str, desc: str, unit: str, expr: str, legend: str = "",
         thresholds: list[tuple[float | None, str]] | None = None, decimals: int | None = None,
         w: int = 4) -> Panel:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    defaults: dict[str, Any] = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps},
                                "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": [target(expr, legend, "A")],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto",
                    "justifyMode": "auto", "orientation": "auto"},
        "_size": (w, 4),
    }


def quantiles(metric: str, by: str = "", sel: str = SEL) -> list[tuple[str, str]]:
    """p50/p90/p99 of a histogram, optionally split by a label."""
    keys = f"le, {by}" if by else "le"
    legend_by = f"{{{{{by}}}}} " if by else ""
    return [((f"histogram_quantile({q}, sum by ({keys}) "
             f"(rate({metric}_bucket{{{sel}}}[$__rate_interval])))"), f"{legend_by}{name}")
            for name, q in QUANTILES]


def unstacked_dashed(panel: Panel, series: str) -> Panel:
    """Draws one series of a stacked panel as a dashed reference line on top."""
    panel["fieldConfig"]["overrides"].append({
        "matcher": {"id": "byName", "options": series},
        "properties": [
            {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
            {"id": "custom.fillOpacity", "value": 0},
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        ],
    })
    return panel


def build_info_table() -> Panel:
    """One row per instance: which kgpool and Python versions run where."""
    return {
        "type": "table",
        "title": "Build info",
        "description": "kgpool_build_info: which version runs where.",
        "datasource": DS,
        "targets": [{**target(f"kgpool_build_info{{{SEL}}}", "", "A"),
                     "range": False, "instant": True, "format": "table"}],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm"},
        "transformations": [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True, "__name__": True},
            "indexByName": {}, "renameByName": {}}}],
        "_size": (8, 8),
    }


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


def panels() -> list[Panel]:
    req = f"kgpool_http_requests_total{{{RSEL}}}"
    return [
        row("Overview"),
        stat("Requests / s", "All requests, every route and status.", "reqps",
             f"sum(rate({req}[$__rate_interval]))", decimals=2),
        stat("5xx ratio", "Share of requests answered 5xx (500 cell raised, 502 kernel died, "
             "503 queue full/draining, 504 deadline).", "percentunit",
             f'sum(rate(kgpool_http_requests_total{{{RSEL}, code=~"5.."}}[$__rate_interval])) '
             f"/ sum(rate({req}[$__rate_interval]))",
             thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")], decimals=1),
        stat("p99 latency", "99th percentile of total request time (queue wait + execution).",
             "s", "histogram_quantile(0.99, sum by (le) (rate(kgpool_http_request_duration_seconds"
             f"_bucket{{{RSEL}}}[$__rate_interval])))", decimals=3),
        stat("Warm kernels", "Kernels idle or busy (able to serve), summed over instances.",
             "none", f'sum(kgpool_kernels{{{SEL}, state=~"idle|busy"}})',
             thresholds=[(None, "red"), (1, "green")]),
        stat("Kernels wanted", "kgpool_kernels_desired (--kernels), summed over instances.",
             "none", f"sum(kgpool_kernels_desired{{{SEL}}})"),
        stat("Queue depth", "Requests waiting for a kernel now.", "none",
             f"sum(kgpool_queue_depth{{{SEL}}})",
             thresholds=[(None, "green"), (1, "orange")]),

        row("Traffic"),
        timeseries("Throughput by route and status",
                   "Requests per second, by route template and HTTP status code.", "reqps",
                   [(f"sum by (route, code) (rate({req}[$__rate_interval]))",
                     "{{route}} {{code}}")], stack=True),
        timeseries("Errors by route and status",
                   "Non-2xx responses per second. 404 on route \"unmatched\" are unknown paths.",
                   "reqps",
                   [((f'sum by (route, code) (rate(kgpool_http_requests_total{{{RSEL}, '
                     f'code!~"2.."}}[$__rate_interval]))'), "{{route}} {{code}}")], stack=True),

        row("Latency"),
        timeseries("Request latency p50 / p90 / p99",
                   "Total time in kgpool per request (queue wait + execution), from "
                   "kgpool_http_request_duration_seconds.", "s",
                   quantiles("kgpool_http_request_duration_seconds", sel=RSEL)),
        timeseries("Request latency p99 by route", "Slowest routes first in the legend.", "s",
                   [((f"histogram_quantile(0.99, sum by (le, route) (rate("
                     f"kgpool_http_request_duration_seconds_bucket{{{RSEL}}}[$__rate_interval])))"),
                     "{{route}}")]),
        timeseries("Execution time p50 / p90 / p99 by route",
                   "Time the kernel spent running the endpoint cell (no queue wait).", "s",
                   quantiles("kgpool_execution_duration_seconds", by="route", sel=RSEL), w=24),

        row("Queue"),
        timeseries("Queue depth and capacity",
                   "Requests waiting for a kernel, against --max-queue. Requests beyond the "
                   "capacity get 503.", "none",
                   [(f"sum by (instance) (kgpool_queue_depth{{{SEL}}})", "depth {{instance}}"),
                    (f"sum by (instance) (kgpool_queue_capacity{{{SEL}}})",
                     "capacity {{instance}}")], w=8),
        timeseries("Queue wait p50 / p90 / p99",
                   "Time a request waited for a free kernel.", "s",
                   quantiles("kgpool_queue_wait_seconds"), w=8),
        timeseries("Requests in flight", "Requests inside kgpool, queued or running.", "none",
                   [(f"sum by (instance) (kgpool_requests_in_flight{{{SEL}}})", "{{instance}}")],
                   w=8),
        timeseries("Rejections by reason",
                   "Requests refused with 503 before reaching a kernel: queue_full, draining "
                   "(shutting down), not_ready (no warm kernel).", "reqps",
                   [((f"sum by (reason) (rate(kgpool_requests_rejected_total{{{SEL}}}"
                     f"[$__rate_interval]))"), "{{reason}}")], stack=True, w=24),

        row("Kernels"),
        unstacked_dashed(timeseries("Kernels by state",
                   "starting / idle / busy / stopping, stacked; the dashed line is "
                   "kgpool_kernels_desired.", "none",
                   [(f"sum by (state) (kgpool_kernels{{{SEL}}})", "{{state}}"),
                    (f"sum(kgpool_kernels_desired{{{SEL}}})", "desired")], stack=True),
                        "desired"),
        timeseries("Kernel restarts by reason",
                   "Kernels replaced per interval: crash, timeout, recycle (planned, "
                   "--max-requests), memory (--max-kernel-memory), init_failed.", "none",
                   [((f"sum by (reason) (increase(kgpool_kernel_restarts_total{{{SEL}}}"
                     f"[$__rate_interval]))"), "{{reason}}")], stack=True, bars=True),
        timeseries("Kernel start time p50 / p99",
                   "Kernel process start until it answers, from "
                   "kgpool_kernel_start_duration_seconds.", "s",
                   [q for q in quantiles("kgpool_kernel_start_duration_seconds")
                    if q[1] != "p90"]),
        timeseries("Init cells time p50 / p99",
                   "Running the notebook's init cells on a fresh kernel, from "
                   "kgpool_init_duration_seconds.", "s",
                   [q for q in quantiles("kgpool_init_duration_seconds") if q[1] != "p90"]),
        timeseries("Kernel memory",
                   "Private memory of each kernel slot (what --max-kernel-memory limits; "
                   "slot=template: the --fork templates) and the kernels' total PSS (what "
                   "they cost together, shared pages counted once).", "bytes",
                   [((f'sum by (slot) (kgpool_kernel_memory_bytes{{{SEL}, kind="private"}})'),
                     "private {{slot}}"),
                    (f'sum(kgpool_kernel_memory_bytes{{{SEL}, kind="pss"}})', "total pss")],
                   w=24),
        unstacked_dashed(timeseries("Elastic pool: floor, wanted, ceiling",
                   "kgpool_kernels_min (--kernels), kgpool_kernels_desired (what the pool "
                   "aims at now) and kgpool_kernels_max (--max-kernels), summed over "
                   "instances.", "none",
                   [(f"sum(kgpool_kernels_min{{{SEL}}})", "floor"),
                    (f"sum(kgpool_kernels_desired{{{SEL}}})", "wanted"),
                    (f"sum(kgpool_kernels_max{{{SEL}}})", "ceiling")], w=8), "ceiling"),
        timeseries("Pool resizes",
                   "Kernels added (up: requests waited past --scale-up-delay) or retired "
                   "(down: idle past --idle-timeout) per interval.", "none",
                   [((f"sum by (direction, reason) (increase(kgpool_pool_resizes_total"
                     f"{{{SEL}}}[$__rate_interval]))"), "{{direction}} ({{reason}})")],
                   stack=True, bars=True, w=8),
        timeseries("Kernel exits by status",
                   "Kernels that exited on their own, per interval, by exit status: "
                   "signal 9 (SIGKILL) is usually the out-of-memory killer.", "none",
                   [((f"sum by (status) (increase(kgpool_kernel_exits_total{{{SEL}}}"
                     f"[$__rate_interval]))"), "{{status}}")], stack=True, bars=True, w=8),

        row("Process"),
        timeseries("kgpool CPU", "CPU of the kgpool server process (kernels are separate "
                   "processes and not included).", "percentunit",
                   [(f"rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])",
                     "{{instance}}")], w=8),
        timeseries("kgpool resident memory", "RSS of the kgpool server process.", "bytes",
                   [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")], w=8),
        timeseries("Event loop lag p50 / p99",
                   "How late kgpool's event loop ran its timers (kgpool_event_loop_lag_"
                   "seconds): high values mean the server process itself is the bottleneck "
                   "(CPU-bound or blocked), whatever the kernels do.", "s",
                   [q for q in quantiles("kgpool_event_loop_lag_seconds", sel=SEL)
                    if q[1] != "p90"], w=8),
        build_info_table(),
    ]


def layout(items: list[Panel]) -> list[Panel]:
    """Assigns ids and gridPos, filling 24-column rows left to right."""
    x = y = row_h = 0
    for i, p in enumerate(items, start=1):
        w, h = p.pop("_size")
        if x + w > 24 or p["type"] == "row":
            x, y, row_h = 0, y + row_h, 0
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x, row_h = x + w, max(row_h, h)
    return items


def query_var(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "options": [],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "kgpool",
        "title": "kgpool",
        "description": "kgpool: a Jupyter notebook served as a REST API from a pool of warm "
                       "kernels. Metrics: DESIGN.md section 4.",
        "tags": ["kgpool", "jupyter"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": {"list": [
            {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": []},
            query_var("job", "job", "label_values(kgpool_build_info, job)"),
            query_var("instance", "instance",
                      'label_values(kgpool_build_info{job=~"$job"}, instance)'),
            query_var("route", "route",
                      'label_values(kgpool_http_requests_total{job=~"$job"}, route)'),
        ]},
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run {argv[0]}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
