"""Aggregation, the knee, the terminal table, the plot and the performance page (bench/PERFORMANCE.md)."""
from __future__ import annotations

import json
from pathlib import Path

P99_LIMIT_MS = 250.0


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def aggregate(parts: list[dict], offered: float, rate: float, extra: dict) -> dict:
    lat = sorted(v for p in parts for v in p["lat_us"])
    window = max(p["window_s"] for p in parts)
    expected = sum(p["expected"] for p in parts)
    unique = sum(p["unique"] for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in {**p["errors"], **{f"send_{k}": v for k, v in p["send_failed"].items()}}.items():
            errors[k] = errors.get(k, 0) + v

    def ms(q):
        v = percentile(lat, q)
        return None if v is None else round(v / 1000, 2)

    return {
        "offered_deliveries_per_s": offered,
        "rate_per_client": rate,
        "sent": sum(p["sent"] for p in parts),
        "sent_per_s": round(sum(p["sent"] for p in parts) / window, 1),
        "expected": expected,
        "delivered": unique,
        "lost": expected - unique,
        "duplicated": sum(p["dup"] for p in parts),
        "delivered_per_s": round(sum(p["window_deliveries"] for p in parts) / window, 1),
        "p50_ms": ms(0.50), "p95_ms": ms(0.95), "p99_ms": ms(0.99), "max_ms": ms(1.0),
        "errors": errors,
        "generator_cpu_s": round(sum(p["cpu_s"] for p in parts), 2),
        "open_sockets": sum(p["open"] for p in parts),
        "window_s": round(window, 2),
        **extra,
    }


def ok_step(step) -> bool:
    return step["p99_ms"] is not None and step["p99_ms"] <= P99_LIMIT_MS and step["lost"] == 0 and step["expected"] > 0


def knee(steps: list[dict]):
    """Highest offered load with p99 <= 250 ms and zero loss (None if no step qualifies)."""
    good = [s for s in steps if ok_step(s)]
    if not good:
        return None
    best = max(good, key=lambda s: s["offered_deliveries_per_s"])
    return {"offered_deliveries_per_s": best["offered_deliveries_per_s"], "delivered_per_s": best["delivered_per_s"],
            "p99_ms": best["p99_ms"]}


HEADER = (f"{'config':<14}{'offered/s':>10}{'sent msg/s':>11}{'deliv/s':>9}{'lost':>7}{'dup':>5}"
          f"{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>9}{'app cpu':>8}{'us/dlv':>7}{'gen cpu':>8}{'redis':>6}{'pg':>6}{'other':>6}  errors")


def row(config: str, s: dict) -> str:
    def f(v, w, fmt="{:.1f}"):
        return f"{'-' if v is None else fmt.format(v):>{w}}"

    errors = ",".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-"
    return (f"{config:<14}{s['offered_deliveries_per_s']:>10.0f}{s['sent_per_s']:>11.1f}{s['delivered_per_s']:>9.0f}"
            f"{s['lost']:>7}{s['duplicated']:>5}{f(s['p50_ms'], 8)}{f(s['p95_ms'], 8)}{f(s['p99_ms'], 9)}"
            f"{f(s.get('app_cores'), 8, '{:.2f}')}{f(s.get('app_cpu_us_per_delivery'), 7, '{:.0f}')}{f(s.get('generator_cores'), 8, '{:.2f}')}"
            f"{f(s.get('redis_cores'), 6, '{:.2f}')}{f(s.get('postgres_cores'), 6, '{:.2f}')}{f(s.get('other_cores'), 6, '{:.2f}')}  {errors}")


def table(results: dict) -> str:
    lines = [HEADER]
    for cfg in results["configs"]:
        for s in cfg["steps"]:
            lines.append(row(cfg["name"], s))
    lines.append("")
    for cfg in results["configs"]:
        k = cfg.get("knee")
        ready = cfg.get("ready_seconds")
        lines.append(f"{cfg['name']:<14} knee: " + (f"{k['offered_deliveries_per_s']:.0f} offered deliveries/s "
                     f"({k['delivered_per_s']:.0f}/s delivered, p99 {k['p99_ms']} ms)" if k else "none (no step met p99<=250 ms, 0 lost)")
                     + (f"; gunicorn start -> /readyz 200: {ready:.2f} s" if ready else ""))
    idle = results.get("idle")
    if idle:
        lines.append(idle_line(idle))
    if results.get("busy"):
        lines.append("busy " + busy_line(results["busy"]))
    if results.get("churn"):
        lines.append("churn " + churn_line(results["churn"]))
    if results.get("baseline"):
        lines += ["", comparison_text(results)]
    return "\n".join(lines)


def busy_line(b: dict) -> str:
    return (f"({b['config']}): {b['held']}/{b['target']} sockets talking for {b['minutes_run']} min at "
            f"{b['delivered_per_s']:,.0f} deliveries/s delivered ({b['lost']} lost, p99 {b['p99_ms']} ms); "
            f"{b['per_socket_pss_kib']:.1f} KiB PSS / {b['per_socket_rss_kib']:.1f} KiB RSS per busy socket; "
            f"probe {b['probe']['delivered']}/{b['probe']['expected']} delivered; other jobs {b.get('other_cores', 0):.2f} cores")


def churn_line(c: dict) -> str:
    slope = c["workers_rss_slope_kib_per_min"]
    return (f"({c['config']}): {c['completed']:,} reconnects completed of {c['started']:,} started in {c['minutes']} min "
            f"({c['completed_per_s']:.0f}/s, asked {c['rate_requested']:.0f}/s; failed {c['failed'] or 'none'}); workers' RSS "
            f"{(c['rss_start'] or 0) / 2**20:.0f} -> {(c['rss_end'] or 0) / 2**20:.0f} MiB, slope over the second half "
            + ("-" if slope is None else f"{slope:+.1f} KiB/min") + f"; other jobs {c.get('other_cores', 0):.2f} cores")


def idle_line(idle: dict) -> str:
    return (f"idle ({idle['config']}): {idle['held']}/{idle['target']} authenticated sockets held "
            f"(connected in {idle['connect_seconds']:.1f} s); server memory {idle['after']['rss'] / 2**20:.0f} MiB RSS / "
            f"{idle['after']['pss'] / 2**20:.0f} MiB PSS total, {idle['per_socket_pss_kib']:.1f} KiB PSS per socket "
            f"({idle['per_socket_rss_kib']:.1f} KiB RSS); probe: {idle['probe']['delivered']}/{idle['probe']['expected']} delivered, "
            f"p99 {idle['probe']['p99_ms']} ms")


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    top = 0
    # With a baseline: "before" dashed, "after" solid, same colour per configuration.
    base = results.get("baseline")
    series = ([(f"before {c['name']}", c, "--", n) for n, c in enumerate(base["configs"])] if base else [])
    series += [((f"after {c['name']}" if base else c["name"]), c, "-", n) for n, c in enumerate(results["configs"])]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, cfg, style, n in series:
        xs = [s["offered_deliveries_per_s"] for s in cfg["steps"]]
        if not xs:
            continue
        top = max(top, max(xs))
        colour = colours[n % len(colours)]
        p99 = [s["p99_ms"] if s["p99_ms"] is not None else float("nan") for s in cfg["steps"]]
        line, = ax1.plot(xs, p99, marker="o", ls=style, label=label, color=colour)
        lossy = [(x, y) for x, y, s in zip(xs, p99, cfg["steps"]) if s["lost"] > 0]
        if lossy:
            ax1.scatter(*zip(*lossy), marker="x", s=80, color=line.get_color())
        ax2.plot(xs, [s["delivered_per_s"] for s in cfg["steps"]], marker="o", ls=style, label=label, color=line.get_color())
        if cfg.get("knee"):
            ax2.axvline(cfg["knee"]["offered_deliveries_per_s"], color=line.get_color(), ls=":", lw=1)
    ax1.axhline(P99_LIMIT_MS, color="red", ls="--", lw=1, label="p99 limit 250 ms")
    ax1.set_yscale("log")
    ax1.set_xlabel("offered load (deliveries/s)")
    ax1.set_ylabel("p99 latency send→receive (ms, log)")
    ax1.set_title("p99 latency (x = messages lost)")
    ax1.legend(fontsize=8)
    ax2.plot([0, top], [0, top], color="grey", ls="--", lw=1, label="delivered = offered")
    ax2.set_xlabel("offered load (deliveries/s)")
    ax2.set_ylabel("delivered messages/s")
    ax2.set_title("throughput (dotted: knee)")
    ax2.legend(fontsize=8)
    w = results["workload"]
    fig.suptitle(f"{w['clients']} clients in {w['rooms']} rooms of {w['room_size']}, {results['machine']['cpus']} CPUs, "
                 f"generator on the same machine ({results['mode']}, {results['started']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


GOAL_DELIVERIES = 10_000

# Measured while the optimisations were made (bench/results/dev/): the same
# generator and workload, HEAD vs the patched app, on the shared 2-core machine.
ISSUE13_CHANGES = """\
### What issue #13 changed, and why

The sweep is CPU-bound on this machine: at the knee the workers were runnable but waiting for a CPU
much of the time (`/proc/<pid>/task/*/schedstat`, midway through these changes at 10,000 offered/s:
per second, each worker ran 0.59 s and waited 0.44 s for a CPU), so every change below removes CPU per delivered
frame, a turn of the event loop, or memory a socket holds. Found with a temporary
`cProfile.Profile(time.thread_time)` hook in the worker (CPU, not wall time), per-stage timings in
the consumer and `tracemalloc` snapshots, none shipped (bench/README.md has the figures).

1. **One fan-out per worker** (app/chat/layer.py). channels_redis put each room message in the
   queue of every member socket: per delivered frame a msgpack decode, a queue wake-up and a turn of
   Channels' dispatch loop (an `asyncio.wait` and a new task). Now the worker decodes it once and hands
   it to each local socket's `offer`.
2. **Direct frame writes** (app/chat/wire.py). The text frame is built once per worker and written
   to each socket's transport when nothing waits before it and the transport is not paused,
   skipping Channels', the middlewares' and Uvicorn's `send` path; otherwise the socket's outbox
   takes it, in order.
3. **No publish convoy.** channels_redis holds one lock per shard around every PUBLISH, so a worker
   had one in flight at a time, each waiting for a turn of a busy loop. Publishes that arrive while
   one is in flight now go together in one pipeline (one write, one round trip, one connection).
4. **Fewer turns per message.** The per-user budget's Redis call overlaps the wait for the batch
   writer instead of coming before it (app/chat/writer.py); the database thread wakes the senders
   at the commit itself (`transaction.on_commit`); hiredis parses Redis replies in C (redis-py's
   Python parser was ~16 % of the loop's CPU).
5. **GC** (app/uvicorn_worker.py): the loaded app is frozen and young collections run at 20,000
   allocations instead of 700; full collections had held the loop ~113 ms (bench/README.md "GC").
6. **Memory per socket**: lean queues and events (app/lean_asyncio.py) in Uvicorn's protocol
   (app/ws_protocol.py) and the layer, the handshake's request/response and headers dropped once
   answered, one consumer task fewer (app/chat/dispatch.py), no scope copies in the session and
   auth middleware; no per-frame session wrapper and no idle database-thread hops at
   connect/disconnect (app/chat/db_hops.py).
7. **Cheaper reconnects** (app/chat/consumers.py): the handshake reads the room, the session's key
   and the replay in one database hop, after joining the room group, and skips the replay's query
   when nothing can follow the cursor (10-30 % less worker CPU per reconnect, bench/README.md
   "Churn"); a client gone during the handshake now gives back its socket slot and group
   membership (it kept them for the worker's life).
8. **No cycle per websocket** (app/http_protocol.py, app/ws_protocol.py): Uvicorn's HTTP protocol
   and its parser, and websockets' protocol and its parser generator, each formed a reference
   cycle that outlived the socket. With the rare full collections of item 5 they piled up
   through the churn soak (its RSS climbed by 0.7-3 MiB a minute); now reference counting frees
   both when the socket goes (bench/README.md "Churn").
9. **The generator** (bench/loadgen.py) is a lean client on `asyncio.Protocol` (about half the CPU per
   received frame of the websockets client it replaced): it shares the 2 CPUs with the server, so
   its cost was the server's loss. Both columns above use it.

Still in the way, not changed: every delivered frame is one `transport.write` (a system call that,
on this VM, costs about 22 µs of CPU with the reader's wake-up) and one read by the generator on the
same 2 cores; every message still costs a Redis round trip for the budget, a database thread hop for
the batch INSERT and a PUBLISH. Under connect/disconnect churn the workers' RSS still follows the
most sockets ever in flight at once (a high-water mark: pymalloc keeps an arena while any object
in it lives), so a soak whose peak of sockets in flight keeps rising keeps rising with it.
"""


DEV_NOTES = """\
## What stood in the way, and what was changed

Profiled with py-spy on the workers under load (`python -m bench --profile`; summarise
with `python -m bench.profile bench/results/<run>/profile-*.txt`):

1. **A thread hop per delivered frame.** Channels ≥ 4.2 runs `close_old_connections()` through
   `sync_to_async` before *every* consumer handler (`AsyncConsumer.dispatch`), so each of the 20
   copies of a message queued on the worker's single database thread behind the INSERTs and
   fought it for the GIL (24 % of worker samples in `aclose_old_connections`; the app used only
   ~0.7 of 2 cores when latency exploded). `ChatConsumer.dispatch` skips it for `chat.message`
   and `websocket.receive`; the database is reached only through `database_sync_to_async`,
   which closes stale connections itself.
2. **A database round trip per message.** `app/chat/writer.py` batches the messages that arrive
   while the previous INSERT runs into one `bulk_create` (PostgreSQL returns the ids), so the
   batch size follows the load and a lone message is written at once.
3. **permessage-deflate per recipient.** Every socket kept its own compressor (~34 KiB) and
   compressed each fanned-out copy separately (~11 % of worker samples, ~20 µs per delivery).
   The Uvicorn worker no longer negotiates it (`ws_per_message_deflate=False`); frames are a few
   hundred bytes.
4. **The core layer (`CHANNEL_LAYER=core`) failed under load**: redis-py's pool refused the
   101st concurrent command ("Too many connections", the consumer died) and the per-worker
   queue in Redis dropped messages past `capacity=100`. It now gets `max_connections=1000`
   (`CHANNEL_LAYER_MAX_CONNECTIONS`) and `capacity=1000` (`CHANNEL_LAYER_CAPACITY`); it still
   pops one message per Redis round trip per worker, which is why it saturates first.

Not in the way: Uvicorn already picks the `websockets-sansio` protocol and uvloop/httptools;
Redis and PostgreSQL used < 0.1 core each at 10,000 deliveries/s. What remains per delivery
is the ASGI send path and one `send()` system call per socket (about 120 µs of worker CPU
per delivered frame including each message's share of storage and publishing), and the
generator's own ~30 µs per received frame on the same two cores.

Before/after on this machine, measured back to back (1,000 clients in 50 rooms of 20, pubsub
layer, 2 workers, 6 s steps; "other" is what other jobs used of the 2 CPUs meanwhile; files in
bench/results/dev/):

| offered deliveries/s | before: delivered/s, p99 (other) | after: delivered/s, p99 (other) |
|---|---|---|
{dev_rows}

Idle sockets (3,000 held, 2 workers): {idle_before:.0f} KiB per socket with deflate, {idle_after:.0f} KiB without.
"""


def _dev_notes() -> str:
    here = Path(__file__).resolve().parent / "results" / "dev"
    try:
        before = json.loads((here / "before.json").read_text())["configs"][0]["steps"]
        after = json.loads((here / "after.json").read_text())["configs"][0]["steps"]
        idle = json.loads((here / "idle.json").read_text())
    except (OSError, KeyError, IndexError, ValueError):
        return ""
    rows = []
    for b, a in zip(before, after):
        def cell(x):
            lost = f", {x['lost']:,} lost" if x["lost"] else ""
            return f"{x['delivered_per_s']:,.0f}/s, {x['p99_ms']:,.0f} ms{lost} ({x.get('other_cores', 0):.2f})"

        rows.append(f"| {b['offered_deliveries_per_s']:,.0f} | {cell(b)} | {cell(a)} |")
    return DEV_NOTES.format(dev_rows="\n".join(rows), idle_before=idle["deflate"], idle_after=idle["none"])


METRICS_NOTES = """\
## The cost of metrics

`METRICS_TOKEN` set (prometheus_client's multiprocess mode on: every worker counts handshakes,
messages, rejections and, per delivered frame, one count and one latency observation, written to
the shared files once a second) against unset, on the same workload (1,000 clients in 50 rooms of
20, pubsub layer, 2 workers, 8 s steps), in {pairs} pairs of runs alternating off/on on the shared
2-core machine; medians over the runs; "other" is what other jobs used of the 2 CPUs meanwhile
(bench/results/metrics/, `python -m bench --configs pubsub:2 --loads {loads} --idle 0 [--env METRICS_TOKEN=...]`):

| offered deliveries/s | off: app CPU µs per delivery, delivered/s, p99 | on: app CPU µs per delivery, delivered/s, p99 | CPU per delivery, on vs off |
|---|---|---|---|
{rows}

Knee (p99 ≤ 250 ms, nothing lost) per run, off: {knees_off}; on: {knees_on}. Median app CPU per
delivery over the unsaturated steps: off {cpu_off:.1f} µs, on {cpu_on:.1f} µs ({cost:+.1f} %; goal: under 5 %).
Mean CPU used by other jobs during the runs: {other:.2f} of 2.{profile}
"""

PROFILE_NOTE = """

Where the difference is too small for two runs to show it, the profile does: with metrics on, at
{offered:,.0f} offered deliveries/s ({delivered:,.0f}/s delivered), {metrics_samples} of {samples:,} py-spy samples
of the workers ({percent:.2f} %) were in the metrics and JSON-log code (app/observability/ and
prometheus_client; `python -m bench --profile --profile-load 8000 --env METRICS_TOKEN=...`, then
`python -m bench.metrics_cost RUN_DIR`; bench/results/metrics/profile-on/metrics-share.json)."""


def _median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _metrics_notes() -> str:
    """bench/results/metrics/{off,on}-N/results.json: the metrics cost, if measured."""
    here = Path(__file__).resolve().parent / "results" / "metrics"
    runs = {"off": [], "on": []}
    for path in sorted(here.glob("*/results.json")):
        mode = path.parent.name.split("-")[0]
        if mode in runs:
            runs[mode].append(json.loads(path.read_text())["configs"][0])
    if not runs["off"] or not runs["on"]:
        return ""
    loads = sorted({s["offered_deliveries_per_s"] for c in runs["off"] + runs["on"] for s in c["steps"]})

    def at(mode, load, key):
        return _median([s.get(key) for c in runs[mode] for s in c["steps"] if s["offered_deliveries_per_s"] == load])

    rows, cpu = [], {"off": [], "on": []}
    for load in loads:
        cells, unsaturated = [], True
        for mode in ("off", "on"):
            us, dlv, p99 = (at(mode, load, k) for k in ("app_cpu_us_per_delivery", "delivered_per_s", "p99_ms"))
            cells.append(f"{us:.0f} µs, {dlv:,.0f}/s, {p99:,.0f} ms")
            unsaturated = unsaturated and p99 is not None and p99 <= P99_LIMIT_MS
        off, on = at("off", load, "app_cpu_us_per_delivery"), at("on", load, "app_cpu_us_per_delivery")
        if unsaturated:
            cpu["off"].append(off)
            cpu["on"].append(on)
        rows.append(f"| {load:,.0f} | {cells[0]} | {cells[1]} | {(on - off) / off * 100:+.1f} %"
                    + ("" if unsaturated else " (saturated)") + " |")

    def knees(mode):
        return ", ".join(f"{(c.get('knee') or {}).get('delivered_per_s', 0):,.0f}/s" for c in runs[mode])

    cpu_off, cpu_on = _median(cpu["off"]) or 0.0, _median(cpu["on"]) or 0.0
    share = here / "profile-on" / "metrics-share.json"
    profile = ""
    if share.exists():
        figure = json.loads(share.read_text())
        profile = PROFILE_NOTE.format(offered=figure["offered_deliveries_per_s"], delivered=figure["delivered_per_s"],
                                      metrics_samples=figure["metrics_samples"], samples=figure["samples"],
                                      percent=figure["percent"])
    other = [s.get("other_cores", 0) for c in runs["off"] + runs["on"] for s in c["steps"]]
    return METRICS_NOTES.format(pairs=min(len(runs["off"]), len(runs["on"])), loads=",".join(f"{x:.0f}" for x in loads),
                                rows="\n".join(rows), knees_off=knees("off"), knees_on=knees("on"), cpu_off=cpu_off,
                                cpu_on=cpu_on, cost=(cpu_on - cpu_off) / cpu_off * 100 if cpu_off else 0.0,
                                other=sum(other) / len(other) if other else 0.0, profile=profile)


def readme_section(results: dict, results_rel: str = "results/reference/results.json",
                   plot_rel: str = "results/reference/plot.png", memory_rel: str | None = None) -> str:
    """bench/PERFORMANCE.md, generated from a results file (so its numbers are the measured ones)."""
    w, m = results["workload"], results["machine"]

    def knee_text(c):
        k = c.get("knee")
        if not k:
            return "below the lowest step"
        # The highest step passed: the real knee is at least that.
        at_least = "≥ " if k["offered_deliveries_per_s"] >= max(w["loads"]) else ""
        # Delivered, not offered: what the clients actually received per second at that step.
        return (f"{at_least}{k['delivered_per_s']:,.0f}/s delivered (p99 {k['p99_ms']:.0f} ms; "
                f"step offered {k['offered_deliveries_per_s']:,.0f}/s)")

    def peak(c):
        return max((s["delivered_per_s"] for s in c["steps"]), default=0)

    ref = results["mode"] == "reference"
    lines = [
        "# Performance (`make bench`)",
        "",
        f"<!-- Generated by `python -m bench --readme-from bench/{results_rel}` "
        "(and by every `make bench`): edit bench/report.py, not this file. -->",
        "",
        "`make bench` (`python -m bench --reference`, about 50 minutes) starts the production stack on this",
        "machine as the integration tests do (a bare `gunicorn`, DEBUG=False, Redis, PostgreSQL) and a load",
        "generator in two separate processes: authenticated websocket clients in rooms, each sending",
        "Poisson-spaced messages; every message is stored, rendered once and must reach every member of its",
        "room. Each step of a sweep of offered load records delivered messages/s, lost, duplicated and",
        "send→receive latency p50/p95/p99. The knee is the step with the most delivered/s that has p99 ≤ 250 ms and",
        "nothing lost. It then measures memory with busy sockets and under connect/disconnect churn, and does all",
        "of it twice in the same run: on the issue's \"before\" commit (`--baseline REF`, checked out into a",
        "temporary git worktree) and on this checkout. `python -m bench --quick` is a short smoke run; `--repo DIR`",
        "measures another checkout with the same generator.",
        "",
        (f"{'Reference run' if ref else 'Run'} ({results['started']}, app `{m['git']}`, mode `{results['mode']}`): "
         f"[results]({results_rel}), [plot]({plot_rel})" + (f", [memory plot]({memory_rel})" if memory_rel else "") + "."),
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, {m['os']}, Python {m['python']}; load",
        f"average at start {m['loadavg_start']}. Workload: {w['clients']:,} clients in {w['rooms']} rooms of "
        f"{w['room_size']}, {w['step_seconds']:.0f} s per step, the generator on the same {m['cpus']} CPUs.",
    ]
    other = [s.get("other_cores") for c in results["configs"] for s in c["steps"] if s.get("other_cores") is not None]
    if other and sum(other) / len(other) > 0.25:
        lines.append(f"**Caveat:** other processes used {sum(other) / len(other):.2f} of the {m['cpus']} CPUs on average during "
                     "this run (column `other_cores` in the results): its numbers are pessimistic; re-run it on a quiet machine.")
    lines += ["", issue13_section(results), ISSUE13_CHANGES]
    if memory_rel:
        lines += [f"![memory: busy sockets and churn soak]({memory_rel})", ""]
    lines += [
        "",
        f"![benchmark]({plot_rel})",
        "",
        "| configuration | knee (p99 ≤ 250 ms, 0 lost) | most delivered/s seen | gunicorn start → /readyz 200 |",
        "|---|---|---|---|",
    ]
    for c in results["configs"]:
        lines.append(f"| `CHANNEL_LAYER={c['layer']}` `WEB_CONCURRENCY={c['workers']}` | {knee_text(c)} | "
                     f"{peak(c):,.0f} | {c['ready_seconds']:.2f} s |")
    best = max(results["configs"], key=lambda c: (c.get("knee") or {}).get("delivered_per_s", 0), default=None)
    if best is not None:
        k = (best.get("knee") or {}).get("delivered_per_s", 0)
        lines += ["", f"Earlier goal, before issue #13 (knee ≥ {GOAL_DELIVERIES:,} deliveries/s delivered, {w['clients']:,} clients in rooms of {w['room_size']}): "
                  + ("**met**" if k >= GOAL_DELIVERIES else "**not met**") + f" ({best['name']}: {k:,.0f}/s delivered)."]
    idle = results.get("idle")
    if idle:
        lines += ["", f"Idle sockets: {idle['held']:,} of {idle['target']:,} authenticated websockets held by "
                  f"`{idle['config']}` (connected in {idle['connect_seconds']:.0f} s); master + workers then used "
                  f"{idle['after']['rss'] / 2**20:,.0f} MiB RSS ({idle['after']['pss'] / 2**20:,.0f} MiB PSS), "
                  f"{idle['per_socket_pss_kib']:.0f} KiB per socket; a message in each of 50 rooms still reached "
                  f"{idle['probe']['delivered']:,} of {idle['probe']['expected']:,} members."]
    rec = recommend(results)
    if rec:
        lines += ["", "**Recommended settings**: " + rec]
    notes = _dev_notes()
    if notes:
        lines += ["", notes.rstrip()]
    metrics_cost = _metrics_notes()
    if metrics_cost:
        lines += ["", metrics_cost.rstrip()]
    return "\n".join(lines) + "\n"


def recommend(results: dict) -> str:
    def k(c):
        return (c.get("knee") or {}).get("delivered_per_s", 0)

    configs = results["configs"]
    if len(configs) < 2:  # one configuration measured: nothing was compared, nothing to recommend
        return ""
    best = max(configs, key=lambda c: (k(c), -c["workers"]))  # a tie goes to fewer workers (less memory)
    parts = [f"`CHANNEL_LAYER={best['layer']}` and `WEB_CONCURRENCY={best['workers']}` "
             f"(on {results['machine']['cpus']} CPUs) had the highest knee, {k(best):,.0f} deliveries/s delivered."]
    layers = {}
    for c in configs:
        if c["workers"] == best["workers"]:
            layers[c["layer"]] = k(c)
    if len(layers) > 1:
        parts.append("Same workers, other layer: " + ", ".join(f"{l} {v:,.0f}/s" for l, v in layers.items() if l != best["layer"]) + ".")
    workers = sorted((c["workers"], k(c)) for c in configs if c["layer"] == best["layer"])
    if len(workers) > 1:
        parts.append("Workers on that layer: " + ", ".join(f"{w}: {v:,.0f}/s" for w, v in workers) + ".")
    parts.append("Each worker holds its own sockets, Redis subscriptions and database pool: memory and start-up time grow with the count.")
    return " ".join(parts)


def memory_plot(results: dict, path: Path) -> bool:
    """Busy sockets' PSS and the churn soak's workers' RSS over time, before (dashed) and after."""
    sides = ([("before", results["baseline"], "--")] if results.get("baseline") else []) + [("after", results, "-")]
    if not any(s.get("busy") or s.get("churn") for _, s, _ in sides):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    ax3 = None  # the connections the server holds, on a second axis: what the RSS follows
    for label, side, style in sides:
        b = side.get("busy")
        if b and b["steps"]:
            xs = [0.0] + [s["t_s"] / 60 for s in b["steps"]]
            ys = [b["after_connect"]["pss"] / 2**20] + [s["memory"]["pss"] / 2**20 for s in b["steps"]]
            ax1.plot(xs, ys, ls=style, marker=".", label=f"{label} ({b['held']:,} sockets)")
        c = side.get("churn")
        if c and c["samples"]:
            ax2.plot([s["t_s"] / 60 for s in c["samples"]], [s["workers_rss"] / 2**20 for s in c["samples"]], ls=style,
                     label=f"{label} (slope {c['workers_rss_slope_kib_per_min']} KiB/min)")
            if any("open" in s for s in c["samples"]):
                ax3 = ax3 or ax2.twinx()
                ax3.plot([s["t_s"] / 60 for s in c["samples"] if "open" in s], [s["open"] for s in c["samples"] if "open" in s],
                         ls=style, color="0.6", lw=0.7, label=f"{label}: connections held")
    ax1.set_title("busy sockets: master + workers PSS while they talk")
    ax1.set_xlabel("minutes since connected")
    ax1.set_ylabel("MiB")
    ax1.legend(fontsize=8)
    ax2.set_title("churn soak: workers' RSS")
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=8, loc="upper left")
    if ax3 is not None:
        ax3.set_ylabel("connections held (grey)")
        ax3.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with open(out / "steps.jsonl", "w") as fh:
        for c in results["configs"]:
            for s in c["steps"]:
                fh.write(json.dumps({"config": c["name"], **s}) + "\n")
    (out / "table.txt").write_text(table(results) + "\n")
    plot(results, out / "plot.png")
    memory_plot(results, out / "memory.png")


# --- issue #13: before/after figures and goals ----------------------------------

GOAL_KNEE = 20_000          # delivered deliveries/s at the knee
GOAL_P99_AT = 10_000        # offered deliveries/s of the step whose p99 is judged
GOAL_P99_MS = 50.0
GOAL_BUSY_KIB = 32.0        # per busy socket (RSS and PSS of master + workers, after - before)
GOAL_FLAT_KIB_PER_MIN = 100.0  # "flat": workers' RSS grows less than this over the soak's second half
GOAL_READY_S = 2.0
REFERENCE_BUSY = (10_000, 10.0)   # sockets, minutes
REFERENCE_CHURN = (200.0, 10.0)   # reconnects/s, minutes


def main_config(side: dict):
    """The configuration the issue measures: pubsub on 2 workers if run, else the first."""
    configs = side.get("configs") or []
    return next((c for c in configs if c["layer"] == "pubsub" and c["workers"] == 2), configs[0] if configs else None)


def figures(side: dict, loads: list) -> dict:
    """The issue's figures for one checkout (None where not measured)."""
    cfg = main_config(side)
    out = {"config": cfg["name"] if cfg else None, "knee": None, "knee_at_least": False, "p99_10k": None,
           "busy": side.get("busy"), "churn": side.get("churn"), "ready_s": None}
    if cfg:
        k = cfg.get("knee")
        if k:
            out["knee"] = k
            out["knee_at_least"] = k["offered_deliveries_per_s"] >= max(loads)
        out["p99_10k"] = next((s for s in cfg["steps"] if s["offered_deliveries_per_s"] == GOAL_P99_AT), None)
    readies = [c.get("ready_seconds") for c in side.get("configs") or []]
    readies += [(side.get(p) or {}).get("ready_seconds") for p in ("idle", "busy", "churn")]
    readies = [r for r in readies if r is not None]
    out["ready_s"] = max(readies) if readies else None
    return out


def _knee_cell(f):
    k = f["knee"]
    if not k:
        return "below the lowest step" if f["config"] else "not measured"
    return (f"{'≥ ' if f['knee_at_least'] else ''}{k['delivered_per_s']:,.0f}/s delivered "
            f"(step offered {k['offered_deliveries_per_s']:,.0f}/s, p99 {k['p99_ms']:.0f} ms)")


def _p99_cell(f):
    s = f["p99_10k"]
    if not s:
        return "not measured (the sweep stopped before 10,000/s or skipped it)"
    lost = f", **{s['lost']:,} lost**" if s["lost"] else ", 0 lost"
    p99 = "-" if s["p99_ms"] is None else f"{s['p99_ms']:,.0f} ms"
    return f"{p99} ({s['delivered_per_s']:,.0f}/s delivered{lost}; other jobs {s.get('other_cores', 0):.2f} cores)"


def _busy_cell(f):
    b = f["busy"]
    if not b:
        return "not measured"
    return (f"{b['per_socket_rss_kib']:.1f} KiB RSS, {b['per_socket_pss_kib']:.1f} KiB PSS ({b['held']:,} sockets, "
            f"{b['minutes_run']} min at {b['delivered_per_s']:,.0f}/s delivered, {b['lost']:,} lost, p99 {b['p99_ms']} ms; "
            f"probe {b['probe']['delivered']}/{b['probe']['expected']}; other jobs {b.get('other_cores', 0):.2f})"
            + (f"; **overloaded: {b['offered_deliveries_per_s']:,.0f}/s offered was more than it delivered, so this is "
               "memory under a growing backlog, not steady chat**" if b["lost"] > 0.01 * max(1, b["expected"]) else ""))


def _churn_cell(f):
    c = f["churn"]
    if not c:
        return "not measured"
    slope = c["workers_rss_slope_kib_per_min"]
    failed = sum(c["failed"].values())
    return ((f"{slope:+,.1f} KiB/min" if slope is not None else "- (too few samples)")
            + f" ({c['completed']:,} reconnects completed, {c['completed_per_s']:.0f}/s of {c['rate_requested']:.0f}/s asked, "
            f"{failed:,} failed, {c.get('skipped', 0):,} not started because too many were still opening; workers {(c['rss_start'] or 0) / 2**20:.0f} → {(c['rss_end'] or 0) / 2**20:.0f} MiB RSS"
            + ("; **a worker restarted**" if c.get("workers_restarted") else "") + f"; other jobs {c.get('other_cores', 0):.2f})")


def _ready_cell(f):
    return "not measured" if f["ready_s"] is None else f"{f['ready_s']:.2f} s (slowest start of the run)"


def goals(f: dict) -> list[tuple[str, str]]:
    """(goal, verdict) for the after column; a verdict says 'not met' or why it cannot say 'met'."""
    def verdict(ok, caveat=""):
        if ok is None:
            return "not measured"
        return ("**met**" if ok else "**not met**") + caveat

    k = f["knee"]
    knee_ok = None if not f["config"] else bool(k and k["delivered_per_s"] >= GOAL_KNEE)
    s = f["p99_10k"]
    p99_ok = None if not s else bool(s["p99_ms"] is not None and s["p99_ms"] <= GOAL_P99_MS and s["lost"] == 0)
    b = f["busy"]
    busy_ok = busy_caveat = None
    if b:
        busy_ok = (max(b["per_socket_rss_kib"], b["per_socket_pss_kib"]) <= GOAL_BUSY_KIB and b["lost"] == 0
                   and b["probe"]["lost"] == 0 and b["held"] == b["target"])
        if b["held"] < REFERENCE_BUSY[0] or b["minutes_run"] < REFERENCE_BUSY[1] - 0.01:
            busy_caveat = (f" at {b['held']:,} sockets for {b['minutes_run']} min, not the reference "
                           f"{REFERENCE_BUSY[0]:,} for {REFERENCE_BUSY[1]:.0f}")
    c = f["churn"]
    churn_ok = churn_caveat = None
    if c:
        slope = c["workers_rss_slope_kib_per_min"]
        churn_ok = (slope is not None and slope <= GOAL_FLAT_KIB_PER_MIN and not c.get("workers_restarted")
                    and c["completed_per_s"] >= 0.95 * c["rate_requested"])
        if c["rate_requested"] < REFERENCE_CHURN[0] or c["minutes"] < REFERENCE_CHURN[1]:
            churn_caveat = (f" at {c['rate_requested']:.0f} reconnects/s for {c['minutes']} min, not the reference "
                            f"{REFERENCE_CHURN[0]:.0f}/s for {REFERENCE_CHURN[1]:.0f}")
    ready_ok = None if f["ready_s"] is None else f["ready_s"] < GOAL_READY_S
    return [
        (f"knee ≥ {GOAL_KNEE:,} deliveries/s delivered", verdict(knee_ok)),
        (f"p99 ≤ {GOAL_P99_MS:.0f} ms at {GOAL_P99_AT:,}/s, nothing lost", verdict(p99_ok)),
        (f"≤ {GOAL_BUSY_KIB:.0f} KiB per busy socket (RSS and PSS), nothing lost", verdict(busy_ok, busy_caveat or "")),
        (f"RSS flat under churn (slope ≤ {GOAL_FLAT_KIB_PER_MIN:.0f} KiB/min, ≥ 95 % of the asked rate completed)",
         verdict(churn_ok, churn_caveat or "")),
        (f"start → ready < {GOAL_READY_S:.0f} s", verdict(ready_ok)),
    ]


def comparison_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(what, before, after, goal: verdict on after) for every figure of issue #13."""
    loads = results["workload"]["loads"]
    before = figures(results.get("baseline") or {}, loads) if results.get("baseline") else None
    after = figures(results, loads)
    cells = [("knee (p99 ≤ 250 ms, 0 lost)", _knee_cell), ("p99 at the 10,000/s step", _p99_cell),
             ("KiB per busy socket", _busy_cell), ("churn: workers' RSS slope, second half", _churn_cell),
             ("gunicorn start → /readyz 200", _ready_cell)]
    rows = []
    for (what, cell), (goal, verdict) in zip(cells, goals(after)):
        rows.append((what, cell(before) if before else "no baseline in this run", cell(after), f"{goal}: {verdict}"))
    return rows


def comparison_text(results: dict) -> str:
    base = results.get("baseline") or {}
    lines = [f"issue #13, before = {base.get('ref', '-')} ({(base.get('commit') or '')[:12]}), "
             f"after = {results['machine']['git']}:"]
    for what, b, a, goal in comparison_rows(results):
        lines += [f"  {what}", f"    before: {b}", f"    after:  {a}", f"    goal:   {goal}"]
    return "\n".join(lines)


def comparison_markdown(results: dict) -> str:
    base = results.get("baseline")
    head = (f"| figure | before (`{base['commit'][:7]}`) | after (`{results['machine']['git']}`) | goal (judged on after) |"
            if base else f"| figure | before | after (`{results['machine']['git']}`) | goal (judged on after) |")
    lines = [head, "|---|---|---|---|"]
    for what, b, a, goal in comparison_rows(results):
        lines.append(f"| {what} | {b} | {a} | {goal} |")
    return "\n".join(lines)


ISSUE13_TEXT = """\
## Issue #13: before and after

What each figure measured (all "delivered": counted by the receiving clients, not offered):

- **knee**: the highest step of the sweep ({config}, {clients:,} clients in rooms of {room_size}, {step:.0f} s steps,
  offered {loads}) with p99 ≤ 250 ms and nothing lost; the figure is deliveries/s the clients received in that step.
- **p99 at 10,000/s**: send→receive latency p99 of the step offered 10,000 deliveries/s.
- **KiB per busy socket**: {busy_text}
- **churn RSS slope**: {churn_text}
- **start → ready**: gunicorn start to the first `/readyz` 200, the slowest of every start in the run.

"other jobs" is the CPU (in cores, of {cpus}) that processes outside the benchmark used meanwhile: the noise.
"""


def issue13_section(results: dict) -> str:
    w = results["workload"]
    cfg = main_config(results)
    busy_w, churn_w = w.get("busy"), w.get("churn")
    if busy_w:
        busy_text = (f"{busy_w['sockets']:,} sockets in rooms of {busy_w['room_size']} that all keep talking "
                     f"({busy_w['offered_deliveries_per_s']:,.0f} offered deliveries/s in all) for {busy_w['minutes']:g} min"
                     + ("" if (busy_w["sockets"], busy_w["minutes"]) == REFERENCE_BUSY else
                        f" (**not the reference {REFERENCE_BUSY[0]:,} sockets for {REFERENCE_BUSY[1]:.0f} min**)")
                     + "; RSS and PSS of master + workers after minus before they connected, divided by the sockets "
                       "held; then one sender in each of up to 50 rooms checks every socket still receives.")
    else:
        busy_text = "not run (`--busy 0`)."
    if churn_w:
        churn_text = (f"sockets connect at {churn_w['reconnects_per_s']:g}/s, each stays {churn_w['hold_seconds']:g} s and "
                      f"closes, for {churn_w['minutes']:g} min"
                      + ("" if (churn_w["reconnects_per_s"], churn_w["minutes"]) == REFERENCE_CHURN else
                         f" (**not the reference {REFERENCE_CHURN[0]:.0f}/s for {REFERENCE_CHURN[1]:.0f} min**)")
                      + f"; the workers' RSS sampled every {churn_w['sample_seconds']:g} s; the least-squares slope over "
                        "the second half, in KiB per minute (flat: ≤ 100 KiB/min).")
    else:
        churn_text = "not run (`--churn 0`)."
    loads = ", ".join(f"{x:,.0f}" for x in w["loads"])
    text = ISSUE13_TEXT.format(config=cfg["name"] if cfg else "-", clients=w["clients"], room_size=w["room_size"],
                               step=w["step_seconds"], loads=loads + " /s", busy_text=busy_text, churn_text=churn_text,
                               cpus=results["machine"]["cpus"])
    base = results.get("baseline")
    note = (f"Before: `{base['ref']}` = `{base['commit'][:12]}`, measured in the same run with the same generator, "
            "services and seeded data (production venv from this checkout's lock)." if base else
            "**No baseline in this run** (`--baseline none`): the before column is empty.")
    differs = app_differs(base["commit"], results["machine"]["git"]) if base else None
    if differs is False:
        note += (" **The app code (app/, gunicorn.conf.py) is the same in both columns**: their differences are "
                 "run-to-run noise on this machine, a measure of how far apart two identical runs land.")
    elif differs:
        after = results["machine"]["git"].split()[0]
        note += (f" What the served code changed between the columns: `git diff --stat {base['commit'][:12]} {after} -- "
                 "app gunicorn.conf.py`.")
    return text + "\n" + note + "\n\n" + comparison_markdown(results) + "\n"


README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def readme_block(results: dict, results_rel: str, plot_rel: str, memory_rel: str | None) -> str:
    """The README's performance figures (paths relative to the repository root), from one results file."""
    m = results["machine"]
    lines = [README_BEGIN,
             f"<!-- Generated by `python -m bench --readme-from {results_rel}` (and by every `make bench`). -->",
             "",
             f"Run {results['started']} on this machine ({m['cpus']} CPUs, the load generator on the same CPUs), "
             f"app `{m['git']}`, mode `{results['mode']}`: [results]({results_rel}). What each figure measured, "
             "and the workload: [bench/PERFORMANCE.md](bench/PERFORMANCE.md).",
             "", comparison_markdown(results), "", f"![benchmark: p99 and delivered/s against offered load]({plot_rel})"]
    if memory_rel:
        lines += ["", f"![memory: busy sockets and churn soak]({memory_rel})"]
    return "\n".join(lines + [README_END])


def replace_readme_block(readme: str, block: str) -> str:
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md has no {README_BEGIN} ... {README_END} block")
    return readme[:begin] + block + readme[end + len(README_END):]


def app_differs(before: str, after_git: str):
    """Whether the served code differs between two commits (None if git cannot tell, e.g. a modified checkout)."""
    import subprocess

    after = after_git.split()[0]
    if "modified" in after_git:
        return None
    result = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "diff", "--quiet", before, after, "--",
                             "app", "gunicorn.conf.py"], capture_output=True, timeout=60)
    return {0: False, 1: True}.get(result.returncode)
