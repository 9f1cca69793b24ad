"""Redis settings: REDIS_URL (one Redis) or REDIS_SENTINELS (Sentinel
failover), never both; a bad or contradictory value stops manage.py and
gunicorn's master with one line naming the variable (real subprocesses, as
tests/unit/test_settings.py)."""
import json
import os
import secrets
import sys

import pytest

from tests.unit.test_settings import GOOD, PRINT, gunicorn_cmd, run

SENTINEL = {**GOOD, "REDIS_URL": None, "REDIS_SENTINELS": "10.0.0.1:26379,10.0.0.2:26379,[fd00::3]:26379",
            "REDIS_SENTINEL_MASTER": "chat"}
PASSWORD = secrets.token_hex(16)


def one_line_error(changes) -> str:
    result = run(changes, cmd=[sys.executable, "manage.py", "check"])
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Configuration error: "), result.stderr
    return lines[0]


def test_both_redis_url_and_sentinels_is_refused_naming_both():
    line = one_line_error({**SENTINEL, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert line.startswith("Configuration error: REDIS_URL and REDIS_SENTINELS are both set"), line
    # Without a master name the URL would otherwise win silently.
    line = one_line_error({**SENTINEL, "REDIS_URL": "redis://127.0.0.1:1/0", "REDIS_SENTINEL_MASTER": None})
    assert line.startswith("Configuration error: REDIS_URL and REDIS_SENTINELS are both set"), line


def test_both_stop_gunicorns_master():
    result = run({**SENTINEL, "REDIS_URL": "redis://127.0.0.1:1/0", "PORT": "1"}, cmd=gunicorn_cmd())
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Configuration error: REDIS_URL and REDIS_SENTINELS are both set" in output
    assert "Booting worker" not in output and "Traceback" not in output


@pytest.mark.parametrize("changes, named", [
    ({"REDIS_SENTINELS": "sentinel-1"}, "REDIS_SENTINELS"),  # no port
    ({"REDIS_SENTINELS": "s1:26379,s2"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:0"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:65536"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:port"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "redis://s1:26379"}, "REDIS_SENTINELS"),  # a URL where host:port belongs
    ({"REDIS_SENTINELS": ":pw@s1:26379"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "fd00::3:26379"}, "REDIS_SENTINELS"),  # IPv6 without brackets
    ({"REDIS_SENTINELS": "s1:26379,s1:26379"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": " , "}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINEL_MASTER": None}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINEL_MASTER": "my master"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINEL_DB": "-1"}, "REDIS_SENTINEL_DB"),
    ({"REDIS_TLS": "sometimes"}, "REDIS_TLS"),
    ({"REDIS_TLS": "True", "REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"}, "REDIS_TLS_CA_FILE"),
])
def test_bad_sentinel_values_are_named(changes, named, monkeypatch):
    """In-process (app.redis_config.from_environment); the subprocess tests
    here show that such a ConfigError stops manage.py and gunicorn's master
    with its one line."""
    from app.env import ConfigError
    from app.redis_config import from_environment

    for name in ("REDIS_URL", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD",
                 "REDIS_TLS", "REDIS_TLS_INSECURE", "REDIS_TLS_CA_FILE", "REDIS_SENTINEL_DB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**SENTINEL, **changes}.items():
        if name.startswith("REDIS"):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        from_environment(required=True)
    assert str(error.value).startswith(f"{named} "), error.value


def test_a_bad_sentinel_list_stops_manage_py_with_one_line():
    line = one_line_error({**SENTINEL, "REDIS_SENTINELS": "s1:26379,s2"})
    assert line.startswith("Configuration error: REDIS_SENTINELS "), line


@pytest.mark.parametrize("changes, named", [
    ({"REDIS_SENTINEL_MASTER": "chat"}, "REDIS_SENTINEL_MASTER"),  # a sentinel setting without sentinels
    ({"REDIS_SENTINEL_PASSWORD": "x"}, "REDIS_SENTINEL_PASSWORD"),
    ({"REDIS_TLS": "True"}, "REDIS_TLS"),  # with a URL, TLS is rediss://
    ({"REDIS_URL": f"redis://:{PASSWORD}@h:6379/0", "REDIS_PASSWORD": "another"}, "REDIS_PASSWORD"),
])
def test_settings_that_would_be_ignored_with_redis_url_are_refused(changes, named):
    line = one_line_error({**GOOD, **changes})
    assert line.startswith(f"Configuration error: {named} "), line
    assert PASSWORD not in line and "another" not in line  # a password is named, never printed


def test_missing_redis_names_both_ways():
    line = one_line_error({**GOOD, "REDIS_URL": None})
    assert line.startswith("Configuration error: REDIS_URL is required") and "REDIS_SENTINELS" in line


def test_sentinel_settings_reach_the_layer_the_cache_and_the_limits():
    env = {**SENTINEL, "REDIS_PASSWORD": PASSWORD, "REDIS_SENTINEL_PASSWORD": "s-" + PASSWORD}
    code = ("import django, json; django.setup(); from django.conf import settings as s; "
            "h = dict(s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]); "
            "h['redis_connect_func'] = h['redis_connect_func'].__qualname__; "
            "h['connection_class'] = h['connection_class'].__name__; "
            "print(json.dumps([h, s.CACHES['default'], s.CHAT_LIMITS_REDIS_URL, s.CHAT_LIMITS_REDIS_SENTINEL.sentinels]))")
    out = run(env, code)
    assert out.returncode == 0, out.stderr
    host, cache, limits_url, limits_sentinels = json.loads(out.stdout)
    assert host["sentinels"] == [["10.0.0.1", 26379], ["10.0.0.2", 26379], ["fd00::3", 26379]]
    assert host["master_name"] == "chat" and host["password"] == PASSWORD
    assert host["sentinel_kwargs"]["password"] == "s-" + PASSWORD  # the sentinels' own password
    assert host["redis_connect_func"] == "on_redis_connect"  # the resync after a reconnect (app/chat/resync.py)
    assert "address" not in host
    # A frozen primary: commands time out, subscriptions leave it (app/redis_config.py).
    assert host["socket_timeout"] == 3.0 and host["connection_class"] == "FollowPrimaryConnection"
    assert cache["OPTIONS"]["pool_class"] == "app.redis_config.SentinelCachePool"
    assert cache["OPTIONS"]["master_name"] == "chat" and cache["OPTIONS"]["password"] == PASSWORD
    assert limits_url is None and limits_sentinels == [["10.0.0.1", 26379], ["10.0.0.2", 26379], ["fd00::3", 26379]]


def test_sentinel_tls_options_reach_sentinels_and_servers():
    env = {**SENTINEL, "REDIS_TLS": "True", "REDIS_TLS_INSECURE": "True"}
    out = run(env, PRINT.format("s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]"))
    assert out.returncode == 0, out.stderr
    assert "FollowPrimarySSLConnection" in out.stdout
    assert "'ssl': True" in out.stdout and out.stdout.count("'ssl_cert_reqs': 'none'") == 2  # servers and sentinels


def test_redis_password_without_a_url_password_is_used_and_an_equal_one_is_accepted():
    out = run({**GOOD, "REDIS_PASSWORD": PASSWORD}, PRINT.format("(s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]['password'], s.CACHES['default']['OPTIONS']['password'])"))
    assert out.stdout.strip() == repr((PASSWORD, PASSWORD)), out.stderr
    # Kubernetes' web pods have both REDIS_PASSWORD and a REDIS_URL built from it.
    same = {**GOOD, "REDIS_URL": f"redis://:{PASSWORD}@h:6379/0", "REDIS_PASSWORD": PASSWORD}
    out = run(same, PRINT.format("'password' in s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]"))
    assert out.stdout.strip() == "False", out.stderr  # the URL's password is the one used


def test_redis_url_config_is_unchanged():
    """REDIS_URL keeps exactly today's layer host and cache (positive control of the refusals)."""
    out = run(GOOD, PRINT.format("(sorted(s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]), s.CACHES['default'])"))
    assert out.stdout.strip() == repr((["address", "redis_connect_func"], {
        "BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": GOOD["REDIS_URL"], "KEY_PREFIX": "chat",
        "OPTIONS": {"socket_timeout": 2, "socket_connect_timeout": 2}})), out.stderr


def test_sentinel_settings_pass_check_deploy():
    env = {**SENTINEL, "REDIS_PASSWORD": PASSWORD}
    result = run(env, cmd=[sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_gunicorn_boots_with_sentinels():
    """Positive control for the master's refusal: sentinel settings boot workers
    (the sentinels are unreachable: Redis is only needed per request)."""
    import signal
    import socket
    import subprocess
    import time

    from tests.harness.services import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in GOOD and not k.startswith(("DJANGO", "REDIS"))}
    env.update({k: v for k, v in SENTINEL.items() if v is not None}, PORT=str(port), WEB_CONCURRENCY="1",
               DJANGO_SETTINGS_MODULE="app.settings")
    proc = subprocess.Popen(gunicorn_cmd(), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    try:
        deadline = time.monotonic() + 30
        while "Booting worker" not in output and time.monotonic() < deadline and proc.poll() is None:
            output += proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        output += proc.communicate(timeout=30)[0]
    assert "Booting worker" in output and "Configuration error" not in output, output


@pytest.mark.parametrize("value, parsed", [
    ("a:1", (("a", 1),)),
    ("a:1, b:2 ,", (("a", 1), ("b", 2))),
    ("[::1]:26379", (("::1", 26379),)),
    ("10.0.0.1:26379,[fd00::1]:26380", (("10.0.0.1", 26379), ("fd00::1", 26380))),
])
def test_host_port_lists(value, parsed):
    from app.redis_config import parse_host_ports

    assert parse_host_ports("X", value) == parsed


def test_descriptions_carry_no_password():
    from app.redis_config import RedisTarget

    assert RedisTarget(url=f"redis://:{PASSWORD}@h:6379/0").describe() == "redis://h:6379/0"
    target = RedisTarget(sentinels=(("a", 1), ("::1", 2)), master="m", password=PASSWORD, sentinel_password=PASSWORD)
    assert target.describe() == "sentinel://a:1,[::1]:2/m"
    assert PASSWORD not in repr(target)


def test_every_redis_setting_is_in_the_readme_table():
    import re

    from tests.harness.services import REPO

    source = (REPO / "app" / "redis_config.py").read_text()
    names = set(re.findall(r'env\.get_\w+\("([A-Z_]+)"', source))
    assert {"REDIS_URL", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD"} <= names
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)`", readme, re.M)) | {
        n for row in re.findall(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)+) \|", readme, re.M) for n in re.findall(r"[A-Z_]+", row)}
    assert names <= documented, f"not in README's settings table: {sorted(names - documented)}"


def test_core_layer_waits_longer_than_its_blocking_pop():
    out = run({**SENTINEL, "CHANNEL_LAYER": "core"}, PRINT.format("s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]['socket_timeout']"))
    assert float(out.stdout) > 5, out.stdout + out.stderr  # channels_redis' brpop_timeout is 5 s
