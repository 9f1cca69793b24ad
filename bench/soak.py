"""Memory under load: busy sockets (everyone keeps talking) and a connect/disconnect churn soak.

busy:  a fresh gunicorn; memory (RSS and PSS of master + workers, /proc) before the clients
       connect; `--busy` sockets in rooms of 20 that all keep sending Poisson-spaced messages
       for `--busy-minutes` (as consecutive `--busy-step` second steps, so the generator's
       duplicate check stays bounded); memory again; (after - before) / sockets held is the
       KiB per busy socket. Then a liveness probe: one sender in each of up to 50 rooms sends
       at least one message, which every member must receive.
churn: a fresh gunicorn; sockets connect at `--churn` per second, each reads for
       `--churn-hold` s and closes (so about rate x hold are open at once) for
       `--churn-minutes`; the workers' RSS is sampled every `--churn-sample` s; the slope
       (least squares, KiB/min) over the second half says whether memory stays flat.
"""
from __future__ import annotations

import time

from bench import report
from bench.stack import cpu_seconds, machine_busy_seconds, memory
from tests.harness.sockets import established

BUSY_STEP_BASE = 20_000  # step numbers of busy sub-steps (the sweep uses 0.., the idle probe 10,000)
PROBE_STEP = 30_000
LAT_CAP = 20_000  # latencies kept per generator process per sub-step (a uniform sample)


def _connect(bench, gens, stack, clients, concurrency=64):
    from bench.run import split

    a = bench.args
    t = time.monotonic()
    replies = gens.call([{"cmd": "connect", "base": f"ws://127.0.0.1:{stack.port}", "origin": f"https://127.0.0.1:{stack.port}",
                          "clients": part, "concurrency": concurrency, "timeout": min(240, bench.left())}
                         for part in split(clients, a.gen_procs)], timeout=min(300, bench.left() + 60))
    connected = {c for r in replies for c in r["connected"]}
    failed: dict[str, int] = {}
    for r in replies:
        for k, v in r["failed"].items():
            failed[k] = failed.get(k, 0) + v
    return connected, failed, time.monotonic() - t


def _cpu(bench, app_pids, gen_pids) -> dict:
    from bench.run import descendants

    svc = bench.services
    return {"app": cpu_seconds(app_pids), "gen": cpu_seconds(gen_pids),
            "redis": cpu_seconds(descendants(svc.redis.proc.pid)), "postgres": cpu_seconds(descendants(svc.postgres.proc.pid)),
            "machine": machine_busy_seconds()}


def _cores(before: dict, after: dict, elapsed: float) -> dict:
    used = {k: after[k] - before[k] for k in before}
    out = {f"{k if k != 'gen' else 'generator'}_cores": round(v / elapsed, 2) for k, v in used.items() if k != "machine"}
    # Everything else on the machine meanwhile: the noise in these numbers.
    out["other_cores"] = round((used["machine"] - used["app"] - used["gen"] - used["redis"] - used["postgres"]) / elapsed, 2)
    return out


