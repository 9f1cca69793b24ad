"""Options for the target-agnostic contract in tests/contract.

That suite runs only when a target is named (`--target-url`); the target
tests (bare stack, image, platforms, VMs, pods) run it in a subprocess with
`tests.harness.contract.run_contract` and fail unless every check passed.
"""
from pathlib import Path

import pytest

from tests.harness import services

pytest_plugins = ["tests.harness.fixtures"]

CONTRACT = Path(__file__).parent / "contract"


def pytest_addoption(parser):
    group = parser.getgroup("contract", "the deployment contract (tests/contract)")
    group.addoption("--target-url", help="where the deployment answers, e.g. http://127.0.0.1:8000")
    group.addoption("--target-host", help="Host header/public name to present (default: the URL's)")
    group.addoption("--https-proxy", action="store_true", help="act as a TLS-terminating proxy (X-Forwarded-Proto: https)")
    group.addoption("--insecure", action="store_true", help="accept a self-signed certificate")
    group.addoption("--second-url", help="a second instance for cross-instance fan-out")
    group.addoption("--http-url", help="where plain HTTP answers, for the redirect check (needed when HTTPS is not on 443)")
    group.addoption("--expect-workers", type=int, default=2, help="Uvicorn workers per gunicorn master")
    group.addoption("--expect-port", type=int, default=8000, help="port gunicorn listens on, on the host")
    group.addoption("--redis", help="HOST:PORT of Redis as seen from the host")
    parser.addoption("--lanes", action="store_true",
                     help="with -n 2: tests/vm and tests/platforms in one worker, the rest in the other (lane_of)")


def pytest_ignore_collect(collection_path, config):
    if CONTRACT in (collection_path, *collection_path.parents) and not config.getoption("--target-url"):
        return True
    return None


# `make test` runs two lanes side by side (`pytest -n 2 --lanes`). The VM
# deployment tests (tests/vm: three systemd hosts, four playbook runs) spend
# most of their ~13 minutes waiting on SSH, apt and pip inside the hosts, and
# the rest of the suite leaves about half of the two cores idle too (sleeps,
# restarts, timeouts). The platform emulations (~5 minutes) join the VM lane
# so that the two lanes take about as long. Each lane runs in one xdist
# worker, in order, with its session fixtures to itself.
TARGETS_LANE = ("tests/vm/", "tests/platforms/")


def lane_of(nodeid: str) -> str:
    return "targets" if nodeid.startswith(TARGETS_LANE) else "main"


@pytest.hookimpl(trylast=True)  # after tests/vm's own order (the Sentinel layout last)
def pytest_collection_modifyitems(items):
    """In the targets lane the VM tests go first: their hosts' first minutes
    are the lane's busiest for the CPU, while the other lane's first tests
    leave it idle."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/platforms/"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("--lanes"):
        from tests.harness.lanes import LaneScheduling

        return LaneScheduling(config, log, lane_of)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """A lane's own summary lines (tests/vm's timings), kept for the end."""
    SUMMARIES.extend(getattr(node, "workeroutput", {}).get("summary_lines", []))


SUMMARIES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARIES:
        terminalreporter.write_line(line)


def pytest_configure(config):
    services.stop_all_on_signals()


def pytest_sessionfinish(session, exitstatus):
    """Whatever happened (a fixture that failed half-way, an interrupt), no
    Redis, PostgreSQL or gunicorn started by the harness outlives the session."""
    leaked = services.stop_all()
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"stopped {len(leaked)} service(s) still running at the end: {', '.join(leaked)}")
