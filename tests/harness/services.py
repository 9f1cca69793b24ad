"""Real services as subprocesses on 127.0.0.1: Redis, PostgreSQL, gunicorn.

Each is started on a free port in its own temporary directory and stopped by
`stop()`. Used by the integration tests, the contract's "bare" target, the
benchmark and the fault suite, so they all run the same production stack.

Every process started here is also registered, and `stop_all()` (called when
the pytest session ends, at interpreter exit and on SIGTERM/SIGHUP) stops
whatever is still running, so a session that errors or is interrupted leaves
no Redis, PostgreSQL or gunicorn behind.
"""
from __future__ import annotations

import atexit
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.harness import prod_venv, release

REPO = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")

_running: list = []  # services started and not yet stopped, oldest first


def _started(service) -> None:
    if service not in _running:
        _running.append(service)


def _stopped(service) -> None:
    if service in _running:
        _running.remove(service)


def running() -> list:
    return list(_running)


def stop_all() -> list[str]:
    """Stop every service still running (newest first); returns what was stopped."""
    stopped = []
    for service in reversed(list(_running)):
        try:
            service.stop()
        except Exception:  # keep stopping the others
            pass
        stopped.append(type(service).__name__)
        _stopped(service)
    return stopped


def stop_all_on_signals() -> None:
    """SIGTERM/SIGHUP (a CI timeout, a closed terminal) end the session as Ctrl-C
    does: pytest then tears every fixture down (containers, labs) and its
    session-finish hook calls stop_all() for whatever is left."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


atexit.register(stop_all)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_port_rng = random.Random()


def free_port() -> int:
    """A free port for a server, outside the kernel's ephemeral range: a port
    the kernel handed out (bind to 0) can be taken meanwhile as the local port
    of one of the hundreds of client connections a test opens, and the server
    then fails with "Address already in use"."""
    low, high = _EPHEMERAL
    candidates = [p for p in range(10000, 65536) if not low <= p <= high]
    for _ in range(200):
        port = _port_rng.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port outside the ephemeral range")


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None, what: str = "service"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _terminate(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout=15):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    def __init__(self, password: str | None = None, port: int | None = None, args: tuple = ()):
        self.port = port or free_port()
        self.password = password
        self.args = list(args)  # extra redis-server arguments (e.g. --replicaof)
        # Its working directory: a replica writes the primary's snapshot there.
        self.dir = tempfile.mkdtemp(prefix="chat-redis-")
        self.proc = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--maxmemory-policy", "noeviction", "--loglevel", "warning", "--dir", self.dir]
        if self.password:
            # masterauth too: a server that Sentinel turns into a replica must
            # authenticate to its new primary.
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        self.proc = subprocess.Popen(cmd + self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _started(self)
        wait_for_port(self.port, proc=self.proc, what="redis-server")
        return self

    def stop(self):
        _terminate(self.proc)
        _stopped(self)

    def kill(self):
        """SIGKILL: no shutdown, as a crashed process or a lost host."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _stopped(self)

    def client(self, **kwargs):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5, **kwargs)

    def role(self) -> str:
        """"master" or "slave" (INFO replication), "down" when it does not answer."""
        try:
            with self.client() as r:
                return r.info("replication")["role"]
        except Exception:
            return "down"

    restart = start