def busy(bench, stack, seeded) -> dict:
    from bench.run import Generators, log

    a = bench.args
    name = bench.start_phase(stack, "busy", f"connecting {a.busy} sockets")
    pids = stack.pids()
    before = memory(pids)
    gens = Generators(a.gen_procs, a.compression, bench.log_dir)
    try:
        rooms, size = seeded["rooms"], a.idle_room_size
        clients = [[i, rooms[(i // size) % len(rooms)], seeded["sessions"][i]] for i in range(a.busy)]
        connected, failed, connect_seconds = _connect(bench, gens, stack, clients)
        held = len(connected)
        log(f"busy: {held}/{a.busy} connected in {connect_seconds:.1f} s; failed {failed or 'none'}; "
            f"{a.busy_load:.0f} offered deliveries/s for {a.busy_minutes} min")
        room_sizes: dict[int, int] = {}
        for cid in connected:
            room_sizes[clients[cid][1]] = room_sizes.get(clients[cid][1], 0) + 1
        # Per-client rate so that the whole offers busy_load deliveries/s: each message reaches its room.
        rate = a.busy_load / max(1, sum(n * n for n in room_sizes.values()))
        after_connect = memory(pids)
        total = a.busy_minutes * 60
        steps, lat = [], []
        cpu0 = _cpu(bench, pids, gens.pids())
        t0 = time.monotonic()
        k = 0
        sending = 0.0  # seconds of sending so far (the drains between sub-steps do not count)
        while k < 100_000:
            step_s = min(a.busy_step, total - sending)
            if step_s < 0.5:
                break
            if bench.left() < step_s + a.busy_drain + 60:
                log("busy: time limit reached; the busy period ends early")
                break
            parts = gens.call([{"cmd": "run", "step": BUSY_STEP_BASE + k, "rate": rate, "duration": step_s,
                                "drain": a.busy_drain, "room_sizes": room_sizes, "lat_cap": LAT_CAP}] * a.gen_procs,
                              timeout=step_s + a.busy_drain + 120)
            for p in parts:
                lat.extend(p["lat_us"])
            st = report.aggregate(parts, a.busy_load, rate, {"t_s": round(time.monotonic() - t0, 1), "memory": memory(pids)})
            steps.append({k2: v for k2, v in st.items() if k2 not in ("rate_per_client",)})
            sending += step_s
            k += 1
        elapsed = time.monotonic() - t0
        cores = _cores(cpu0, _cpu(bench, pids, gens.pids()), max(0.1, elapsed))
        after = memory(pids)
        # Still alive and in their rooms? One sender in each of up to 50 rooms, at least one message each.
        first_in_room: dict[int, int] = {}
        for cid in sorted(connected):
            first_in_room.setdefault(clients[cid][1], cid)
        senders = list(first_in_room.values())[:50]
        parts = gens.call([{"cmd": "run", "step": PROBE_STEP, "rate": 1.0, "duration": 1, "drain": 3, "room_sizes": room_sizes,
                            "senders": senders, "min_sends": 1}] * a.gen_procs, timeout=90)
        probe = report.aggregate(parts, 0, 1.0, {})
        lat.sort()

        def ms(q):
            v = report.percentile(lat, q)
            return None if v is None else round(v / 1000, 2)

        totals = {key: sum(s[key] for s in steps) for key in ("sent", "expected", "delivered", "lost", "duplicated")}
        window = sum(s["window_s"] for s in steps)
        result = {
            "config": name, "target": a.busy, "held": held, "failed": failed, "connect_seconds": round(connect_seconds, 1),
            "ready_seconds": round(stack.ready_seconds, 3), "minutes_requested": a.busy_minutes,
            "minutes_run": round(sending / 60, 2), "wall_minutes": round(elapsed / 60, 2), "offered_deliveries_per_s": a.busy_load, "rate_per_client": rate,
            **totals, "delivered_per_s": round(sum(s["delivered_per_s"] * s["window_s"] for s in steps) / window, 1) if window else 0,
            "p50_ms": ms(0.50), "p99_ms": ms(0.99), "max_ms": ms(1.0),
            "open_sockets_end": steps[-1]["open_sockets"] if steps else None,
            "before": before, "after_connect": after_connect, "after": after,
            "per_socket_rss_kib": round((after["rss"] - before["rss"]) / max(1, held) / 1024, 2),
            "per_socket_pss_kib": round((after["pss"] - before["pss"]) / max(1, held) / 1024, 2),
            "growth_while_busy_pss_kib_per_socket": round((after["pss"] - after_connect["pss"]) / max(1, held) / 1024, 2),
            **cores, "steps": steps,
            "probe": {"senders": len(senders), "expected": probe["expected"], "delivered": probe["delivered"],
                      "lost": probe["lost"], "duplicated": probe["duplicated"], "p99_ms": probe["p99_ms"],
                      "errors": probe["errors"]},
        }
        log(f"busy: {report.busy_line(result)}")
        return result
    finally:
        gens.close()
        stack.stop()


def churn(bench, stack, seeded) -> dict:
    from bench.run import Generators, log, split

    a = bench.args
    name = bench.start_phase(stack, "churn", f"{a.churn:.0f} reconnects/s for {a.churn_minutes} min")
    gens = Generators(a.gen_procs, a.compression, bench.log_dir)
    try:
        rooms = seeded["rooms"]
        pool = churn_pool(a.churn, a.churn_hold, len(seeded["sessions"]))
        clients = [[i, rooms[i % len(rooms)], seeded["sessions"][i]] for i in range(pool)]
        duration = a.churn_minutes * 60
        workers0 = stack.pids()[1:]
        cpu0 = _cpu(bench, stack.pids(), gens.pids())
        samples = []
        t0 = time.monotonic()
        futures = gens.submit([{"cmd": "churn", "base": f"ws://127.0.0.1:{stack.port}", "origin": f"https://127.0.0.1:{stack.port}",
                                "clients": part, "rate": a.churn / a.gen_procs, "duration": duration, "hold": a.churn_hold,
                                "concurrency": max(16, int(a.churn * a.churn_hold * 4 / a.gen_procs)), "timeout": 30}
                               for part in split(clients, a.gen_procs)])
        limit = duration + a.churn_hold + 120
        while len(samples) < 100_000:
            now = time.monotonic() - t0
            pids = stack.pids()  # read each time: a restarted worker shows up as a new pid
            m, w = memory(pids), memory(pids[1:])
            samples.append({"t_s": round(now, 2), "rss": m["rss"], "pss": m["pss"], "workers_rss": w["rss"],
                            "workers_pss": w["pss"], "workers": len(pids) - 1,
                            # what the RSS follows: sockets the server holds (in handshake or open)
                            "open": established(stack.port)})
            if all(f.done() for f in futures) or now > limit:
                break
            time.sleep(max(0.0, min(a.churn_sample, t0 + len(samples) * a.churn_sample - time.monotonic())))
        replies = [f.result(timeout=max(1.0, limit - (time.monotonic() - t0))) for f in futures]
        elapsed = time.monotonic() - t0
        cores = _cores(cpu0, _cpu(bench, stack.pids(), gens.pids()), max(0.1, elapsed))
        failed: dict[str, int] = {}
        for r in replies:
            for k, v in r["failed"].items():
                failed[k] = failed.get(k, 0) + v
        completed = sum(r["completed"] for r in replies)
        during = [s for s in samples if s["t_s"] <= duration + 0.5]
        half = [s for s in during if s["t_s"] >= duration / 2]
        result = {
            "config": name, "rate_requested": a.churn, "hold_seconds": a.churn_hold, "minutes": a.churn_minutes,
            "sessions": pool, "ready_seconds": round(stack.ready_seconds, 3),
            "started": sum(r["started"] for r in replies), "completed": completed,
            "completed_per_s": round(completed / duration, 1) if duration else 0,
            "closed_by_server": sum(r["closed_by_server"] for r in replies), "skipped": sum(r["skipped"] for r in replies),
            "failed": failed, "workers_restarted": sorted(set(stack.pids()[1:]) ^ set(workers0)) != [],
            "rss_start": during[0]["workers_rss"] if during else None, "rss_end": during[-1]["workers_rss"] if during else None,
            "workers_rss_slope_kib_per_min": slope_kib_per_min([(s["t_s"], s["workers_rss"]) for s in half]),
            "workers_pss_slope_kib_per_min": slope_kib_per_min([(s["t_s"], s["workers_pss"]) for s in half]),
            "slope_samples": len(half), "sample_seconds": a.churn_sample, **cores, "samples": samples,
        }
        log(f"churn: {report.churn_line(result)}")
        return result
    finally:
        gens.close()
        stack.stop()


def churn_pool(rate: float, hold: float, available: int) -> int:
    """Sessions to rotate through: several times the sockets open at once (per-user socket limit)."""
    return max(1, min(available, max(100, int(rate * hold * 5))))


def slope_kib_per_min(points: list[tuple[float, float]]):
    """Least-squares slope of (seconds, bytes) points in KiB per minute (None under 3 points)."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return round(sxy / sxx * 60 / 1024, 1)
