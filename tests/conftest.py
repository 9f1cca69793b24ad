"""Options for the target-agnostic contract in tests/contract.

That suite runs only when a target is named (`--target-url`); the target
tests (bare stack, image, platforms, VMs, pods) run it in a subprocess with
`tests.harness.contract.run_contract` and fail unless every check passed.
"""
from pathlib import Path

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


def pytest_ignore_collect(collection_path, config):
    if CONTRACT in (collection_path, *collection_path.parents) and not config.getoption("--target-url"):
        return True
    return None


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
