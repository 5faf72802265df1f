#!/usr/bin/env python3
"""Checks kgpool's dashboard, alert rules and /metrics exposition against contract-metrics.txt.

    obscheck.py queries DASHBOARD.json ALERTS.yml   # every query uses only contract metric names
    obscheck.py exposition METRICS.txt              # /metrics text has every contract family
    obscheck.py dashboard DASHBOARD.json            # Grafana structure: ids, grid, datasource

Standard library only, so it runs under any python3 (CI, the operator's laptop, the e2e test,
which imports it). Exit status 0 = clean, 1 = problems (printed one per line).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTRACT = HERE / "contract-metrics.txt"

# Metric families outside the contract that queries may use.
EXTRA_PREFIXES = ("process_", "python_")
EXTRA_NAMES = {"up"}

# PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS = set(
    """
abs absent absent_over_time avg avg_over_time bool bottomk by ceil changes clamp clamp_max
clamp_min count count_over_time count_values day_of_month day_of_week day_of_year days_in_month
delta deriv exp floor group group_left group_right histogram_count histogram_fraction
histogram_quantile histogram_sum holt_winters hour idelta ignoring increase irate label_join
label_replace last_over_time ln log10 log2 max max_over_time min min_over_time minute month
offset on or and unless predict_linear present_over_time quantile quantile_over_time rate
resets round scalar sgn sort sort_desc sqrt stddev stddev_over_time stdvar stdvar_over_time
sum sum_over_time time timestamp topk vector without year inf nan atan2
label_values label_names metrics query_result
""".split()  # noqa: SIM905 (a word list reads better as text)
)


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    labels: tuple[str, ...]
    allowed: dict[str, frozenset[str]]

    def sample_names(self) -> set[str]:
        if self.type == "histogram":
            return {self.name + s for s in ("_bucket", "_sum", "_count")}
        return {self.name}


def load_contract(path: Path = CONTRACT) -> dict[str, Family]:
    families = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, mtype, labels, *constraints = line.split()
        allowed = {}
        for c in constraints:
            key, _, values = c.partition("=")
            allowed[key] = frozenset(values.split("|"))
        families[name] = Family(name, mtype, tuple(labels.split(",")) if labels != "-" else (),
                                allowed)
    return families


def allowed_names(contract: dict[str, Family]) -> set[str]:
    names = set(EXTRA_NAMES)
    for fam in contract.values():
        names |= fam.sample_names()
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana label_values()) refers to."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"\blabel_values\s*\(([^,)]*),[^)]*\)", r"(\1)", s)  # label name argument
    s = re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?[smhdwy]?", " ", s)  # numbers and durations
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", s))
    return {w for w in words if w.lower() not in PROMQL_WORDS}


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and templating query in a Grafana dashboard."""
    dash = json.loads(path.read_text())
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('id')} {p.get('title')!r}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            out.append((f"variable {v.get('name')}", q or v.get("definition", "")))
    return out


