"""Fly.io, emulated from deploy/fly.toml.

What `fly deploy --config deploy/fly.toml` does, done here:
1. build `[build] dockerfile` (resolved relative to fly.toml's folder) with
   the working directory (the repository root) as the build context;
2. run `[deploy] release_command` in a temporary machine from the new image,
   with `[env]`, the secrets and RELEASE_COMMAND=1;
3. start two machines (`fly scale count 2`) with `[env]` and the secrets;
4. run every `[[http_service.checks]]` exactly as declared: against the
   machine's private address on `internal_port`, with the declared method,
   path and headers (Host defaults to the machine's address, as Fly's is),
   no redirects followed, 2xx within `timeout`; the top-level `[checks]`
   likewise on their `port`.
Then the [A] contract against both machines, through a stand-in for Fly's
edge (public Host, X-Forwarded-Proto: https).
"""
from __future__ import annotations

import time

import pytest

from tests.harness.app_image import build_app_image
from tests.harness.contract import run_contract
from tests.platforms import manifests as m
from tests.platforms.checkers import (Checker, describe, http_probe, nobody_routable, redis_outage, run_together, stop_all,
                                      wait_all_passing)
from tests.platforms.infra import REPO, contract_each, http_get, new_secret_key, out, sh


def fly_check(lab, machine: str, port: int, check: dict):
    headers = {"Host": f"{lab.ip(machine)}:{port}", **check.get("headers", {})}
    assert check.get("protocol", "http") == "http"
    return http_get(lab.ip(machine), port, check["path"], headers, timeout=m.duration(check.get("timeout", "2s")),
                    method=check.get("method", "GET").upper())


@pytest.fixture(scope="module")
def fly(lab, svc_image, timings):
    cfg = m.fly()
    start = time.monotonic()
    image = build_app_image(f"{lab.prefix}/fly-app:latest", dockerfile=m.fly_dockerfile(), context=REPO)
    lab.images.append(image)
    timings["fly build"] = time.monotonic() - start

    pg = lab.postgres("fly-pg", svc_image, aliases=["chat-example-db.flycast"], databases=["chat_example"])
    redis = lab.redis("fly-redis", svc_image, aliases=["fly-chat-redis.upstash.io"])
    secrets = {  # `fly secrets set ...` (README)
        "SECRET_KEY": new_secret_key(),
        "DATABASE_URL": pg.postgres_url("chat_example"),
        "REDIS_URL": redis.redis_url(),
    }
    env = {**cfg.get("env", {}), **secrets,  # secrets win over [env]
           "FLY_APP_NAME": cfg["app"], "FLY_REGION": cfg.get("primary_region", "ams"),
           "PRIMARY_REGION": cfg.get("primary_region", "ams")}

    start = time.monotonic()
    release = lab.run_once("fly-release", image, m.fly_release_argv(), env={**env, "RELEASE_COMMAND": "1"})
    assert release.returncode == 0, "release_command failed, the deploy stops:\n" + out(release)

    port = cfg["http_service"]["internal_port"]
    machines = [lab.run(f"fly-machine{i}", image, env={**env, "FLY_MACHINE_ID": f"e28{i}0000"}, publish=[port])
                for i in (1, 2)]
    published = [lab.port(name, port) for name in machines]
    for name, p in zip(machines, published):
        lab.wait_tcp(name, p)
    timings["fly release+boot"] = time.monotonic() - start
    return {"cfg": cfg, "machines": machines, "published": published, "port": port, "redis": redis}


def test_declared_checks_pass_on_both_machines(fly, lab):
    checks = fly["cfg"]["http_service"]["checks"]
    assert checks
    for check in checks:
        grace = m.duration(check.get("grace_period", "0s"))
        for machine in fly["machines"]:
            lab.wait_until_healthy(machine, lambda: fly_check(lab, machine, fly["port"], check),
                                   lambda status: 200 <= status < 300, timeout=max(grace, 30))


def test_top_level_checks_pass_on_both_machines(fly, lab):
    """[checks] (no routing; fly deploy waits for them): /readyz, as declared."""
    for check in (fly["cfg"].get("checks") or {}).values():
        assert check["type"] == "http"
        for machine in fly["machines"]:
            lab.wait_until_healthy(machine, lambda: fly_check(lab, machine, check["port"], check),
                                   lambda status: 200 <= status < 300, timeout=30)


def test_checks_need_no_host_but_pages_still_refuse_the_machine_address(fly, lab):
    """Fly sends the machine's address as Host. The health paths answer it
    (no Host override in fly.toml); any other path still refuses it (400)."""
    machine = fly["machines"][0]
    page = dict(fly["cfg"]["http_service"]["checks"][0], path="/accounts/login/")
    assert fly_check(lab, machine, fly["port"], page).status == 400
    public = fly["cfg"]["env"]["ALLOWED_HOSTS"].split(",")[0]
    assert fly_check(lab, machine, fly["port"], dict(page, headers={"Host": public, "X-Forwarded-Proto": "https"})).status == 200


