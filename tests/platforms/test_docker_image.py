"""The product image: built from the Dockerfile here (local Debian 13 base),
inspected, then run the way any container platform runs it: non-root,
read-only root file system with a writable /tmp, two containers sharing one
Redis, and the [A] contract against them."""
from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import time

import pytest

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


def test_no_secret_in_any_layer(app_image, stack):
    """Scan the saved image: history, config and every file in every layer."""
    history = sh("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", app_image).stdout.decode()
    assert not re.search(r"SECRET_KEY=(?!build-only)|PASSWORD|DATABASE_URL=|REDIS_URL=", history), history
    runtime_secrets = [stack["env"]["SECRET_KEY"], stack["pg"].password]
    saved = subprocess.run(["docker", "save", app_image], capture_output=True, check=True).stdout
    outer = tarfile.open(fileobj=io.BytesIO(saved))
    bad_names = re.compile(r"(^|/)(\.env(\..*)?|id_rsa.*|.*\.pem|.*\.key|db\.sqlite3|\.git)$")
    scanned = 0
    for member in outer.getmembers():
        if not member.name.endswith("layer.tar") and not member.name.startswith("blobs/"):
            continue
        data = outer.extractfile(member)
        if data is None:
            continue
        try:
            layer = tarfile.open(fileobj=io.BytesIO(data.read()))
        except tarfile.ReadError:
            continue  # a config blob, not a layer
        for entry in layer.getmembers():
            name = entry.name
            if name.startswith(("app/", "opt/venv/")) or "/app/" in name:
                assert not bad_names.search(name), f"{name} is in a layer"
            if entry.isfile() and name.startswith("app/") and entry.size < 2_000_000:
                body = layer.extractfile(entry).read()
                for secret in runtime_secrets:
                    assert secret.encode() not in body, f"a runtime secret is in {name}"
                assert b"BEGIN RSA PRIVATE KEY" not in body and b"BEGIN PRIVATE KEY" not in body, name
                scanned += 1
    assert scanned > 10, "no application files found in the layers: the scan is broken"


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
