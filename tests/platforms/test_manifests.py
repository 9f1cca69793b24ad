"""Static checks of the Dockerfile and the three platforms' manifests, parsed
with real parsers. Each assertion is something that breaks a deploy."""
from __future__ import annotations

import json
import re

import pytest
from django.urls import Resolver404, resolve

from tests.platforms import manifests as m

FALSE = {"false", "0", "no", "off"}


def runtime_debug_values() -> dict[str, str | None]:
    env_lines = [rest for instr, rest in m.dockerfile_instructions() if instr == "ENV"]
    docker_debug = None
    for rest in env_lines:
        found = re.search(r"(?:^|\s)DEBUG=(\S+)", rest)
        if found:
            docker_debug = found.group(1)
    app_env = m.app_json()["env"].get("DEBUG")
    render_debug = next((str(v.get("value")) for v in m.render_web().get("envVars", []) if v["key"] == "DEBUG"), None)
    return {
        "Dockerfile ENV": docker_debug,
        "app.json env": (app_env if isinstance(app_env, str) else (app_env or {}).get("value")),
        "fly.toml [env]": m.fly().get("env", {}).get("DEBUG"),
        "render.yaml envVars": render_debug,
    }


@pytest.mark.parametrize("where", ["Dockerfile ENV", "app.json env", "fly.toml [env]", "render.yaml envVars"])
def test_debug_is_false_in_every_runtime_environment(where):
    value = runtime_debug_values()[where]
    assert value is not None, f"{where} does not set DEBUG: set DEBUG=False explicitly"
    assert value.strip().lower() in FALSE, f"{where}: DEBUG={value!r}"


def test_every_manifest_starts_bare_gunicorn():
    commands = m.gunicorn_commands()
    assert {"Procfile web", "render.yaml startCommand", "Dockerfile CMD"} <= set(commands)
    for where, command in commands.items():
        assert command.strip() == "gunicorn", f"{where} is {command!r}: gunicorn.conf.py owns every flag, say just `gunicorn`"
    # No manifest smuggles gunicorn options through the environment either.
    env_sources = {
        "fly.toml [env]": m.fly().get("env", {}),
        "render.yaml envVars": {v["key"]: v.get("value", "") for v in m.render_web().get("envVars", [])},
        "app.json env": m.app_json()["env"],
    }
    for where, env in env_sources.items():
        assert "GUNICORN_CMD_ARGS" not in env, f"{where} sets GUNICORN_CMD_ARGS"


def _served(path: str):
    try:
        match = resolve(path)
    except Resolver404:
        pytest.fail(f"{path} is not a URL the app serves")
    return match


def test_health_check_paths_are_served_by_the_app():
    checks = {"render.yaml healthCheckPath": m.render_web()["healthCheckPath"]}
    for i, check in enumerate(m.fly()["http_service"].get("checks", [])):
        checks[f"fly.toml http_service.checks[{i}]"] = check["path"]
    for name, check in (m.fly().get("checks") or {}).items():
        checks[f"fly.toml checks.{name}"] = check["path"]
    health = re.search(r"/healthz", next(rest for instr, rest in m.dockerfile_instructions() if instr == "HEALTHCHECK"))
    assert health, "the Dockerfile HEALTHCHECK does not probe /healthz"
    checks["Dockerfile HEALTHCHECK"] = "/healthz"
    for where, path in checks.items():
        match = _served(path)
        assert match.func.__module__ in ("app.health", "app.probes"), f"{where} points at {path}, served by {match.func.__module__}, not a health view"
    assert m.fly()["http_service"].get("checks"), "fly.toml has no [[http_service.checks]]"


