"""Shutdown windows: the app's drain (gunicorn.conf.py with a platform's
environment) and each platform's kill deadline, read from the files that set
them. A platform's kill must come after the drain, or it cuts the drain.

Kill deadlines, per the platforms' docs:
- Heroku: SIGTERM, then SIGKILL 30 s later; fixed, not configurable.
- Render: SIGTERM, then SIGKILL after `maxShutdownDelaySeconds` (1-300, default 30).
- Fly.io: `kill_signal` (default SIGINT), then a kill after `kill_timeout`
  (default 5 s; up to 300 s on shared CPUs).
- Kubernetes: preStop hook, then SIGTERM, SIGKILL at
  `terminationGracePeriodSeconds` counted from the start of preStop.
- systemd: SIGTERM, SIGKILL after `TimeoutStopSec` (chat.service).
- Docker: `docker stop` waits 10 s by default; deploy/docker.md runs the
  container with `--stop-timeout`.
"""
from __future__ import annotations

import os
import re
import runpy
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import yaml

from app.uvicorn_worker import drain_seconds
from tests.platforms import manifests as m

REPO = m.REPO
HEROKU_KILL_AFTER = 30
DOCKER_DEFAULT_STOP = 10


def gunicorn_graceful_timeout(env: dict[str, str]) -> int:
    """graceful_timeout as gunicorn.conf.py computes it in this environment."""
    clean = {k: v for k, v in os.environ.items() if k != "GUNICORN_GRACEFUL_TIMEOUT"}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return runpy.run_path(str(REPO / "gunicorn.conf.py"))["graceful_timeout"]


@dataclass
class Window:
    platform: str
    kill_after: float      # seconds from the platform's stop signal to its SIGKILL
    signal: str            # what the platform sends first
    env: dict              # the app's environment there (may set GUNICORN_GRACEFUL_TIMEOUT)
    where: str             # where kill_after comes from

    @property
    def graceful(self) -> int:
        return gunicorn_graceful_timeout(self.env)

    @property
    def uvicorn_drain(self) -> int:
        return drain_seconds(self.graceful)


def _seconds(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"(\d+)(s)?", str(value).strip())
    assert match, f"unsupported duration {value!r}"
    return float(match.group(1))


def heroku() -> Window:
    env = {k: (v if isinstance(v, str) else str(v.get("value", ""))) for k, v in m.app_json()["env"].items()
           if isinstance(v, str) or "value" in v}
    return Window("heroku", HEROKU_KILL_AFTER, "SIGTERM", env, "Heroku's fixed 30 s (not configurable)")


def render() -> Window:
    web = m.render_web()
    return Window("render", float(web.get("maxShutdownDelaySeconds", 30)), "SIGTERM", m.render_env_spec().values,
                  "render.yaml maxShutdownDelaySeconds")


def fly() -> Window:
    cfg = m.fly()
    return Window("fly", _seconds(cfg.get("kill_timeout", 5)), cfg.get("kill_signal", "SIGINT"), dict(cfg.get("env", {})),
                  "fly.toml kill_timeout")


def kubernetes() -> Window:
    k8s = REPO / "deploy" / "k8s"
    deploy = yaml.safe_load((k8s / "web-deployment.yaml").read_text())
    pod = deploy["spec"]["template"]["spec"]
    web = next(c for c in pod["containers"] if c["name"] == "web")
    pre_stop = web.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    env = {}
    for line in (k8s / "config.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return Window("kubernetes", float(pod.get("terminationGracePeriodSeconds", 30) - pre_stop), "SIGTERM", env,
                  "terminationGracePeriodSeconds minus the preStop sleep")


def systemd() -> Window:
    defaults = yaml.safe_load((REPO / "deploy/ansible/roles/app/defaults/main.yml").read_text())
    unit = (REPO / "deploy/ansible/roles/app/templates/chat.service.j2").read_text()
    assert "TimeoutStopSec={{ app_stop_timeout }}" in unit
    env = {str(k): str(v) for k, v in (defaults.get("app_extra_environment") or {}).items()}
    return Window("systemd", float(defaults["app_stop_timeout"]), "SIGTERM", env, "chat.service TimeoutStopSec (app_stop_timeout)")


def docker() -> Window:
    guide = (REPO / "deploy" / "docker.md").read_text()
    runs = [line for line in guide.splitlines() if line.startswith("docker run -d")]
    assert runs, "deploy/docker.md has no `docker run -d` line"
    found = re.search(r"--stop-timeout[ =](\d+)", runs[0])
    return Window("docker", float(found.group(1)) if found else DOCKER_DEFAULT_STOP, "SIGTERM", {},
                  "deploy/docker.md `docker run --stop-timeout`")


ALL = {"heroku": heroku, "render": render, "fly": fly, "kubernetes": kubernetes, "systemd": systemd, "docker": docker}
