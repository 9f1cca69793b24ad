"""The product image: built from the Dockerfile here (local Debian 13 base),
inspected, then run the way any container platform runs it: non-root,
read-only root file system with a writable /tmp, two containers sharing one
Redis, and the [A] contract against them."""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time

import pytest

from tests.faults import secret_scan
from tests.harness.app_image import DOCKER
from tests.harness.contract import run_contract
from tests.platforms.infra import contract_each, new_secret_key, out, sh

PUBLIC_HOST = "chat.example.test"


@pytest.fixture(scope="module")
def stack(lab, app_image, svc_image):
    pg = lab.postgres("img-pg", svc_image, aliases=["img-db"], databases=["chat"])
    redis = lab.redis("img-redis", svc_image, aliases=["img-kv"])
    env = {
        "SECRET_KEY": new_secret_key(),
        "ALLOWED_HOSTS": PUBLIC_HOST,
        "DATABASE_URL": pg.postgres_url("chat"),
        "REDIS_URL": redis.redis_url(),
    }
    return {"pg": pg, "redis": redis, "env": env}


def inspect(image: str) -> dict:
    return json.loads(sh("docker", "image", "inspect", image).stdout)[0]


def test_image_config(app_image):
    cfg = inspect(app_image)["Config"]
    assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", cfg["User"]), f"User={cfg['User']!r}"
    assert cfg["Cmd"] == ["gunicorn"]
    assert "8000/tcp" in cfg["ExposedPorts"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["DEBUG"] == "False"
    assert not {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"} & set(env), "a secret-bearing variable is baked into the image"
    assert cfg["Healthcheck"]["Test"][0] == "CMD" and "curl" not in " ".join(cfg["Healthcheck"]["Test"])


def test_manage_check_deploy_passes_inside(app_image, stack):
    r = sh("docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp",
           *sum((["-e", f"{k}={v}"] for k, v in stack["env"].items()), []),
           app_image, "python", "manage.py", "check", "--deploy", "--fail-level", "WARNING", check=False)
    assert r.returncode == 0, out(r)


def test_final_stage_has_no_daphne_compiler_or_pip(app_image):
    script = (
        "import importlib.util, shutil, sys\n"
        "bad = [m for m in ('daphne', 'pip') if importlib.util.find_spec(m)]\n"
        "bad += [c for c in ('gcc', 'cc', 'g++', 'clang', 'make') if shutil.which(c)]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = sh("docker", "run", "--rm", "--entrypoint", "python", app_image, "-c", script, check=False)
    assert r.returncode == 0, out(r)


def test_static_files_were_collected_at_build_time(app_image):
    r = sh("docker", "run", "--rm", app_image, "sh", "-c", "test -s staticfiles/staticfiles.json && ls staticfiles", check=False)
    assert r.returncode == 0, out(r)


def scan_image(image: str, base_image: str) -> secret_scan.ImageScan:
    """The saved image (config, history, every file of every layer the
    Dockerfile added on top of the base image), scanned by shape."""
    base_layers = set(inspect(base_image)["RootFS"]["Layers"])
    saved = subprocess.run([DOCKER, "save", image], capture_output=True, check=True).stdout
    # Third-party code from the hash-locked lock and collectstatic's copies of
    # it: checked by name, not read (the app's own static files are read at
    # their source under /app/app).
    return secret_scan.scan_image_archive(saved, skip_diff_ids=base_layers,
                                          names_only=("opt/venv/lib/", "app/staticfiles/"))


def test_no_secret_in_any_layer(app_image, base_image):
    scan = scan_image(app_image, base_image)
    assert scan.layers >= 3 and scan.files > 20 and scan.names > 1000, f"the scan saw too little: {scan}"
    assert not scan.findings, "\n".join(map(str, scan.findings))


def test_secret_scan_catches_secrets_planted_at_build_time(app_image, base_image, tmp_path):
    """Negative control: an image built FROM the product image with secrets
    baked in the ways a Dockerfile can bake them. The scan is not told the
    values; it must find each one where it was planted."""
    planted = {
        "env": secrets.token_urlsafe(30),
        "arg": secrets.token_urlsafe(18),
        "settings": secrets.token_urlsafe(40),
        "url": secrets.token_urlsafe(18),
    }
    (tmp_path / "settings_local.py").write_text(f'SECRET_KEY = "{planted["settings"]}"\n')
    (tmp_path / "deploy.env").write_text(f"DATABASE_URL=postgres://chat:{planted['url']}@db:5432/chat\n")
    (tmp_path / "dot.env").write_text("DEBUG=False\n")
    (tmp_path / "Dockerfile").write_text(f"""FROM {app_image}
USER root
ENV DJANGO_SECRET_KEY={planted["env"]}
ARG DB_PASSWORD={planted["arg"]}
RUN echo "building with a password in the environment"
COPY settings_local.py /app/app/settings_local.py
COPY deploy.env /app/deploy.env
RUN rm /app/deploy.env
COPY dot.env /app/.env
RUN python -c "import secrets; open('/app/app/token.cfg', 'w').write('API_TOKEN=' + secrets.token_urlsafe(32))"
USER 10001:10001
""")
    tag = f"chat-test/planted-secrets:{secrets.token_hex(4)}"
    env = dict(os.environ, DOCKER_BUILDKIT="0" if DOCKER != "/usr/bin/docker" else "1")
    build = subprocess.run([DOCKER, "build", "-q", "-t", tag, str(tmp_path)], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    try:
        scan = scan_image(tag, base_image)
    finally:
        subprocess.run([DOCKER, "image", "rm", "-f", tag], capture_output=True)
    findings = "\n".join(map(str, scan.findings))

    def found(where: str, value: str | None = None) -> bool:
        return any(where in f.where and (value is None or f.value == value) for f in scan.findings)

    assert found("config Env", planted["env"]), f"ENV not caught:\n{findings}"
    assert found("history", planted["arg"]), f"ARG used by a RUN not caught:\n{findings}"
    assert found("/app/app/settings_local.py", planted["settings"]), f"a COPY'd settings file not caught:\n{findings}"
    assert found("/app/deploy.env", planted["url"]), f"a file deleted in a later layer not caught:\n{findings}"
    assert found("/app/.env"), f"a .env file not caught:\n{findings}"
    assert found("/app/app/token.cfg"), f"a value generated inside a RUN not caught:\n{findings}"


def test_healthcheck_command_passes_on_a_read_only_container(lab, app_image, stack):
    name = lab.run("img-ro", app_image, env=stack["env"], read_only=True, tmpfs=["/tmp"], publish=[8000])
    port = lab.port(name, 8000)
    lab.wait_http(name, port, "/healthz", PUBLIC_HOST)
    # Run the image's own HEALTHCHECK command, exactly as Docker would.
    test = inspect(app_image)["Config"]["Healthcheck"]["Test"]
    r = sh("docker", "exec", name, *test[1:], check=False)
    assert r.returncode == 0, out(r) + lab.logs(name)
    # The same probe fails when nothing answers on $PORT: the check is real.
    r = sh("docker", "exec", "-e", "PORT=1", name, *test[1:], check=False)
    assert r.returncode != 0
    # It sends no Host of its own (health paths answer any Host), while the
    # pages still refuse one outside ALLOWED_HOSTS.
    assert "Host" not in " ".join(test)
    page = sh("docker", "exec", name, "python", "-c",
              "import urllib.request as u, urllib.error as e\n"
              "try: u.urlopen('http://127.0.0.1:8000/accounts/login/', timeout=4)\n"
              "except e.HTTPError as x: print(x.code)", check=False)
    assert out(page).strip() == "400", out(page)
    # Nothing but /tmp is writable.
    r = sh("docker", "exec", name, "sh", "-c", "touch /app/x 2>/dev/null || touch /x 2>/dev/null || echo ro; touch /tmp/ok && echo tmp", check=False)
    assert out(r).split() == ["ro", "tmp"], out(r)
    lab.remove(name)


def test_contract_against_two_containers_sharing_redis(lab, app_image, stack, timings):
    start = time.monotonic()
    migrate = lab.run_once("img-migrate", app_image, ["python", "manage.py", "migrate", "--noinput"], env=stack["env"])
    assert migrate.returncode == 0, out(migrate)
    names = [lab.run(f"img-web{i}", app_image, env=stack["env"], read_only=True, tmpfs=["/tmp"], publish=[8000])
             for i in (1, 2)]
    ports = [lab.port(n, 8000) for n in names]
    for n, p in zip(names, ports):
        lab.wait_http(n, p, "/readyz", PUBLIC_HOST)
    timings["docker up"] = time.monotonic() - start
    start = time.monotonic()
    contract_each(run_contract, [f"http://127.0.0.1:{p}" for p in ports], [f"docker://{n}" for n in names],
                  workers=2, port=8000, redis=f"{stack['redis'].host}:6379", host_header=PUBLIC_HOST, https_proxy=True)
    timings["docker contract"] = time.monotonic() - start
