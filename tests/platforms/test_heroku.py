"""Heroku, emulated from Procfile, app.json and .python-version.

What Heroku does on `git push heroku main` (or the Heroku Button), done here:
1. build (heroku/python buildpack) in a clean container from the local base:
   a Python matching .python-version at /app/.heroku/python, `pip install -r
   requirements.txt`, then the buildpack's own collectstatic step
   (bin/steps/collectstatic, run through `sub_env`): every config var
   exported except the buildpack's blacklist, PYTHONPATH=., manage.py found
   by `find . -maxdepth 3`, and `python manage.py collectstatic --noinput
   --traceback` with *no* DJANGO_SETTINGS_MODULE, i.e. app.settings with the
   app's real config vars (not app.settings_build); the result is committed
   as the slug (config vars are passed to `docker exec` only, so none is
   stored in the image);
2. the Procfile's `release` line in a one-off dyno;
3. two `web` dynos running the Procfile's `web` line with a random $PORT,
   DEBUG=False and the add-ons' URLs (Postgres, and Key-Value Store as
   rediss:// with a self-signed certificate) pointing at test services.
Then the [A] contract against both dynos.
"""
from __future__ import annotations

import random
import re
import secrets
import time

import pytest

from tests.harness.contract import run_contract
from tests.platforms import manifests as m
from tests.platforms.infra import contract_each, http_get, out, sh, source_files
from tests.platforms.stuck import open_stuck_request, still_open
from tests.platforms.windows import HEROKU_KILL_AFTER

PUBLIC_HOST = "chat-example-1a2b3c4d5e6f.herokuapp.com"
HEROKU_PATH = "/app/.heroku/python/bin:/usr/local/bin:/usr/bin:/bin"
DYNO_USER = "20001:20001"  # dynos run as an unprivileged user


def find_manage_py(files: list[str]) -> str | None:
    """The buildpack: `find . -maxdepth 3 -type f -name manage.py`, shallowest first."""
    found = sorted((p.count("/"), p) for p in files if p.rsplit("/", 1)[-1] == "manage.py" and p.count("/") <= 2)
    return found[0][1] if found else None


# heroku-buildpack-python bin/steps/collectstatic, as the buildpack runs it
# (bin/compile: `sub_env "$BIN_DIR/steps/collectstatic"`); the shell lines are
# the step's own, minus its metadata and output helpers.
COLLECTSTATIC_STEP = r"""
set -euo pipefail
if [[ -f .heroku/collectstatic_disabled ]]; then echo "Skipping Django collectstatic (file)"; exit 0; fi
if [[ "${DISABLE_COLLECTSTATIC:-0}" != "0" ]]; then echo "Skipping Django collectstatic (DISABLE_COLLECTSTATIC)"; exit 0; fi
python -c "import sys, importlib.util; sys.exit(0 if importlib.util.find_spec('django') else 1)" || exit 0
MANAGE_FILE=$(find . -maxdepth 3 -type f -name 'manage.py' -printf '%d	%P
' | sort -nk1 | cut -f2 | head -1)
MANAGE_FILE=${MANAGE_FILE:-fakepath}
if [[ ! -f "${MANAGE_FILE}" ]]; then echo "Skipping Django collectstatic since no manage.py file found."; exit 0; fi
echo "-----> \$ python $MANAGE_FILE collectstatic --noinput"
PYTHONPATH=${PYTHONPATH:-.}
export PYTHONPATH
python "$MANAGE_FILE" collectstatic --noinput --traceback
"""
# buildpack-stdlib's sub_env: config vars matching this are not exported.
SUB_ENV_BLACKLIST = re.compile(r"^(GIT_DIR|PYTHONHOME|LD_LIBRARY_PATH|LIBRARY_PATH|PATH)$")


def sub_env(config: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in config.items() if not SUB_ENV_BLACKLIST.match(k)}


