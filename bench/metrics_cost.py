"""The share of the workers' CPU spent on metrics and JSON-log bookkeeping:
python -m bench.metrics_cost RUN_DIR

RUN_DIR is a `python -m bench --profile ... --env METRICS_TOKEN=...` output
(py-spy collapsed stacks of each worker, active samples only, under load).
A sample counts as metrics/logging work when a frame of app/observability/ or
prometheus_client is on its stack, except the two ASGI wrappers
(`Observability.__call__`, `WebsocketUser.__call__`), which sit under every
request and socket for its whole life: those count only when they are the
innermost frame (their own work). Unlike a with/without comparison of two
runs, this does not depend on what other jobs do to the machine meanwhile.
Writes RUN_DIR/metrics-share.json and prints the figure.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.profile import load

WRAPPERS = ("Observability.__call__", "WebsocketUser.__call__")


def ours(frame: str) -> bool:
    frame = frame.strip()
    if "prometheus_client" in frame:
        return True
    return "app/observability/" in frame and not frame.startswith(WRAPPERS)


def share(run: Path) -> dict:
    files = sorted(run.glob("profile-*.txt"))
    if not files:
        raise SystemExit(f"no profile-*.txt in {run}: run the benchmark with --profile")
    stacks = load(files)
    total = sum(stacks.values())
    counted = sum(n for stack, n in stacks.items()
                  if any(ours(f) for f in stack.split(";")) or stack.split(";")[-1].strip().startswith(WRAPPERS))
    results = json.loads((run / "results.json").read_text())
    load_ = float(files[0].name.split("-")[-2])  # profile-<config>-<offered load>-<pid>.txt
    step = next(s for c in results["configs"] for s in c["steps"] if s["offered_deliveries_per_s"] == load_)
    return {"samples": total, "metrics_samples": counted, "percent": round(100 * counted / total, 2),
            "files": [f.name for f in files], "extra_env": sorted(results["configs"][0].get("extra_env", {})),
            "offered_deliveries_per_s": step["offered_deliveries_per_s"], "delivered_per_s": step["delivered_per_s"],
            "other_cores": step.get("other_cores")}


def main(argv=None):
    run = Path((argv or sys.argv[1:])[0])
    figure = share(run)
    (run / "metrics-share.json").write_text(json.dumps(figure, indent=1) + "\n")
    print(f"{figure['metrics_samples']} of {figure['samples']} worker samples ({figure['percent']:.2f} %) in metrics and "
          f"log bookkeeping at {figure['offered_deliveries_per_s']:,.0f} offered deliveries/s")


if __name__ == "__main__":
    main()
