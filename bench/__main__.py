"""python -m bench [--quick | --reference] [options]

--quick      a small run (~1.5 min): 100 clients in 5 rooms, 3 load steps, pubsub vs core on 2 workers,
             500 idle sockets, 300 busy sockets for 9 s, 20 reconnects/s for 9 s; no baseline.
             Checks the harness; its numbers mean little.
--reference  the reference run (`make bench`, ~50 min): issue #13's measurements, each on the baseline
             (--baseline, default the issue's "before" commit) and on this checkout: 1,000 clients in
             50 rooms of 20 on pubsub with 2 workers, offered load 5,000..25,000 deliveries/s (knee, p99
             at 10,000/s); 10,000 busy sockets for 10 min (KiB per busy socket); 200 reconnects/s for
             10 min (RSS slope). Writes bench/results/reference/ and bench/PERFORMANCE.md. Run it on a
             quiet machine.
Any option below overrides the mode's value.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import report
from bench.baseline import ISSUE_BEFORE

HERE = Path(__file__).resolve().parent

MODES = {
    "quick": dict(clients=100, rooms=5, loads=[200, 500, 1000], duration=3.0, drain=2.0, warmup=1.0,
                  configs="pubsub:2,core:2", idle=500, gen_procs=2,
                  busy=300, busy_minutes=0.15, busy_load=1000.0, busy_step=4.5,
                  churn=20.0, churn_minutes=0.15, churn_hold=1.0, churn_sample=1.0, baseline="none"),
    "reference": dict(clients=1000, rooms=50, loads=[5000, 10000, 15000, 20000, 25000],
                      duration=8.0, drain=3.0, warmup=2.0, configs="pubsub:2", idle=0, gen_procs=2,
                      # 2,500/s: 5,000/s with 10,000 sockets overloaded the "before" code on the shared
                      # 2-core machine (2026-12-06: 4,394/s delivered, 800k lost): memory under a growing
                      # backlog is not steady chat.
                      busy=10000, busy_minutes=10.0, busy_load=2500.0, busy_step=30.0,
                      churn=200.0, churn_minutes=10.0, churn_hold=1.0, churn_sample=5.0, baseline=ISSUE_BEFORE),
}


def default_time_limit(a) -> float:
    """Enough for every phase of every checkout, plus start-up and connecting (seconds)."""
    sweep = len(a.configs) * (len(a.loads) * (a.duration + a.drain + 8) + a.warmup + 90)
    per_checkout = (sweep + (180 if a.idle else 0) + (a.busy_minutes * 60 * 1.1 + 240 if a.busy else 0)
                    + (a.churn_minutes * 60 + a.churn_hold + 90 if a.churn else 0))
    return 120 + per_checkout * (2 if a.baseline else 1)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--reference", action="store_const", dest="mode", const="reference")
    p.add_argument("--repo", default=str(HERE.parent), help="checkout to run (default: this one); e.g. a git worktree")
    p.add_argument("--out", help="output directory (default bench/results/<mode> for --reference, else bench/results/<mode>-<time>)")
    p.add_argument("--clients", type=int)
    p.add_argument("--rooms", type=int)
    p.add_argument("--loads", help="offered deliveries/s per step, comma-separated")
    p.add_argument("--duration", type=float, help="seconds of sending per step")
    p.add_argument("--drain", type=float, help="seconds to wait for deliveries after each step (later = lost)")
    p.add_argument("--warmup", type=float)
    p.add_argument("--configs", help="LAYER:WORKERS,... e.g. pubsub:2,core:2,pubsub:1,pubsub:4")
    p.add_argument("--idle", type=int, help="idle authenticated sockets to hold (0: skip)")
    p.add_argument("--idle-room-size", type=int, default=20, help="room size of the idle and busy sockets")
    p.add_argument("--busy", type=int, help="busy sockets: all in rooms that keep talking (0: skip)")
    p.add_argument("--busy-minutes", type=float, help="how long the busy sockets talk")
    p.add_argument("--busy-load", type=float, help="offered deliveries/s while busy (all rooms together)")
    p.add_argument("--busy-step", type=float, help="seconds per busy sub-step (memory sampled between them)")
    p.add_argument("--busy-drain", type=float, default=2.0)
    p.add_argument("--churn", type=float, help="connect/disconnect churn: new sockets per second (0: skip)")
    p.add_argument("--churn-minutes", type=float, help="how long the churn soak lasts")
    p.add_argument("--churn-hold", type=float, help="seconds each churn socket stays open")
    p.add_argument("--churn-sample", type=float, help="seconds between worker RSS samples")
    p.add_argument("--baseline", help="git ref measured as 'before' in a temporary worktree ('none': skip; "
                   f"--reference default: {ISSUE_BEFORE[:12]}, issue #13's before)")
    p.add_argument("--gen-procs", type=int, help="load generator processes")
    p.add_argument("--compression", choices=("deflate", "none"), default="deflate",
                   help="client permessage-deflate offer (browsers offer it; default deflate)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for gunicorn")
    p.add_argument("--stop-p99-ms", type=float, default=2000.0, help="end a configuration's sweep past this p99")
    p.add_argument("--stop-lost", type=float, default=0.05,
                   help="end a configuration's sweep once more than this fraction of deliveries is lost")
    p.add_argument("--profile", action="store_true", help="py-spy the workers during the --profile-load step")
    p.add_argument("--profile-load", type=float, default=None)
    p.add_argument("--time-limit", type=float, help="overall seconds; later steps are skipped (default: enough for every phase)")
    p.add_argument("--readme-from", metavar="RESULTS_JSON", help="only regenerate bench/PERFORMANCE.md from a results file")
    args = p.parse_args(argv)
    args.mode = args.mode or "quick"
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.loads, str):
        args.loads = [float(x) for x in args.loads.split(",") if x.strip()]
    args.configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    for layer, workers in args.configs:
        if layer not in ("pubsub", "core") or workers < 1:
            p.error(f"bad configuration {layer}:{workers}")
    if args.clients % args.rooms:
        p.error("--clients must be a multiple of --rooms")
    args.app_env = dict(e.split("=", 1) for e in args.env)
    if str(args.baseline).lower() in ("none", "", "0"):
        args.baseline = None
    if args.time_limit is None:
        args.time_limit = default_time_limit(args)
    if args.profile and args.profile_load is None:
        args.profile_load = args.loads[len(args.loads) // 2]
    if not args.out:
        args.out = str(HERE / "results" / (args.mode if args.mode == "reference" else f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return args


def write_readme(results: dict, run_dir: Path):
    """bench/PERFORMANCE.md from one run's results, linking that run's files (relative to bench/)."""
    try:
        rel = run_dir.relative_to(HERE).as_posix()
    except ValueError:
        rel = run_dir.as_posix()
    memory = f"{rel}/memory.png" if (run_dir / "memory.png").exists() else None
    (HERE / "PERFORMANCE.md").write_text(report.readme_section(results, f"{rel}/results.json", f"{rel}/plot.png", memory))
    # The README's performance section: the same before/after table and the plots, paths from the repository root.
    root = f"bench/{rel}" if not Path(rel).is_absolute() else rel
    readme = HERE.parent / "README.md"
    block = report.readme_block(results, f"{root}/results.json", f"{root}/plot.png", f"{root}/memory.png" if memory else None)
    readme.write_text(report.replace_readme_block(readme.read_text(), block))


def main(argv=None):
    args = parse(argv)
    if args.readme_from:
        source = Path(args.readme_from).resolve()
        write_readme(json.loads(source.read_text()), source.parent)
        return 0
    from bench.run import Bench

    print(report.HEADER, flush=True)
    results = Bench(args).run()
    out = Path(args.out)
    report.write_all(results, out)
    print()
    print(report.table(results))
    if args.mode == "reference":
        write_readme(results, out.resolve())
    print(f"\nresults: {out / 'results.json'}, steps: {out / 'steps.jsonl'}, plot: {out / 'plot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