@pytest.fixture(scope="module")
def heroku(lab, base_image, svc_image, timings):
    start = time.monotonic()
    attachments = m.heroku_addon_attachments()
    pg = lab.postgres("heroku-pg", svc_image, aliases=["heroku-pg"], databases=["d1a2b3c4"])
    kv = lab.redis("heroku-kv", svc_image, aliases=["heroku-kv"], password=secrets.token_hex(16),
                   tls=True)
    addon_urls = {
        attachments["heroku-postgresql"]: pg.postgres_url("d1a2b3c4"),
        attachments["heroku-redis"]: kv.redis_url(),  # rediss://:pw@host:6380/0, self-signed
    }
    assert addon_urls[attachments["heroku-redis"]].startswith("rediss://")
    config = m.heroku_config_vars({"ALLOWED_HOSTS": PUBLIC_HOST}, addon_urls)

    # -- build ---------------------------------------------------------------
    builder = lab.run("heroku-build", base_image, ["sleep", "infinity"])
    lab.copy_source(builder, "/app")
    pinned = m.PYTHON_VERSION_FILE.read_text().strip()
    have = out(lab.exec(builder, ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])).strip()
    assert have == pinned, f".python-version asks for {pinned}; the stand-in stack has {have}"
    lab.exec(builder, ["python3", "-m", "venv", "/app/.heroku/python"])
    tools = {"PATH": HEROKU_PATH, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = lab.exec(builder, ["pip", "install", "-r", "requirements.txt"], env=tools, workdir="/app", check=False)
    assert pip.returncode == 0, out(pip)
    assert find_manage_py(source_files()) == "manage.py", "the buildpack would not find manage.py (depth <= 3)"
    assert "DJANGO_SETTINGS_MODULE" not in config, "the step would use the app's settings module as configured"
    build_env = {**sub_env(config), **tools}
    collect = lab.exec(builder, ["bash", "-c", COLLECTSTATIC_STEP], env=build_env, workdir="/app", check=False)
    assert collect.returncode == 0, "collectstatic failed the build:\n" + out(collect)
    assert "$ python manage.py collectstatic --noinput" in out(collect) and "static files copied" in out(collect), out(collect)
    lab.exec(builder, ["chown", "-R", "root:root", "/app"])
    slug = lab.commit(builder, f"{lab.prefix}/heroku-slug:latest",
                      [f"ENV PATH={HEROKU_PATH}", "WORKDIR /app", 'CMD ["bash"]'])
    lab.remove(builder)
    timings["heroku build"] = time.monotonic() - start

    procs = m.procfile()
    # WEB_CONCURRENCY: what the buildpack's profile.d script sets on a 512 MB dyno.
    dyno_env = {**config, "WEB_CONCURRENCY": "2", "PYTHONUNBUFFERED": "true", "HOME": "/app"}

    # -- release phase -------------------------------------------------------
    start = time.monotonic()
    release = lab.run_once("heroku-release", slug, ["bash", "-c", procs["release"]], user=DYNO_USER,
                           env={**dyno_env, "DYNO": "release.1"})
    assert release.returncode == 0, "release phase failed:\n" + out(release)

    # -- two web dynos with a random $PORT ------------------------------------
    port = random.randint(10000, 60000)
    dynos = []
    for i in (1, 2):
        dynos.append(lab.run(f"heroku-web{i}", slug, ["bash", "-c", procs["web"]], user=DYNO_USER,
                             env={**dyno_env, "PORT": str(port), "DYNO": f"web.{i}"}, publish=[port]))
    published = [lab.port(d, port) for d in dynos]
    for d, p in zip(dynos, published):
        took = lab.wait_tcp(d, p, timeout=60)  # Heroku's boot timeout (R10): bind $PORT within 60 s
        assert took < 60
    for d, p in zip(dynos, published):
        lab.wait_http(d, p, "/readyz", PUBLIC_HOST)
    timings["heroku release+boot"] = time.monotonic() - start
    return {"dynos": dynos, "published": published, "port": port, "kv": kv, "config": config, "slug": slug,
            "env": dyno_env, "build_env": build_env, "collect": out(collect)}


def test_collectstatic_ran_with_app_settings_and_the_config_vars(heroku, lab):
    """The buildpack's step imports app.settings (DEBUG=False): it needs the
    config vars at build time, so a missing one fails the build with its name
    (Heroku: set config vars before the first push). The same step with all
    of them is the positive control (the fixture's build)."""
    slug = heroku["slug"]
    env = {k: v for k, v in heroku["build_env"].items() if k != "SECRET_KEY"}
    r = lab.run_once("heroku-build-nokey", slug, ["bash", "-c", COLLECTSTATIC_STEP], env=env, workdir="/app")
    assert r.returncode != 0 and "SECRET_KEY is required" in out(r), out(r)
    r = lab.run_once("heroku-build-ok", slug, ["bash", "-c", COLLECTSTATIC_STEP], env=heroku["build_env"], workdir="/app")
    assert r.returncode == 0 and "0 static files copied" in out(r), out(r)
    # DISABLE_COLLECTSTATIC is honoured as the buildpack does.
    r = lab.run_once("heroku-build-off", slug, ["bash", "-c", COLLECTSTATIC_STEP],
                     env={**env, "DISABLE_COLLECTSTATIC": "1"}, workdir="/app")
    assert r.returncode == 0 and "Skipping Django collectstatic" in out(r), out(r)


def test_build_used_the_config_vars_but_the_slug_holds_none(heroku, lab):
    slug = f"{lab.prefix}/heroku-slug:latest"
    env = sh("docker", "image", "inspect", "-f", "{{json .Config.Env}}", slug).stdout.decode()
    for key in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL"):
        assert key not in env, f"{key} leaked into the slug's image config"
        assert heroku["config"][key] not in env


def test_debug_false_and_rediss_in_the_dynos(heroku, lab):
    r = lab.exec(heroku["dynos"][0], ["bash", "-c", "echo $DEBUG $REDIS_URL $REDIS_TLS_INSECURE"])
    debug, redis_url, insecure = out(r).split()
    assert debug == "False" and redis_url.startswith("rediss://") and insecure == "True"


def test_dynos_talk_tls_to_the_key_value_store(heroku, lab):
    """Every client connection from the dynos arrived on Redis's TLS port."""
    kv = heroku["kv"]
    listing = out(lab.exec(kv.name, ["redis-cli", "-a", kv.password, "--no-auth-warning", "client", "list"]))
    dyno_ips = {lab.ip(d) for d in heroku["dynos"]}
    ports = [line.split(" laddr=")[1].split()[0].rsplit(":", 1)[1] for line in listing.splitlines()
             if line.split(" addr=")[1].split()[0].rsplit(":", 1)[0] in dyno_ips]
    assert ports and set(ports) == {"6380"}, listing


def test_self_signed_redis_needs_the_opt_in(heroku, lab):
    """Without app.json's REDIS_TLS_INSECURE the certificate is refused: the opt-in is load-bearing."""
    env = {k: v for k, v in heroku["env"].items() if k != "REDIS_TLS_INSECURE"}
    port = heroku["port"]
    name = lab.run("heroku-web-strict", heroku["slug"], ["bash", "-c", m.procfile()["web"]], user=DYNO_USER,
                   env={**env, "PORT": str(port), "DYNO": "web.3"}, publish=[port])
    published = lab.port(name, port)
    lab.wait_tcp(name, published)
    deadline = time.monotonic() + 20
    while True:
        r = http_get("127.0.0.1", published, "/readyz", {"Host": PUBLIC_HOST})
        if r.status == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lab.remove(name)
    assert r.status == 503, f"/readyz answered {r.status} without REDIS_TLS_INSECURE: {r.body[:300]!r}"


def test_contract_against_both_dynos(heroku, timings):
    start = time.monotonic()
    # Heroku's router terminates TLS and sends X-Forwarded-Proto: https.
    contract_each(run_contract, [f"http://127.0.0.1:{p}" for p in heroku["published"]],
                  [f"docker://{d}" for d in heroku["dynos"]], workers=2, port=heroku["port"],
                  redis=f"{heroku['kv'].host}:6379", host_header=PUBLIC_HOST, https_proxy=True)
    timings["heroku contract"] = time.monotonic() - start


def test_dyno_shutdown_ends_before_herokus_sigkill(heroku, lab, timings):
    """Heroku sends SIGTERM and SIGKILLs 30 s later (not configurable). With a
    request stuck on the dyno, the default drain (Uvicorn gives up at 15 s,
    gunicorn's graceful_timeout is 20 s) still ends first: exit 0, the stuck
    task cancelled, nothing killed."""
    port = heroku["port"]
    name = lab.run("heroku-web-stop", heroku["slug"], ["bash", "-c", m.procfile()["web"]], user=DYNO_USER,
                   env={**heroku["env"], "PORT": str(port), "DYNO": "web.4"}, publish=[port])
    published = lab.port(name, port)
    lab.wait_tcp(name, published)
    sock = open_stuck_request("127.0.0.1", published)
    start = time.monotonic()
    try:
        assert still_open(sock)
        sh("docker", "stop", "-t", str(HEROKU_KILL_AFTER), name, timeout=HEROKU_KILL_AFTER + 30)  # SIGTERM, SIGKILL at 30 s
        took = time.monotonic() - start
    finally:
        sock.close()
    state = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", name).stdout.decode().strip()
    logs = lab.logs(name)
    timings["heroku stop with a stuck request"] = took
    assert state == "0", f"exit {state} (137 = SIGKILLed):\n{logs[-3000:]}"
    assert "timeout graceful shutdown exceeded" in logs and "SIGKILL" not in logs, logs[-3000:]
    assert took < HEROKU_KILL_AFTER - 3, f"{took:.1f}s: too close to Heroku's SIGKILL"
    lab.remove(name)
