"""The coordinator: services, one gunicorn per configuration, generator processes, the sweep."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from bench import report
from bench.baseline import Baseline
from bench.soak import busy, churn, churn_pool
from bench.stack import AppStack, Services, cpu_seconds, machine_busy_seconds, memory, raise_nofile

BENCH_ROOT = Path(__file__).resolve().parents[1]  # the checkout holding bench/ and tests/harness


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Generators:
    """N `python -m bench.loadgen` processes, driven over stdin/stdout (one JSON line each way)."""

    def __init__(self, count: int, compression: str, log_dir: Path):
        self.procs = []
        for n in range(count):
            err = open(log_dir / f"loadgen-{n}.log", "ab")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", "--compression", compression], cwd=BENCH_ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1))
        self.pool = ThreadPoolExecutor(max_workers=count)

    def pids(self):
        return [p.pid for p in self.procs]

    @staticmethod
    def _exchange(proc, command):
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator {proc.pid} exited ({proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load generator {proc.pid}: {reply['error']}")
        return reply

    def submit(self, commands: list[dict]):
        """One command per process, without waiting: the futures (the coordinator samples meanwhile)."""
        return [self.pool.submit(self._exchange, p, c) for p, c in zip(self.procs, commands)]

    def call(self, commands: list[dict], timeout: float) -> list[dict]:
        futures = self.submit(commands)
        deadline = time.monotonic() + timeout
        return [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]

    def close(self):
        try:
            self.call([{"cmd": "close"}] * len(self.procs), timeout=90)
        except Exception as exc:  # noqa: BLE001
            log(f"generator close: {exc}")
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.pool.shutdown(wait=False, cancel_futures=True)


def split(items, n):
    return [items[i::n] for i in range(n)]


def machine_info(repo: Path) -> dict:
    def first(path, key):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            return "?"
        return "?"

    def version(mod):
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:  # noqa: BLE001
            return None

    rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "app", "gunicorn.conf.py"],
                           capture_output=True, text=True).stdout.strip()
    os_name = platform.platform()
    try:
        os_name = next(l.split("=", 1)[1].strip('"') for l in Path("/etc/os-release").read_text().splitlines() if l.startswith("PRETTY_NAME="))
    except Exception:  # noqa: BLE001
        pass
    return {
        "cpus": os.cpu_count(), "cpu_model": first("/proc/cpuinfo", "model name"),
        "mem_gib": round(int(first("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1),
        "os": os_name, "kernel": platform.release(), "python": platform.python_version(),
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "repo": str(repo), "git": rev + (" (app modified)" if dirty else ""),
        "versions": {m: version(m) for m in ("django", "channels", "channels-redis", "redis", "uvicorn", "uvicorn-worker",
                                             "gunicorn", "websockets", "uvloop", "httptools", "psycopg")},
    }


class Bench:
    def __init__(self, args):
        self.args = args
        self.repo = Path(args.repo).resolve()
        self.out = Path(args.out)
        # The reference results are committed; their logs (MBs of access lines) are not.
        self.log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-")) if args.mode == "reference" else self.out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.time_limit

    def left(self):
        return self.deadline - time.monotonic()

    def run(self) -> dict:
        a = self.args
        nofile = raise_nofile()
        log(f"open-file limit {nofile}; repo {self.repo}; output {self.out}")
        results = {
            "mode": a.mode, "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(self.repo),
            "workload": {"clients": a.clients, "rooms": a.rooms, "room_size": a.clients // a.rooms,
                         "loads": a.loads, "step_seconds": a.duration, "drain_seconds": a.drain,
                         "generator_processes": a.gen_procs, "client_compression": a.compression,
                         "p99_limit_ms": report.P99_LIMIT_MS,
                         "busy": {"sockets": a.busy, "minutes": a.busy_minutes, "offered_deliveries_per_s": a.busy_load,
                                  "step_seconds": a.busy_step, "room_size": a.idle_room_size} if a.busy else None,
                         "churn": {"reconnects_per_s": a.churn, "minutes": a.churn_minutes, "hold_seconds": a.churn_hold,
                                   "sample_seconds": a.churn_sample} if a.churn else None},
            "configs": [], "logs": str(self.log_dir),
        }
        baseline = Baseline(BENCH_ROOT, a.baseline) if a.baseline else None
        services = Services()
        self.services = services
        try:
            if baseline:
                base_repo = baseline.__enter__()
                results["baseline"] = {"ref": a.baseline, "commit": baseline.commit, "machine": machine_info(base_repo),
                                       "worktree": str(base_repo), "configs": []}
                log(f"baseline (before): {a.baseline} = {baseline.commit[:12]} in {base_repo}")
            # Phase by phase, before then after: the two are measured close together in time.
            checkouts = ([("before", base_repo, results["baseline"])] if baseline else []) + [("after", self.repo, results)]
            # The schema and seeded data come from this checkout (a baseline shares them).
            first = AppStack(services, self.repo, a.configs[0][1], a.configs[0][0], a.app_env, self.log_dir)
            first.prepare()
            t = time.monotonic()
            rooms_needed = max(a.rooms, -(-max(a.idle, a.busy) // a.idle_room_size))
            seeded = first.seed(max(a.clients, a.idle, a.busy, churn_pool(a.churn, a.churn_hold, 10**9) if a.churn else 0),
                                rooms_needed)
            log(f"seeded {len(seeded['sessions'])} users+sessions and {len(seeded['rooms'])} rooms in {time.monotonic() - t:.1f} s")
            for layer, workers in a.configs:
                for label, repo, into in checkouts:
                    if self.left() < 30:
                        log("time limit reached; skipping the remaining configurations")
                        break
                    into["configs"].append(self.sweep(AppStack(services, repo, workers, layer, a.app_env, self.log_dir), seeded))
                    services.flush_redis()
            layer, workers = a.configs[0]
            phases = [("idle", a.idle, self.idle, 60), ("busy", a.busy, lambda st, sd: busy(self, st, sd), a.busy_minutes * 60 + 60),
                      ("churn", a.churn, lambda st, sd: churn(self, st, sd), a.churn_minutes * 60 + 60)]
            for phase, wanted, measure, needs in phases:
                for label, repo, into in checkouts:
                    if not wanted:
                        continue
                    if self.left() < needs:
                        log(f"time limit reached; {phase} ({label}) skipped")
                        continue
                    into[phase] = measure(AppStack(services, repo, workers, layer, a.app_env, self.log_dir), seeded)
                    services.flush_redis()
        finally:
            services.stop()
            if baseline:
                baseline.__exit__(None, None, None)
        results["recommendation"] = report.recommend(results)
        return results

    # --- one configuration: connect the clients, sweep the load ---------------
    def sweep(self, stack: AppStack, seeded) -> dict:
        a = self.args
        name = f"{stack.layer}-w{stack.workers}"
        stack.start()
        log(f"{name}: gunicorn start -> /readyz 200 in {stack.ready_seconds:.2f} s")
        cfg = {"name": name, "layer": stack.layer, "workers": stack.workers, "extra_env": a.app_env,
               "ready_seconds": round(stack.ready_seconds, 3), "steps": []}
        gens = Generators(a.gen_procs, a.compression, self.log_dir)
        try:
            clients = [[i, seeded["rooms"][i % a.rooms], seeded["sessions"][i]] for i in range(a.clients)]
            t = time.monotonic()
            replies = gens.call([{"cmd": "connect", "base": f"ws://127.0.0.1:{stack.port}", "origin": f"https://127.0.0.1:{stack.port}",
                                  "clients": part, "concurrency": 32, "timeout": min(120, self.left())}
                                 for part in split(clients, a.gen_procs)], timeout=min(150, self.left() + 30))
            connected = {c for r in replies for c in r["connected"]}
            failed = {}
            for r in replies:
                for k, v in r["failed"].items():
                    failed[k] = failed.get(k, 0) + v
            cfg["connected"] = len(connected)
            cfg["connect_seconds"] = round(time.monotonic() - t, 2)
            cfg["connect_failed"] = failed
            log(f"{name}: {len(connected)}/{a.clients} clients connected in {cfg['connect_seconds']} s" + (f"; failed {failed}" if failed else ""))
            room_sizes = {}
            for cid in connected:
                room_sizes[clients[cid][1]] = room_sizes.get(clients[cid][1], 0) + 1
            room_size = a.clients / a.rooms
            app_pids = stack.pids()
            svc_pids = {"redis": descendants(self.services.redis.proc.pid), "postgres": descendants(self.services.postgres.proc.pid)}
            if a.warmup:
                gens.call([{"cmd": "run", "step": -1, "rate": 0.2, "duration": a.warmup, "drain": 1, "room_sizes": room_sizes}] * a.gen_procs,
                          timeout=a.warmup + 60)
            for step_no, load in enumerate(a.loads):
                if self.left() < a.duration + a.drain + 20:
                    log(f"{name}: time limit reached; sweep stops before {load}/s")
                    break
                rate = load / (a.clients * room_size)
                svc_pids["postgres"] = descendants(self.services.postgres.proc.pid)
                before = {"app": cpu_seconds(app_pids), "gen": cpu_seconds(gens.pids()),
                          **{k: cpu_seconds(v) for k, v in svc_pids.items()}, "machine": machine_busy_seconds()}
                profiler = self.start_profile(name, load, app_pids) if a.profile and load == a.profile_load else None
                t0 = time.monotonic()
                parts = gens.call([{"cmd": "run", "step": step_no, "rate": rate, "duration": a.duration, "drain": a.drain,
                                    "room_sizes": room_sizes}] * a.gen_procs, timeout=a.duration + a.drain + 120)
                elapsed = time.monotonic() - t0
                if profiler:
                    self.finish_profile(profiler)
                after = {"app": cpu_seconds(app_pids), "gen": cpu_seconds(gens.pids()),
                         **{k: cpu_seconds(v) for k, v in svc_pids.items()}, "machine": machine_busy_seconds()}
                used = {k: after[k] - before[k] for k in before}
                cores = {f"{k if k != 'gen' else 'generator'}_cores": round(v / elapsed, 2) for k, v in used.items()}
                # Everything else on the machine meanwhile (other jobs: the noise in these numbers).
                cores["other_cores"] = round((used["machine"] - used["app"] - used["gen"] - used["redis"] - used["postgres"]) / elapsed, 2)
                step = report.aggregate(parts, load, rate, {**cores, "memory": memory(app_pids), "elapsed_s": round(elapsed, 2)})
                delivered = max(1, step["delivered"])
                step["app_cpu_us_per_delivery"] = round(used["app"] / delivered * 1e6, 1)
                step["generator_cpu_us_per_delivery"] = round(used["gen"] / delivered * 1e6, 1)
                cfg["steps"].append(step)
                print(report.row(name, step), flush=True)
                if step["p99_ms"] is None or step["p99_ms"] > a.stop_p99_ms or step["lost"] > a.stop_lost * max(1, step["expected"]):
                    log(f"{name}: saturated at {load}/s (p99 {step['p99_ms']} ms, lost {step['lost']}); next configuration")
                    break
            cfg["knee"] = report.knee(cfg["steps"])
        finally:
            gens.close()
            stack.stop()
        return cfg

    # --- idle sockets ----------------------------------------------------------
    def start_phase(self, stack: AppStack, phase: str, doing: str) -> str:
        """A fresh gunicorn for one memory phase (idle, busy, churn); its name."""
        name = f"{stack.layer}-w{stack.workers}"
        stack.start()
        log(f"{phase}: {name} ready in {stack.ready_seconds:.2f} s; {doing}")
        time.sleep(1)
        return name

    def idle(self, stack: AppStack, seeded) -> dict:
        a = self.args
        name = self.start_phase(stack, "idle", f"connecting {a.idle} sockets")
        pids = stack.pids()
        before = memory(pids)
        gens = Generators(a.gen_procs, a.compression, self.log_dir)
        try:
            rooms = seeded["rooms"]
            clients = [[i, rooms[(i // a.idle_room_size) % len(rooms)], seeded["sessions"][i]] for i in range(a.idle)]
            t = time.monotonic()
            replies = gens.call([{"cmd": "connect", "base": f"ws://127.0.0.1:{stack.port}", "origin": f"https://127.0.0.1:{stack.port}",
                                  "clients": part, "concurrency": 64, "timeout": min(240, self.left())}
                                 for part in split(clients, a.gen_procs)], timeout=min(300, self.left() + 60))
            connect_seconds = time.monotonic() - t
            connected = {c for r in replies for c in r["connected"]}
            failed = {}
            for r in replies:
                for k, v in r["failed"].items():
                    failed[k] = failed.get(k, 0) + v
            time.sleep(2)
            after = memory(pids)
            gen_mem = memory(gens.pids())
            log(f"idle: {len(connected)}/{a.idle} held after {connect_seconds:.1f} s; failed {failed or 'none'}")
            # Still alive and in their rooms? One sender in each of up to 50 rooms, ~2 messages each.
            room_sizes = {}
            first_in_room = {}
            for cid in sorted(connected):
                room_sizes[clients[cid][1]] = room_sizes.get(clients[cid][1], 0) + 1
                first_in_room.setdefault(clients[cid][1], cid)
            senders = list(first_in_room.values())[:50]
            parts = gens.call([{"cmd": "run", "step": 10_000, "rate": 1.0, "duration": 2, "drain": 3, "room_sizes": room_sizes,
                                "senders": senders, "min_sends": 1}] * a.gen_procs, timeout=90)
            probe = report.aggregate(parts, 0, 1.0, {})
            held = len(connected)
            return {
                "config": name, "target": a.idle, "held": held, "failed": failed, "connect_seconds": round(connect_seconds, 1),
                "ready_seconds": round(stack.ready_seconds, 3), "before": before, "after": after, "generator_memory": gen_mem,
                "per_socket_rss_kib": round((after["rss"] - before["rss"]) / max(1, held) / 1024, 2),
                "per_socket_pss_kib": round((after["pss"] - before["pss"]) / max(1, held) / 1024, 2),
                "probe": {"expected": probe["expected"], "delivered": probe["delivered"], "lost": probe["lost"],
                          "duplicated": probe["duplicated"], "p99_ms": probe["p99_ms"], "errors": probe["errors"]},
            }
        finally:
            gens.close()
            stack.stop()

    # --- py-spy ------------------------------------------------------------------
    def start_profile(self, name, load, pids):
        spy = Path(sys.executable).with_name("py-spy")
        procs = []
        for pid in pids[1:]:  # the workers
            out = self.out / f"profile-{name}-{load}-{pid}.txt"
            procs.append(subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(self.args.duration)),
                                           "--rate", "200", "--format", "raw", "--nonblocking", "-o", str(out)],
                                          stdout=subprocess.DEVNULL, stderr=open(self.log_dir / f"py-spy-{pid}.log", "ab")))
        return procs

    def finish_profile(self, procs):
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