def test_metrics_scraped_as_flys_scraper_does(fly, lab):
    """[metrics]: Fly's scraper calls each machine's private address on the
    declared port and path, with no token, every 15 s; the app sums its
    workers there. The public port ([http_service]) serves no metrics: with
    no METRICS_TOKEN its /metrics is an unknown path like any other."""
    cfg = fly["cfg"]
    metrics = cfg["metrics"]
    assert int(cfg["env"]["METRICS_PORT"]) == metrics["port"] != fly["port"]
    assert "METRICS_TOKEN" not in cfg["env"]
    public_ports = {cfg["http_service"]["internal_port"], *(s.get("internal_port") for s in cfg.get("services", []))}
    assert metrics["port"] not in public_ports, "the metrics port must not be a public service"
    from prometheus_client.parser import text_string_to_metric_families

    for machine in fly["machines"]:
        ip = lab.ip(machine)
        scrape = http_get(ip, metrics["port"], metrics["path"], {"Host": f"{ip}:{metrics['port']}"})
        assert scrape.status == 200, (machine, scrape.status, scrape.body[:300])
        names = {s.name for f in text_string_to_metric_families(scrape.body.decode()) for s in f.samples}
        assert {"chat_websocket_connections", "chat_deliveries_total", "process_cpu_seconds_total"} <= names, names
        pids = {s.labels["pid"] for f in text_string_to_metric_families(scrape.body.decode()) for s in f.samples
                if s.name == "process_resident_memory_bytes"}
        assert len(pids) >= 1, "no worker's process metrics"
        # The public port: /metrics is answered like an unknown path (the same status and body).
        for headers in ({"Host": f"{ip}:{fly['port']}"}, {"Host": cfg["env"]["ALLOWED_HOSTS"], "X-Forwarded-Proto": "https"}):
            metrics_page = http_get(ip, fly["port"], metrics["path"], headers)
            unknown = http_get(ip, fly["port"], "/no-such-page", headers)
            assert (metrics_page.status, metrics_page.body) == (unknown.status, unknown.body), headers
            assert metrics_page.status in (400, 404), metrics_page.status


def test_contract_against_both_machines(fly, timings):
    start = time.monotonic()
    host = fly["cfg"]["env"]["ALLOWED_HOSTS"].split(",")[0].strip()
    contract_each(run_contract, [f"http://127.0.0.1:{p}" for p in fly["published"]],
                  [f"docker://{n}" for n in fly["machines"]], workers=int(fly["cfg"]["env"].get("WEB_CONCURRENCY", 2)),
                  port=fly["port"], redis=f"{fly['redis'].host}:6379", host_header=host, https_proxy=True)
    timings["fly contract"] = time.monotonic() - start


def test_a_redis_outage_keeps_both_machines_in_rotation(fly, lab, timings):
    """30 s of a frozen Redis, with the checks acting as Fly acts on them
    (tests/platforms/checkers.py): the routing check (/startupz) keeps passing
    on both machines, so Fly Proxy keeps routing to them and the app answers
    users itself; the top-level /readyz check goes critical (what `fly checks
    list` shows) without affecting routing; Fly restarts nothing. Control, in
    the same outage: the previous fly.toml's routing check on /readyz takes
    both machines out of rotation at once."""
    cfg, port = fly["cfg"], fly["port"]
    ok2xx = lambda status: 200 <= status < 300  # noqa: E731
    shipped, control = [], []
    for machine in fly["machines"]:
        for i, check in enumerate(cfg["http_service"]["checks"]):
            shipped.append(Checker(f"{machine} http_service.checks[{i}] {check['path']}", interval=m.duration(check["interval"]),
                                   probe=http_probe(lambda mc=machine, c=check: fly_check(lab, mc, port, c), ok2xx)))
        for name, check in (cfg.get("checks") or {}).items():
            shipped.append(Checker(f"{machine} checks.{name} {check['path']}", interval=m.duration(check["interval"]), routing=False,
                                   probe=http_probe(lambda mc=machine, c=check: fly_check(lab, mc, c["port"], c), ok2xx)))
        old = dict(cfg["http_service"]["checks"][0], path="/readyz")
        control.append(Checker(f"{machine} control: http_service check on /readyz", interval=m.duration(old["interval"]),
                               probe=http_probe(lambda mc=machine, c=old: fly_check(lab, mc, port, c), ok2xx)))
    everyone = shipped + control
    run_together(everyone)
    try:
        wait_all_passing(everyone)
        redis = fly["redis"].name
        start, end = redis_outage(lambda: sh("docker", "pause", redis), lambda: sh("docker", "unpause", redis))
        deadline = time.monotonic() + 30
        while not all(c.in_rotation for c in control) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop_all(everyone)
    report = describe(everyone, start)
    print(f"\nfly, Redis frozen for {end - start:.0f} s:\n{report}")
    routing = [c for c in shipped if c.routing]
    assert all(c.failures() == 0 and not c.events for c in routing), report
    readiness = [c for c in shipped if not c.routing]
    assert all(c.failures() >= 1 for c in readiness), "the outage was not visible to /readyz:\n" + report
    assert nobody_routable(control, fly["machines"]), "control: the /readyz routing check did not empty the rotation:\n" + report
    timings["fly outage: control out of rotation after"] = max(c.first_out() for c in control) - start
