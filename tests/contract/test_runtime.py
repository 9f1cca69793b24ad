"""White-box contract: what must be true on any host that runs the chat.

Runs through testinfra against whatever `--hosts` names (local, docker,
ssh/ansible, kubectl); it never knows which target it is on.
"""


def test_master_runs_the_expected_number_of_workers(master, expected):
    assert len(master.workers) == expected["workers"], [(w.pid, w.cmdline) for w in master.workers]


def test_workers_speak_uvicorn(host, expected):
    # Asked from the host itself, past any proxy: Uvicorn names itself in the
    # Server header (gunicorn's own workers would say "gunicorn"). Any status
    # will do, even a 400 for a Host this probe does not know.
    out = host.run(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; "
        "printf \"GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n\" >&3; cat <&3'" % expected["port"]
    )
    assert out.rc == 0, out.stderr
    head = out.stdout.split("\r\n\r\n", 1)[0].lower()
    assert "server: uvicorn" in head, head


def test_debug_is_false_in_the_master_environment(host, master):
    from tests.contract.procs import environ

    env = environ(host, master.pid)
    assert "DEBUG" in env, "DEBUG is not set in the environment: set DEBUG=False explicitly"
    assert env["DEBUG"].strip().lower() in ("false", "0", "no", "off"), f"DEBUG={env['DEBUG']!r}"


def test_master_listens_on_the_expected_port(host, master, expected):
    from tests.contract.procs import listening_inodes

    assert master.sockets & listening_inodes(host, expected["port"])


def test_nothing_runs_as_root(master):
    for proc in [master, *master.workers]:
        assert proc.uid != 0, f"{proc.cmdline} (pid {proc.pid}) runs as root"


def test_redis_is_reachable_from_the_host(host, expected):
    address = expected["redis"]
    assert address, "pass --redis HOST:PORT"
    redis_host, port = address.rsplit(":", 1)
    # bash's /dev/tcp: no redis-cli or python needed on the host. Any RESP
    # answer (+PONG, or -NOAUTH when a password is set) proves it is Redis.
    out = host.run(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/%s/%s; printf \"PING\\r\\n\" >&3; head -c 7 <&3'" % (redis_host, port)
    )
    assert out.rc == 0 and out.stdout[:1] in ("+", "-"), f"no Redis at {address}: rc={out.rc} {out.stdout!r} {out.stderr!r}"
