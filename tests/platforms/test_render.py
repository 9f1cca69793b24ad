"""Render, emulated from deploy/render.yaml (a Blueprint at a custom path).

What Render does for the web service (native `python` runtime), done here:
1. the declared `buildCommand` in a clean container from the local base, in
   /opt/render/project/src with Render's virtualenv first on PATH and the
   service's env vars available (they are, at build time, on Render);
   the result is committed (env vars go to `docker exec` only);
2. the declared `preDeployCommand` in a one-off instance;
3. the declared `startCommand` with PORT=10000 (Render's default) and the
   declared envVars: values as written, `generateValue` generated,
   `fromDatabase`/`fromService` resolved to test services named as in the
   Blueprint, `sync: false` ones supplied as a user would in the dashboard;
4. `healthCheckPath` as Render probes it: GET, Host = the service's
   onrender.com name, 2xx/3xx within 5 s.
Then the [A] contract against the instance.
"""
from __future__ import annotations

import base64
import os
import time

import pytest

from tests.harness.contract import run_contract
from tests.platforms import manifests as m
from tests.platforms.checkers import (RENDER_INTERVAL, RENDER_RESTART_AFTER, RENDER_UNROUTE_AFTER, Checker, describe,
                                      http_probe, redis_outage, run_together, stop_all, wait_all_passing)
from tests.platforms.infra import contract_each, http_get, new_secret_key, out, sh

SRC = "/opt/render/project/src"
RENDER_PATH = f"{SRC}/.venv/bin:/usr/local/bin:/usr/bin:/bin"
INSTANCE_USER = "20002:20002"


@pytest.fixture(scope="module")
def render(lab, base_image, svc_image, timings):
    doc = m.render()
    web = m.render_web()
    spec = m.render_env_spec()
    public_host = f"{web['name']}.onrender.com"
    start = time.monotonic()

    # Services named as in the Blueprint, reachable by those names.
    db_spec = next(d for d in doc["databases"] if d["name"] == spec.from_database["DATABASE_URL"]["name"])
    pg = lab.postgres("render-pg", svc_image, aliases=[db_spec["name"]], databases=[db_spec.get("databaseName", "chat")],
                      user=db_spec.get("user", "chat"))
    kv_name = spec.from_service["REDIS_URL"]["name"]
    kv = lab.redis("render-kv", svc_image, aliases=[kv_name])
    resolved = {
        "DATABASE_URL": pg.postgres_url(db_spec.get("databaseName", "chat")),  # connectionString
        "REDIS_URL": kv.redis_url().removesuffix("/0"),  # connectionString: redis://name:6379
    }
    env = dict(spec.values)
    # What Render generates for `generateValue: true`: "a base64-encoded 256-bit
    # value" (its Blueprint reference), 44 characters: SECRET_KEY must start with it.
    env.update({key: base64.b64encode(os.urandom(32)).decode() for key in spec.generated})
    for key in list(spec.from_database) + list(spec.from_service):
        env[key] = resolved[key]
    user_input = {"ALLOWED_HOSTS": public_host}
    for key in spec.user_supplied:
        env[key] = user_input[key]
    render_env = {"RENDER": "true", "IS_PULL_REQUEST": "false", "RENDER_SERVICE_NAME": web["name"],
                  "RENDER_EXTERNAL_HOSTNAME": public_host, "RENDER_EXTERNAL_URL": f"https://{public_host}"}

    # -- build ----------------------------------------------------------------
    builder = lab.run("render-build", base_image, ["sleep", "infinity"])
    lab.copy_source(builder, SRC)
    lab.exec(builder, ["python3", "-m", "venv", f"{SRC}/.venv"])
    build = lab.exec(builder, ["bash", "-c", web["buildCommand"]], workdir=SRC, check=False,
                     env={**env, **render_env, "PATH": RENDER_PATH, "PIP_NO_CACHE_DIR": "1"})
    assert build.returncode == 0, "buildCommand failed:\n" + out(build)
    image = lab.commit(builder, f"{lab.prefix}/render-build:latest", [f"ENV PATH={RENDER_PATH}", f"WORKDIR {SRC}"])
    lab.remove(builder)
    timings["render build"] = time.monotonic() - start

    # -- pre-deploy, then start -------------------------------------------------
    start = time.monotonic()
    runtime_env = {**env, **render_env, "PORT": str(m.RENDER_PORT)}
    pre = lab.run_once("render-predeploy", image, ["bash", "-c", web["preDeployCommand"]], env=runtime_env, user=INSTANCE_USER)
    assert pre.returncode == 0, "preDeployCommand failed:\n" + out(pre)
    instance = lab.run("render-web", image, ["bash", "-c", web["startCommand"]], env=runtime_env, user=INSTANCE_USER,
                       publish=[m.RENDER_PORT])
    published = lab.port(instance, m.RENDER_PORT)
    lab.wait_tcp(instance, published)
    timings["render predeploy+boot"] = time.monotonic() - start
    return {"web": web, "instance": instance, "published": published, "host": public_host, "kv": kv, "env": runtime_env}