def alert_exprs(path: Path) -> list[tuple[str, str]]:
    """(alert, expr) from a rules file as written in this directory: `expr:` is either inline
    or a `|` block indented deeper than the key. Avoids needing PyYAML."""
    out: list[tuple[str, str]] = []
    lines = path.read_text().splitlines()
    name = "?"
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*- (?:alert|record):\s*(\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest in ("|", "|-", ">", ">-"):
                body = []
                i += 1
                while i < len(lines) and (not lines[i].strip()
                                          or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    body.append(lines[i])
                    i += 1
                out.append((name, "\n".join(body)))
                continue
            out.append((name, rest.strip("'\"")))
        i += 1
    return out


def check_queries(dashboard: Path, alerts: Path) -> list[str]:
    contract = load_contract()
    allowed = allowed_names(contract)
    problems = []
    queries = [(f"{dashboard.name}: {w}", e) for w, e in dashboard_queries(dashboard)]
    queries += [(f"{alerts.name}: {w}", e) for w, e in alert_exprs(alerts)]
    if not queries:
        problems.append("no queries found")
    for where, expr in queries:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric name in {expr!r}")
        for n in sorted(names):
            if n not in allowed and not n.startswith(EXTRA_PREFIXES):
                problems.append(f"{where}: {n!r} is not a contract metric (query {expr!r})")
    used = set().union(*(metric_names(e) for _, e in queries)) if queries else set()
    for fam in contract.values():
        if not fam.sample_names() & used:
            problems.append(f"contract metric {fam.name} is used by no panel or alert")
    print(f"{len(queries)} queries checked against {len(contract)} contract families")
    return problems


def check_dashboard(path: Path) -> list[str]:
    """What Grafana would silently get wrong: duplicate ids, overlapping or off-grid panels,
    a hard-coded datasource instead of the ${DS_PROMETHEUS} variable, targets without refId."""
    dash = json.loads(path.read_text())
    problems = []
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        problems.append(f"schemaVersion {dash.get('schemaVersion')!r} (want >= 36)")
    names = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    if "DS_PROMETHEUS" not in names:
        problems.append("no DS_PROMETHEUS datasource variable")
    seen_ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for p in dash.get("panels", []):
        title = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in seen_ids:
            problems.append(f"{title}: duplicate id")
        seen_ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            problems.append(f"{title}: bad gridPos {g}")
            continue
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"{title} overlaps {cells[(x, y)]}")
                    break
                cells[(x, y)] = title
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        refs = [t.get("refId") for t in p.get("targets", [])]
        if not refs or None in refs or len(set(refs)) != len(refs):
            problems.append(f"{title}: targets need unique refIds, got {refs}")
        for obj in [p] + p.get("targets", []):
            ds = obj.get("datasource")
            if ds != {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}:
                problems.append(f"{title}: datasource {ds!r} is not the DS_PROMETHEUS variable")
    return problems


# ---- exposition --------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> tuple[dict[str, str], list[Sample]]:
    """(TYPE by family name, samples) of Prometheus text format 0.0.4."""
    types: dict[str, str] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, mtype = line.split(None, 3)
            types[name] = mtype.strip()
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            if not m:
                raise ValueError(f"unparsable sample line: {line!r}")
            labels = dict(_LABEL.findall(m.group(3) or ""))
            samples.append(Sample(m.group(1), labels, float(m.group(4))))
    return types, samples


def type_name(fam: Family) -> str:
    """The name a `# TYPE` line uses: prometheus_client writes counters without `_total`."""
    if fam.type == "counter" and fam.name.endswith("_total"):
        return fam.name[: -len("_total")]
    return fam.name


def check_exposition(text: str) -> list[str]:
    contract = load_contract()
    types, samples = parse_exposition(text)
    problems = []
    for fam in contract.values():
        tname = type_name(fam)
        declared = types.get(tname) or types.get(fam.name)
        if declared is None:
            problems.append(f"{fam.name}: no '# TYPE' line (family missing)")
            continue
        if declared != fam.type:
            problems.append(f"{fam.name}: type {declared}, contract says {fam.type}")
        mine = [s for s in samples if s.name in fam.sample_names()]
        if not mine:
            problems.append(f"{fam.name}: declared but has no sample")
        for s in mine:
            keys = set(s.labels) - {"le"}
            if keys != set(fam.labels):
                problems.append(f"{s.name}{s.labels}: labels {sorted(keys)}, "
                                f"contract says {sorted(fam.labels)}")
            for key, values in fam.allowed.items():
                if key in s.labels and s.labels[key] not in values:
                    problems.append(f"{s.name}: {key}={s.labels[key]!r} is not one of "
                                    f"{sorted(values)}")
    for s in samples:
        for key in s.labels:
            if re.search(r"(^|_)(id|path|url|kernel)$", key):
                problems.append(f"{s.name}: label {key!r} looks unbounded (ids/raw paths)")
        route = s.labels.get("route")
        if route is not None and route != "unmatched" and not route.startswith("/"):
            problems.append(f"{s.name}: route={route!r} is neither a template nor 'unmatched'")
    desired = [s for s in samples if s.name == "kgpool_kernels_desired"]
    build = [s for s in samples if s.name == "kgpool_build_info"]
    if build and any(s.value != 1 for s in build):
        problems.append("kgpool_build_info is not 1")
    if desired and desired[0].value < 1:
        problems.append(f"kgpool_kernels_desired is {desired[0].value}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "queries":
        problems = check_queries(Path(argv[2]), Path(argv[3]))
    elif len(argv) == 3 and argv[1] == "dashboard":
        problems = check_dashboard(Path(argv[2]))
    elif len(argv) == 3 and argv[1] == "exposition":
        problems = check_exposition(Path(argv[2]).read_text())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"  PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
