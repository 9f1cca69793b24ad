"""The platforms' manifests, read with real parsers (tomllib, PyYAML, json).

The emulations take every command, env var, port and check from here, so
editing a manifest changes what the tests execute.
"""
from __future__ import annotations

import json
import re
import secrets
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
FLY_TOML = REPO / "deploy" / "fly.toml"
RENDER_YAML = REPO / "deploy" / "render.yaml"
APP_JSON = REPO / "app.json"
PROCFILE = REPO / "Procfile"
DOCKERFILE = REPO / "Dockerfile"
PYTHON_VERSION_FILE = REPO / ".python-version"


# --- Heroku ---------------------------------------------------------------------
def procfile() -> dict[str, str]:
    entries = {}
    for line in PROCFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep, f"Procfile line without 'type: command': {line!r}"
        assert re.fullmatch(r"[A-Za-z0-9_-]+", name.strip()), f"bad process type {name!r}"
        entries[name.strip()] = command.strip()
    return entries


def app_json() -> dict:
    return json.loads(APP_JSON.read_text())


def heroku_generate(spec: dict) -> str:
    """What Heroku does for `"generator": "secret"`: a random 64-hex string."""
    assert spec.get("generator") == "secret", spec
    return secrets.token_hex(32)


def heroku_config_vars(user_input: dict[str, str], addon_urls: dict[str, str]) -> dict[str, str]:
    """app.json's env resolved the way the Heroku Button does it: values as
    declared, generators run, required ones asked from the user, plus the
    add-ons' attachment URLs (`as: NAME` gives NAME_URL)."""
    config = {}
    for key, spec in app_json()["env"].items():
        if isinstance(spec, str):
            config[key] = spec
        elif "value" in spec:
            config[key] = str(spec["value"])
        elif "generator" in spec:
            config[key] = heroku_generate(spec)
        elif spec.get("required", True):
            assert key in user_input, f"app.json requires {key} from the user"
            config[key] = user_input[key]
    for key, value in user_input.items():
        config.setdefault(key, value)
    config.update(addon_urls)
    return config


def heroku_addon_attachments() -> dict[str, str]:
    """{plan service (e.g. heroku-redis): config var it sets (e.g. REDIS_URL)}."""
    attachments = {}
    for addon in app_json().get("addons", []):
        plan = addon if isinstance(addon, str) else addon["plan"]
        service = plan.split(":")[0]
        default = {"heroku-postgresql": "DATABASE", "heroku-redis": "REDIS"}.get(service, service.upper())
        as_name = default if isinstance(addon, str) else addon.get("as", default)
        attachments[service] = f"{as_name}_URL"
    return attachments


# --- Fly.io ---------------------------------------------------------------------
def fly() -> dict:
    with open(FLY_TOML, "rb") as fh:
        return tomllib.load(fh)


def fly_dockerfile() -> Path:
    """`[build] dockerfile` is resolved relative to fly.toml's folder."""
    rel = fly().get("build", {}).get("dockerfile", "Dockerfile")
    return (FLY_TOML.parent / rel).resolve()


def fly_release_argv() -> list[str]:
    return shlex.split(fly()["deploy"]["release_command"])


def duration(value) -> float:
    """Fly durations: "10s", "1m", "500ms" or a bare number of milliseconds."""
    if isinstance(value, (int, float)):
        return value / 1000
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value.strip())
    assert m, f"bad duration {value!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --- Render ---------------------------------------------------------------------
def render() -> dict:
    return yaml.safe_load(RENDER_YAML.read_text())


def render_web() -> dict:
    webs = [s for s in render()["services"] if s["type"] == "web"]
    assert len(webs) == 1, webs
    return webs[0]


RENDER_PORT = 10000  # Render's default PORT for web services


@dataclass
class RenderEnv:
    values: dict[str, str] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)
    from_database: dict[str, dict] = field(default_factory=dict)
    from_service: dict[str, dict] = field(default_factory=dict)
    user_supplied: list[str] = field(default_factory=list)


def render_env_spec() -> RenderEnv:
    spec = RenderEnv()
    for var in render_web().get("envVars", []):
        key = var["key"]
        if "value" in var:
            spec.values[key] = str(var["value"])
        elif var.get("generateValue"):
            spec.generated.append(key)
        elif "fromDatabase" in var:
            spec.from_database[key] = var["fromDatabase"]
        elif "fromService" in var:
            spec.from_service[key] = var["fromService"]
        elif var.get("sync") is False:
            spec.user_supplied.append(key)
        else:
            raise AssertionError(f"render.yaml envVar {key} has no source: {var}")
    return spec


# --- Dockerfile -----------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    text = DOCKERFILE.read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    result = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        result.append((instr.upper(), rest.strip()))
    return result


def gunicorn_commands() -> dict[str, str]:
    """Every place a manifest says how the web process starts."""
    commands = {"Procfile web": procfile()["web"], "render.yaml startCommand": render_web()["startCommand"]}
    for instr, rest in dockerfile_instructions():
        if instr == "CMD":
            commands["Dockerfile CMD"] = " ".join(json.loads(rest)) if rest.startswith("[") else rest
    for group, command in (fly().get("processes") or {}).items():
        commands[f"fly.toml processes.{group}"] = command
    for key in ("cmd", "entrypoint"):
        if key in (fly().get("experimental") or {}):
            commands[f"fly.toml experimental.{key}"] = " ".join(fly()["experimental"][key])
    return commands
