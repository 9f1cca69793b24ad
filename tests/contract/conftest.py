"""Fixtures for the target-agnostic contract (options live in tests/conftest.py)."""
import pytest

from tests.contract import procs, verify


@pytest.fixture(scope="session")
def expected(request):
    opt = request.config.getoption
    return {"workers": opt("--expect-workers"), "port": opt("--expect-port"), "redis": opt("--redis")}


@pytest.fixture(scope="module")
def master(host, expected):
    """The gunicorn master that listens on the expected port."""
    listening = procs.listening_inodes(host, expected["port"])
    assert listening, f"nothing listens on port {expected['port']}"
    everyone = procs.gunicorn_processes(host)
    # Workers inherit the listening socket; the master is the holder whose
    # parent does not hold it.
    holders = {p.pid: p for p in everyone if p.sockets & listening}
    masters = [p for p in holders.values() if p.ppid not in holders]
    assert len(masters) == 1, f"expected one gunicorn master on port {expected['port']}, found {[(m.pid, m.cmdline) for m in masters]}"
    masters[0].workers = [p for p in everyone if p.ppid == masters[0].pid]
    return masters[0]


@pytest.fixture(scope="session")
def blackbox(request):
    opt = request.config.getoption
    return verify.build_context(
        opt("--target-url"), opt("--target-host"), opt("--https-proxy"), opt("--insecure"), opt("--second-url"),
        opt("--http-url"),
    )