def test_health_check_as_render_probes_it(render, lab):
    path = render["web"]["healthCheckPath"]
    # Render: 2xx or 3xx within 5 s is healthy.
    lab.wait_until_healthy(
        render["instance"],
        lambda: http_get(lab.ip(render["instance"]), m.RENDER_PORT, path, {"Host": render["host"]}, timeout=5),
        lambda status: 200 <= status < 400,
    )


def test_a_verified_custom_domain_passes_the_check_but_pages_need_allowed_hosts(render, lab):
    """Once a custom domain is verified Render sends it as Host on every
    health check. The check passes before ALLOWED_HOSTS knows the domain; the
    pages answer it only after the step in deploy/render.md (400 before)."""
    ip, custom = lab.ip(render["instance"]), "chat.example.org"
    assert http_get(ip, m.RENDER_PORT, render["web"]["healthCheckPath"], {"Host": custom}, timeout=5).status == 200
    assert http_get(ip, m.RENDER_PORT, "/accounts/login/", {"Host": custom, "X-Forwarded-Proto": "https"}).status == 400
    assert http_get(ip, m.RENDER_PORT, "/accounts/login/", {"Host": render["host"], "X-Forwarded-Proto": "https"}).status == 200


def test_listens_on_renders_port(render, lab):
    r = lab.exec(render["instance"], ["bash", "-c", "echo $PORT $DEBUG"])
    assert out(r).split() == [str(m.RENDER_PORT), "False"]


def test_contract(render, timings):
    start = time.monotonic()
    contract_each(run_contract, [f"http://127.0.0.1:{render['published']}"], [f"docker://{render['instance']}"],
                  workers=int(render["env"].get("WEB_CONCURRENCY", 2)), port=m.RENDER_PORT,
                  redis=f"{render['kv'].host}:6379", host_header=render["host"], https_proxy=True)
    timings["render contract"] = time.monotonic() - start


def test_a_redis_outage_neither_unroutes_nor_restarts(render, lab, timings):
    """30 s of a frozen Key Value, with healthCheckPath acting as Render acts
    on it (15 s failing: no traffic; 60 s: restart, done here with `docker
    restart`): /startupz keeps passing, so the instance keeps its traffic and
    is not restarted, while /readyz shows the outage. Control, in the same
    outage: the previous render.yaml's healthCheckPath (/readyz) would have
    taken the only instance out of rotation after 15 s (and restarted the
    service had the outage lasted 60 s)."""
    instance, path = render["instance"], render["web"]["healthCheckPath"]
    healthy = lambda status: 200 <= status < 400  # noqa: E731  Render: 2xx or 3xx within 5 s

    def probe(p):
        return http_probe(lambda: http_get(lab.ip(instance), m.RENDER_PORT, p, {"Host": render["host"]}, timeout=5), healthy)

    shipped = Checker(f"{instance} healthCheckPath {path}", probe=probe(path), interval=RENDER_INTERVAL,
                      unroute_after=RENDER_UNROUTE_AFTER, restart_after=RENDER_RESTART_AFTER,
                      on_restart=lambda: sh("docker", "restart", "-t", "30", instance))
    readiness = Checker(f"{instance} /readyz (observed, no action)", probe=probe("/readyz"), interval=RENDER_INTERVAL, routing=False)
    control = Checker(f"{instance} control: healthCheckPath /readyz", probe=probe("/readyz"), interval=RENDER_INTERVAL,
                      unroute_after=RENDER_UNROUTE_AFTER, restart_after=RENDER_RESTART_AFTER)
    everyone = [shipped, readiness, control]
    run_together(everyone)
    try:
        wait_all_passing(everyone)
        kv = render["kv"].name
        start, end = redis_outage(lambda: sh("docker", "pause", kv), lambda: sh("docker", "unpause", kv))
        deadline = time.monotonic() + 30
        while not control.in_rotation and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop_all(everyone)
    report = describe(everyone, start)
    print(f"\nrender, Key Value frozen for {end - start:.0f} s:\n{report}")
    assert shipped.failures() == 0 and not shipped.events and shipped.restarts == 0, report
    assert readiness.failures() >= 2, "the outage was not visible to /readyz:\n" + report
    assert control.first_out() is not None, "control: /readyz as healthCheckPath did not lose the traffic:\n" + report
    timings["render outage: control out of rotation after"] = control.first_out() - start
