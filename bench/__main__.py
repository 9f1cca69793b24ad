"""python -m bench [--quick | --reference] [options]

--quick      a small run (~1 min): 100 clients in 5 rooms, 3 load steps, pubsub vs core on 2 workers,
             500 idle sockets. Checks the harness; its numbers mean little.
--reference  the reference run (< ~10 min): 1,000 clients in 50 rooms of 20, a sweep of offered load
             on pubsub/core x 1/2/4 workers, 10,000 idle sockets. Writes bench/results/reference/ and
             bench/PERFORMANCE.md. Run it on a quiet machine.
Any option below overrides the mode's value.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import report

HERE = Path(__file__).resolve().parent

MODES = {
    "quick": dict(clients=100, rooms=5, loads=[200, 500, 1000], duration=3.0, drain=2.0, warmup=1.0,
                  configs="pubsub:2,core:2", idle=500, gen_procs=2, time_limit=240),
    "reference": dict(clients=1000, rooms=50, loads=[2500, 5000, 7500, 10000, 12500, 15000, 20000],
                      duration=8.0, drain=3.0, warmup=2.0, configs="pubsub:2,core:2,pubsub:1,pubsub:4", idle=10000,
                      gen_procs=2, time_limit=660),
}


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
    p.add_argument("--idle-room-size", type=int, default=20)
    p.add_argument("--gen-procs", type=int, help="load generator processes")
    p.add_argument("--compression", choices=("deflate", "none"), default="deflate",
                   help="client permessage-deflate offer (browsers offer it; default deflate)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for gunicorn")
    p.add_argument("--stop-p99-ms", type=float, default=2000.0, help="end a configuration's sweep past this p99")
    p.add_argument("--stop-lost-share", type=float, default=0.05, help="end a configuration's sweep past this share lost")
    p.add_argument("--profile", action="store_true", help="py-spy the workers during the --profile-load step")
    p.add_argument("--profile-load", type=float, default=None)
    p.add_argument("--time-limit", type=float, help="overall seconds; later steps are skipped")
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
    if args.profile and args.profile_load is None:
        args.profile_load = args.loads[len(args.loads) // 2]
    if not args.out:
        args.out = str(HERE / "results" / (args.mode if args.mode == "reference" else f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return args


def main(argv=None):
    args = parse(argv)
    if args.readme_from:
        results = json.loads(Path(args.readme_from).read_text())
        (HERE / "PERFORMANCE.md").write_text(report.readme_section(results))
        return 0
    from bench.run import Bench

    print(report.HEADER, flush=True)
    results = Bench(args).run()
    out = Path(args.out)
    report.write_all(results, out)
    print()
    print(report.table(results))
    if args.mode == "reference":
        (HERE / "PERFORMANCE.md").write_text(report.readme_section(results))
    print(f"\nresults: {out / 'results.json'}, steps: {out / 'steps.jsonl'}, plot: {out / 'plot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
