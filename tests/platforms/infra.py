"""Docker plumbing for the platform emulations: a private network, the managed
services the platforms would attach (PostgreSQL, Redis, TLS Redis) and the
containers that stand in for dynos, machines and instances.

Every container and network gets the session's unique prefix and is removed
by `Lab.cleanup()`. Tests reach containers only through ports published on
127.0.0.1 or at their address on the network this module created.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import secrets
import shlex
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER = "docker"


def sh(*args, check=True, input=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), input=input, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')[-6000:]}\n{result.stderr.decode(errors='replace')[-6000:]}"
        )
    return result


def out(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


def new_secret_key() -> str:
    return secrets.token_urlsafe(50)


def source_files() -> list[str]:
    """What `git push` would send once committed: tracked and not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sorted(p for p in listed if p and (REPO / p).is_file() and not p.startswith((".venv/", ".git/")))


def source_tar(prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in source_files():
            info = tar.gettarinfo(str(REPO / rel), arcname=prefix + rel)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(REPO / rel, "rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


def env_args(env: dict) -> list[str]:
    args = []
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    return args


@dataclass
class Http:
    status: int
    headers: dict
    body: bytes


def http_get(host: str, port: int, path: str, headers: dict | None = None, timeout: float = 5.0,
             method: str = "GET") -> Http:
    """One request, sent exactly as given: no redirects followed, Host as given."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        conn.putrequest(method, path, skip_host="Host" in hdrs or "host" in hdrs, skip_accept_encoding=True)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return Http(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


class Lab:
    """One test session's network, services and containers."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"chatplat-{secrets.token_hex(3)}"
        self.network = f"{self.prefix}-net"
        self.containers: list[str] = []
        self.images: list[str] = []
        sh(DOCKER, "network", "create", self.network)

    # -- containers ----------------------------------------------------------
    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def run(self, role: str, image: str, cmd: list[str] | None = None, *, env: dict | None = None,
            publish: list[int] = (), aliases: list[str] = (), user: str | None = None,
            read_only: bool = False, tmpfs: list[str] = (), workdir: str | None = None,
            entrypoint: str | None = None, extra: list[str] = ()) -> str:
        name = self.name(role)
        args = [DOCKER, "run", "-d", "--name", name, "--network", self.network,
                "--label", f"chatplat={self.prefix}"]
        for alias in aliases:
            args += ["--network-alias", alias]
        for port in publish:
            args += ["-p", f"127.0.0.1::{port}"]
        if user:
            args += ["--user", user]
        if read_only:
            args += ["--read-only"]
        for t in tmpfs:
            args += ["--tmpfs", t]
        if workdir:
            args += ["-w", workdir]
        if entrypoint is not None:
            args += ["--entrypoint", entrypoint]
        args += env_args(env or {})
        args += list(extra)
        args += [image] + list(cmd or [])
        self.containers.append(name)
        sh(*args)
        return name

    def run_once(self, role: str, image: str, cmd: list[str] | None = None, *, env: dict | None = None,
                 user: str | None = None, workdir: str | None = None, timeout: int = 300,
                 extra: list[str] = ()) -> subprocess.CompletedProcess:
        """A one-off container (release phase, pre-deploy, release_command), removed afterwards."""
        name = self.name(role)
        args = [DOCKER, "run", "--rm", "--name", name, "--network", self.network, "--label", f"chatplat={self.prefix}"]
        if user:
            args += ["--user", user]
        if workdir:
            args += ["-w", workdir]
        args += env_args(env or {}) + list(extra) + [image] + list(cmd or [])
        return sh(*args, check=False, timeout=timeout)

    def exec(self, name: str, cmd: list[str], *, env: dict | None = None, workdir: str | None = None,
             user: str | None = None, check=True, timeout=600) -> subprocess.CompletedProcess:
        """`docker exec`: its environment is not stored in the container's config,
        so a later `docker commit` cannot carry build-time secrets into the image."""
        args = [DOCKER, "exec"]
        if workdir:
            args += ["-w", workdir]
        if user:
            args += ["--user", user]
        args += env_args(env or {}) + [name] + cmd
        return sh(*args, check=check, timeout=timeout)

    def copy_source(self, name: str, dest: str):
        self.exec(name, ["mkdir", "-p", dest])
        sh(DOCKER, "cp", "-", f"{name}:{dest}", input=source_tar())

    def commit(self, name: str, tag: str, changes: list[str] = ()) -> str:
        args = [DOCKER, "commit"]
        for c in changes:
            args += ["-c", c]
        sh(*args, name, tag)
        self.images.append(tag)
        return tag

    def port(self, name: str, container_port: int) -> int:
        text = sh(DOCKER, "port", name, f"{container_port}/tcp").stdout.decode()
        for line in text.splitlines():
            host, _, port = line.strip().rpartition(":")
            if host == "127.0.0.1":
                return int(port)
        raise RuntimeError(f"{name}: port {container_port} not published on 127.0.0.1: {text!r}")

    def ip(self, name: str) -> str:
        data = json.loads(sh(DOCKER, "inspect", name).stdout)[0]
        return data["NetworkSettings"]["Networks"][self.network]["IPAddress"]

    def logs(self, name: str) -> str:
        return out(sh(DOCKER, "logs", name, check=False))

    def running(self, name: str) -> bool:
        r = sh(DOCKER, "inspect", "-f", "{{.State.Running}}", name, check=False)
        return r.stdout.decode().strip() == "true"

    def stop(self, name: str, timeout: int = 40):
        sh(DOCKER, "stop", "-t", str(timeout), name, check=False, timeout=timeout + 30)

    def remove(self, name: str):
        sh(DOCKER, "rm", "-f", "-v", name, check=False)
        if name in self.containers:
            self.containers.remove(name)

    def wait_tcp(self, name: str, port: int, timeout: float = 60.0) -> float:
        """Wait until the process in `name` answers HTTP on its published port
        (any status: docker-proxy accepts TCP before anything listens inside);
        returns the seconds taken."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.running(name):
                raise RuntimeError(f"{name} exited:\n{self.logs(name)[-6000:]}")
            try:
                http_get("127.0.0.1", port, "/healthz", {"Host": "probe.invalid"}, timeout=2)
                return time.monotonic() - start
            except (OSError, http.client.HTTPException):
                time.sleep(0.2)
        raise TimeoutError(f"{name} did not answer on 127.0.0.1:{port} within {timeout}s:\n{self.logs(name)[-6000:]}")

    def wait_http(self, name: str, port: int, path: str, host: str, timeout: float = 60.0,
                  headers: dict | None = None) -> Http:
        start = time.monotonic()
        last = None
        while time.monotonic() - start < timeout:
            if not self.running(name):
                raise RuntimeError(f"{name} exited:\n{self.logs(name)[-6000:]}")
            try:
                last = http_get("127.0.0.1", port, path, {"Host": host, **(headers or {})})
                if last.status == 200:
                    return last
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            time.sleep(0.3)
        raise TimeoutError(f"{name}: {path} not 200 within {timeout}s (last: {last!r}):\n{self.logs(name)[-6000:]}")

    def wait_until_healthy(self, name: str, probe, healthy, timeout: float = 60.0) -> Http:
        """Call probe() until healthy(status), as a platform's health checker
        would; the failure names the last answer and the container's log."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = probe()
                if healthy(r.status):
                    return r
                last = f"{r.status} {r.headers.get('location', '')} {r.body[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            assert time.monotonic() < deadline, f"{name}: not healthy within {timeout:.0f}s: {last}\n{self.logs(name)[-3000:]}"
            time.sleep(0.5)

    # -- managed services ----------------------------------------------------
    def postgres(self, role: str, image: str, aliases: list[str] = (), databases: list[str] = ("chat",),
                 user: str = "chat") -> "Service":
        password = secrets.token_urlsafe(18)
        creates = "\n".join(f"CREATE DATABASE {db};" for db in databases)
        script = f"""
set -e
bin=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
export PGDATA=/tmp/pg
printf '%s\\n' "$PGPASSWORD_INIT" > /tmp/pw
$bin/initdb -U {user} --pwfile=/tmp/pw --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
rm /tmp/pw
echo "host all all 0.0.0.0/0 scram-sha-256" >> $PGDATA/pg_hba.conf
printf '%s\\n' "{creates}" | $bin/postgres --single -D $PGDATA postgres >/dev/null
exec $bin/postgres -D $PGDATA -c listen_addresses='*' -c fsync=off -c max_connections=200 -c unix_socket_directories=/tmp
"""
        name = self.run(role, image, ["sh", "-c", script], env={"PGPASSWORD_INIT": password}, user="postgres",
                        aliases=list(aliases), publish=[5432])
        port = self.port(name, 5432)
        deadline = time.monotonic() + 60
        while True:
            r = self.exec(name, ["sh", "-c", f"$(ls -d /usr/lib/postgresql/*/bin | tail -1)/pg_isready -h 127.0.0.1 -U {user} -d {databases[0]}"],
                          check=False)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline or not self.running(name):
                raise RuntimeError(f"postgres did not start:\n{self.logs(name)}")
            time.sleep(0.3)
        return Service(name=name, host=(aliases or [name])[0], port=5432, published=port, user=user, password=password)

    def redis(self, role: str, image: str, aliases: list[str] = (), password: str | None = None,
              tls: bool = False) -> "Service":
        """Redis on 6379; with tls=True also a TLS port 6380 with a self-signed
        certificate made at start (what Heroku Key-Value Store presents)."""
        auth = f"--requirepass '{password}'" if password else ""
        tls_args = ""
        prep = ""
        if tls:
            prep = ("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=redis-self-signed "
                    "-keyout /tmp/tls.key -out /tmp/tls.crt 2>/dev/null\n")
            tls_args = ("--tls-port 6380 --tls-cert-file /tmp/tls.crt --tls-key-file /tmp/tls.key "
                        "--tls-auth-clients no")
        script = (f"set -e\n{prep}exec redis-server --port 6379 --bind 0.0.0.0 --protected-mode no --save '' "
                  f"--appendonly no --maxmemory-policy noeviction {auth} {tls_args}")
        name = self.run(role, image, ["sh", "-c", script], aliases=list(aliases), publish=[6379], user="redis")
        port = self.port(name, 6379)
        deadline = time.monotonic() + 30
        while True:
            ping = ["redis-cli", "-p", "6379"] + (["-a", password, "--no-auth-warning"] if password else []) + ["ping"]
            if self.exec(name, ping, check=False).stdout.strip() == b"PONG":
                break
            if time.monotonic() > deadline or not self.running(name):
                raise RuntimeError(f"redis did not start:\n{self.logs(name)}")
            time.sleep(0.2)
        return Service(name=name, host=(aliases or [name])[0], port=6380 if tls else 6379, published=port,
                       password=password, tls=tls)

    def cleanup(self):
        for name in list(self.containers):
            self.remove(name)
        # Anything left behind with our label (e.g. a one-off that timed out).
        left = sh(DOCKER, "ps", "-aq", "--filter", f"label=chatplat={self.prefix}", check=False).stdout.decode().split()
        if left:
            sh(DOCKER, "rm", "-f", "-v", *left, check=False)
        for tag in self.images:
            sh(DOCKER, "rmi", "-f", tag, check=False)
        sh(DOCKER, "network", "rm", self.network, check=False)


@dataclass
class Service:
    name: str
    host: str
    port: int
    published: int
    user: str = ""
    password: str | None = None
    tls: bool = False

    def postgres_url(self, database: str) -> str:
        return f"postgres://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def redis_url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/{db}"

    @property
    def local(self) -> str:
        """host:port of the plain Redis port as published on 127.0.0.1 (for the contract)."""
        return f"127.0.0.1:{self.published}"


def verify(url: str, *, host: str, second_url: str | None = None, https_proxy: bool = True,
           timeout: int = 240) -> str:
    """The [A] black-box verifier against a target, as a user would run it."""
    cmd = [str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python",
           "-m", "tests.contract.verify", url, "--host", host]
    if https_proxy:
        cmd.append("--https-proxy")
    if second_url:
        cmd += ["--second-url", second_url]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")})
    text = r.stdout + r.stderr
    assert r.returncode == 0, f"verify {url} failed:\n{text}"
    return text


def contract_each(run_contract, urls: list[str], hosts: list[str], **kwargs) -> None:
    """The [A] contract once per instance: white-box on that instance, black-box
    through it, with the next instance as the second user's (cross-instance fan-out)."""
    for i, (url, host) in enumerate(zip(urls, hosts)):
        second = urls[(i + 1) % len(urls)] if len(urls) > 1 else None
        run_contract(url, host, second_url=second, **kwargs)