# --- Dockerfile ---------------------------------------------------------------
def test_dockerfile_shape():
    instrs = m.dockerfile_instructions()
    names = [i for i, _ in instrs]
    froms = [rest for i, rest in instrs if i == "FROM"]
    assert len(froms) >= 2, "not a multi-stage build"
    assert any(i == "ARG" and rest == "PYTHON_IMAGE=python:3.13-slim-trixie" for i, rest in instrs[: names.index("FROM")])
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms
    copies = [(n, rest) for n, (i, rest) in enumerate(instrs) if i == "COPY"]
    lock = next(n for n, rest in copies if rest.startswith("requirements.txt"))
    install = next(n for n, (i, rest) in enumerate(instrs) if i == "RUN" and "-r requirements.txt" in rest)
    source = next(n for n, rest in copies if rest.startswith(". "))
    assert lock < install < source, "the lock must be installed before the source is copied (layer cache)"
    assert any(i == "RUN" and "DJANGO_SETTINGS_MODULE=app.settings_build" in rest and "collectstatic" in rest for i, rest in instrs)
    final = instrs[max(n for n, (i, _) in enumerate(instrs) if i == "FROM"):]
    users = [rest for i, rest in final if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"final USER must be a non-zero numeric UID, got {users}"
    assert ("EXPOSE", "8000") in final
    assert ("CMD", '["gunicorn"]') in final
    healthcheck = [rest for i, rest in final if i == "HEALTHCHECK"]
    assert healthcheck and not re.search(r"\b(curl|wget)\b", healthcheck[0])
    assert not any(i == "RUN" and re.search(r"apt-get install|build-essential|gcc", rest) for i, rest in final)
    assert not any(i in ("ARG", "ENV") and re.search(r"SECRET_KEY|DATABASE_URL|REDIS_URL|PASSWORD", rest) for i, rest in instrs)


def test_dockerignore_keeps_secrets_and_junk_out_of_the_context():
    ignored = {line.strip() for line in (m.REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", ".env", "staticfiles", "db.sqlite3"):
        assert needed in ignored, f".dockerignore lacks {needed}"
    assert "Dockerfile" not in ignored  # Fly builds from the context with it


def test_python_version_pins_match():
    pinned = m.PYTHON_VERSION_FILE.read_text().strip()
    assert re.fullmatch(r"3\.\d+", pinned), pinned
    default = next(rest for i, rest in m.dockerfile_instructions() if i == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert f":{pinned}-" in default, f".python-version {pinned} vs Dockerfile {default}"


# --- Heroku -------------------------------------------------------------------
def test_procfile():
    entries = m.procfile()
    assert entries["web"] == "gunicorn"
    assert entries["release"] == "python manage.py migrate --noinput"


def test_app_json():
    spec = m.app_json()
    env = spec["env"]
    assert env["SECRET_KEY"] == {**env["SECRET_KEY"], "generator": "secret"}
    assert "value" not in env["SECRET_KEY"]
    assert env["REDIS_TLS_INSECURE"]["value"] == "True", "Heroku Key-Value Store is rediss:// with a self-signed cert"
    assert env["ALLOWED_HOSTS"].get("required") is True
    attachments = m.heroku_addon_attachments()
    assert attachments.get("heroku-postgresql") == "DATABASE_URL"
    assert attachments.get("heroku-redis") == "REDIS_URL"
    assert spec["formation"]["web"]["quantity"] >= 1
    assert {"url": "heroku/python"} in spec.get("buildpacks", [])


# --- Fly.io -------------------------------------------------------------------
def test_fly_toml():
    fly = m.fly()
    assert m.fly_dockerfile() == m.DOCKERFILE, f"[build] dockerfile resolves to {m.fly_dockerfile()}"
    assert fly["deploy"]["release_command"] == "python manage.py migrate --noinput"
    svc = fly["http_service"]
    assert int(fly["env"]["PORT"]) == svc["internal_port"], "Fly injects no PORT: [env] PORT must equal internal_port"
    assert svc["force_https"] is True
    assert svc["auto_stop_machines"] in ("off", False), "a stopped/suspended machine drops every websocket"
    assert svc["concurrency"]["type"] == "connections"
    assert 0 < svc["concurrency"]["soft_limit"] <= svc["concurrency"]["hard_limit"]
    allowed = [h.strip() for h in fly["env"]["ALLOWED_HOSTS"].split(",")]
    assert allowed[0] == f"{fly['app']}.fly.dev", "ALLOWED_HOSTS should start with the app's fly.dev name"
    # Routing checks look at the process, not at the shared dependencies
    # (README "Health checks"); the dependency check is top-level (no routing).
    assert [c["path"] for c in svc["checks"]] == ["/startupz"]
    for check in svc["checks"]:
        assert "headers" not in check, "health paths answer any Host: no Host override to rely on"
    top = fly.get("checks") or {}
    assert [c["path"] for c in top.values()] == ["/readyz"]
    assert all(c["port"] == svc["internal_port"] and c["type"] == "http" for c in top.values())
    assert fly["kill_signal"] == "SIGTERM", "gunicorn drains on SIGTERM; Fly's default is SIGINT"
    for secret in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL"):
        assert secret not in fly.get("env", {}), f"{secret} belongs in `fly secrets`, not fly.toml"


# --- Render -------------------------------------------------------------------
def test_render_yaml():
    doc = m.render()
    web = m.render_web()
    assert web["runtime"] in ("python", "docker")
    assert web["startCommand"] == "gunicorn"
    assert "collectstatic" in web["buildCommand"] and "-r requirements.txt" in web["buildCommand"]
    assert web["preDeployCommand"] == "python manage.py migrate --noinput"
    env = m.render_env_spec()
    assert "SECRET_KEY" in env.generated
    assert "ALLOWED_HOSTS" in env.user_supplied or "ALLOWED_HOSTS" in env.values
    kv_names = {s["name"] for s in doc["services"] if s["type"] == "keyvalue"}
    redis = env.from_service["REDIS_URL"]
    assert redis == {"type": "keyvalue", "name": redis["name"], "property": "connectionString"} and redis["name"] in kv_names
    db = env.from_database["DATABASE_URL"]
    assert db["property"] == "connectionString" and db["name"] in {d["name"] for d in doc["databases"]}
    for kv in (s for s in doc["services"] if s["type"] == "keyvalue"):
        assert kv["ipAllowList"] == [], "keep Key Value private"
        assert kv["maxmemoryPolicy"] == "noeviction", "a channel layer must not be evicted"
    assert "PORT" not in env.values, "Render sets PORT=10000 itself"
    # One check decides deploys, routing and restarts on Render: not /readyz.
    assert web["healthCheckPath"] == "/startupz"


def test_no_secret_values_in_manifests():
    for path in (m.FLY_TOML, m.RENDER_YAML, m.APP_JSON, m.PROCFILE, m.DOCKERFILE):
        text = path.read_text()
        assert not re.search(r"(postgres(ql)?|rediss?)://[^\s\"']*:[^\s\"'@]+@", text), f"{path.name} has a URL with a password"
        assert not re.search(r"SECRET_KEY\s*[=:]\s*[\"']?[A-Za-z0-9_\-]{20,}", text), f"{path.name} has a SECRET_KEY value"
    json.loads(m.APP_JSON.read_text())
