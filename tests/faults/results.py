"""Measured figures of the fault and abuse scenarios.

Each test calls `record(key, scenario=..., checked=..., figure=..., **numbers)`;
the run writes tests/faults/results/latest.json (git-ignored) and
tests/faults/results/README-section.md, and prints the table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DIR = Path(__file__).parent / "results"
_rows: dict[str, dict] = {}


def record(key: str, *, scenario: str, checked: str, figure: str, **numbers) -> None:
    _rows[key] = {"scenario": scenario, "checked": checked, "figure": figure, "numbers": numbers}


def table() -> str:
    if not _rows:
        return ""
    lines = ["| Scenario | What is checked | Measured (last run) |", "|---|---|---|"]
    for row in _rows.values():
        lines.append(f"| {row['scenario']} | {row['checked']} | {row['figure']} |")
    return "\n".join(lines)


def write() -> Path:
    DIR.mkdir(exist_ok=True)
    (DIR / ".gitignore").write_text("*\n")
    path = DIR / "latest.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    merged = {**previous.get("scenarios", {}), **_rows}
    path.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "scenarios": merged}, indent=2))
    lines = ["| Scenario | What is checked | Measured (last run) |", "|---|---|---|"]
    for row in merged.values():
        lines.append(f"| {row['scenario']} | {row['checked']} | {row['figure']} |")
    (DIR / "README-section.md").write_text("\n".join(lines) + "\n")
    return path