class RedisSentinel:
    """One `redis-server --sentinel` on 127.0.0.1 watching `master` at
    127.0.0.1:`primary_port`. Sentinel rewrites its config file, so each has
    its own directory."""

    def __init__(self, master: str, primary_port: int, *, quorum: int = 2, password: str | None = None,
                 auth_pass: str | None = None, down_after_ms: int = 1000, failover_timeout_ms: int = 6000):
        self.port = free_port()
        self.master, self.password = master, password
        self.dir = Path(tempfile.mkdtemp(prefix="chat-sentinel-"))
        lines = [f"port {self.port}", "bind 127.0.0.1", "daemonize no", f"dir {self.dir}", "loglevel notice",
                 f"logfile {self.dir / 'sentinel.log'}",
                 f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}",
                 f"sentinel down-after-milliseconds {master} {down_after_ms}",
                 f"sentinel failover-timeout {master} {failover_timeout_ms}",
                 f"sentinel parallel-syncs {master} 1"]
        if auth_pass:
            lines.append(f"sentinel auth-pass {master} {auth_pass}")
        if password:
            # The sentinels' own password (clients: REDIS_SENTINEL_PASSWORD),
            # which they also use to talk to each other.
            lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        (self.dir / "sentinel.conf").write_text("\n".join(lines) + "\n")
        self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RedisSentinel":
        self.proc = subprocess.Popen(["redis-server", str(self.dir / "sentinel.conf"), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _started(self)
        wait_for_port(self.port, proc=self.proc, what="redis-sentinel")
        return self

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def master_port(self) -> int | None:
        try:
            with self.client() as r:
                addr = r.sentinel_get_master_addr_by_name(self.master)
        except Exception:
            return None
        return int(addr[1]) if addr else None

    def log(self) -> str:
        path = self.dir / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self):
        _terminate(self.proc)
        _stopped(self)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelRedis:
    """A primary, a replica and three sentinels on 127.0.0.1: the smallest
    Redis Sentinel deployment that survives the loss of any one process."""

    def __init__(self, master: str = "chat", *, down_after_ms: int = 1000, failover_timeout_ms: int = 6000,
                 password: str | None = None, sentinel_password: str | None = None, sentinels: int = 3):
        self.master = master
        self.password = password if password is not None else secrets.token_hex(16)
        self.sentinel_password = sentinel_password if sentinel_password is not None else secrets.token_hex(16)
        self.servers = [RedisServer(password=self.password)]
        self.servers.append(RedisServer(password=self.password, args=("--replicaof", "127.0.0.1", str(self.servers[0].port))))
        self.sentinels = [RedisSentinel(master, self.servers[0].port, quorum=2, password=self.sentinel_password,
                                        auth_pass=self.password, down_after_ms=down_after_ms,
                                        failover_timeout_ms=failover_timeout_ms) for _ in range(sentinels)]

    def start(self, timeout: float = 30.0) -> "SentinelRedis":
        for server in self.servers:
            server.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait(lambda: self.servers[1].role() == "slave" and self._replica_in_sync(), timeout, "replica in sync")
        # Every sentinel knows the others and the replica before a test kills anything.
        self.wait(lambda: all(self._sentinel_sees_all(s) for s in self.sentinels), timeout, "sentinels see each other")
        return self

    def _replica_in_sync(self) -> bool:
        try:
            with self.servers[1].client() as r:
                return r.info("replication").get("master_link_status") == "up"
        except Exception:
            return False

    def _sentinel_sees_all(self, sentinel) -> bool:
        try:
            with sentinel.client() as r:
                state = r.sentinel_master(self.master)
                replicas = r.sentinel_slaves(self.master)
        except Exception:
            return False
        return (int(state.get("num-other-sentinels", 0)) >= len(self.sentinels) - 1
                and any(not rep.get("is_sdown") and not rep.get("is_odown") for rep in replicas))

    @staticmethod
    def wait(predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for: {what}")
            time.sleep(0.1)

    def env(self) -> dict:
        """The app's settings for these sentinels (README: Settings)."""
        return {"REDIS_SENTINELS": ",".join(s.address for s in self.sentinels), "REDIS_SENTINEL_MASTER": self.master,
                "REDIS_PASSWORD": self.password, "REDIS_SENTINEL_PASSWORD": self.sentinel_password}

    def primary_port(self) -> int | None:
        """The primary as a majority of the sentinels name it."""
        ports = [s.master_port() for s in self.sentinels]
        best = max(set(ports), key=ports.count)
        return best if ports.count(best) * 2 > len(ports) else None

    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(s for s in self.servers if s.port == port)

    def replicas(self) -> list[RedisServer]:
        port = self.primary_port()
        return [s for s in self.servers if s.port != port]

    def stop(self):
        for thing in [*self.sentinels, *self.servers]:
            try:
                thing.stop()
            except Exception:
                pass
        for sentinel in self.sentinels:
            shutil.rmtree(sentinel.dir, ignore_errors=True)


class PostgresServer:
    """A private cluster; initdb refuses root, so it runs as `postgres` then."""

    def __init__(self):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chat-pg-"))
        self.password = secrets.token_urlsafe(16)
        self.proc = None
        # Started as `postgres` directly (not through runuser) so that stop()'s
        # signal reaches the postmaster itself.
        self.as_user = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}

    @property
    def url(self) -> str:
        return f"postgres://chat:{self.password}@127.0.0.1:{self.port}/chat"

    def start(self) -> "PostgresServer":
        data = self.dir / "data"
        if not data.exists():
            if self.as_user:
                pw = pwd.getpwnam("postgres")
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            pwfile = self.dir / "pw"
            pwfile.write_text(self.password + "\n")
            if self.as_user:
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            subprocess.run(
                [str(PG_BIN / "initdb"), "-D", str(data), "-U", "chat", "--pwfile", str(pwfile),
                 "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir, **self.as_user,
            )
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir, **self.as_user,
        )
        _started(self)
        wait_for_port(self.port, proc=self.proc, what="postgres")
        self._create_database()
        return self

    def _create_database(self):
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(
                ["psql", f"postgres://chat:{self.password}@127.0.0.1:{self.port}/postgres", "-tAc",
                 "SELECT 1 FROM pg_database WHERE datname='chat'"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not accepting connections: {r.stderr}")
            time.sleep(0.2)
        if r.stdout.strip() != "1":
            subprocess.run(["psql", f"postgres://chat:{self.password}@127.0.0.1:{self.port}/postgres", "-qc", "CREATE DATABASE chat"],
                           check=True, capture_output=True)

    def stop(self):
        _terminate(self.proc, signal.SIGINT)  # "fast" shutdown
        _stopped(self)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def production_env(redis_url: str, database_url: str, port: int, **extra) -> dict:
    """The environment a platform gives the app: DEBUG=False and the URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST_"))}
    env.update(
        DEBUG="False",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        SITE_DOMAIN=f"127.0.0.1:{port}",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PORT=str(port),
        WEB_CONCURRENCY="2",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def manage(env: dict, *args, check=True, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """A release step (e.g. migrate), run in the staged release (tests/harness/release.py)
    with the production lock's interpreter; `cwd` runs it in another staged release."""
    python = str(prod_venv.ensure() / "python")
    return subprocess.run([python, "manage.py", *args], cwd=cwd or release.stage(), env=env, capture_output=True,
                          text=True, check=check, timeout=timeout)


class Gunicorn:
    """The runtime contract: a bare `gunicorn` in the release's root (the
checkout staged by tests/harness/release.py), from the production lock's venv
(tests/harness/prod_venv.py)."""

    def __init__(self, env: dict, log_path: Path | None = None, cwd: Path | None = None):
        self.env = env
        # A staged release: the benchmark stages and measures other worktrees too.
        self.cwd = cwd or release.stage()
        self.port = int(env["PORT"])
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])
        self.proc = None

    def start(self, ready_timeout: float = 30.0, until: str = "/readyz") -> "Gunicorn":
        """Start and wait until `until` answers 200 (`/healthz`: the process
        answers, whatever its dependencies say)."""
        gunicorn = prod_venv.ensure() / "gunicorn"
        self._log = open(self.log_path, "ab")
        # Never root, as on every target (the contract checks it).
        as_nobody = {"user": "nobody", "group": "nogroup"} if os.geteuid() == 0 else {}
        # Its own process group: see stop().
        self.proc = subprocess.Popen([str(gunicorn)], cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, **as_nobody)
        _started(self)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}{until}", headers={"Host": "127.0.0.1"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop(signal.SIGKILL, 10)  # not ready: do not leave it running
        raise TimeoutError(f"gunicorn not ready within {ready_timeout}s:\n{self.log()[-5000:]}")

    def kill_leftovers(self) -> int:
        """SIGKILL whatever of this instance outlived its master. A Uvicorn
        worker does not watch its parent, so a master killed with SIGKILL (a
        start that timed out, a drain that overran) left its workers serving
        the port for the rest of the session (found as orphans after a CI run).
        On the targets the container or systemd's control group ends them."""
        if self.proc is None:
            return 0
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return 0
        return 1

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, sig=signal.SIGTERM, timeout=40):
        _terminate(self.proc, sig, timeout)
        self.kill_leftovers()
        if getattr(self, "_log", None):
            self._log.close()
        _stopped(self)
