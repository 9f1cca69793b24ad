"""Session fixtures for the platform emulations: one Docker network, the
product image (built once from the local Debian 13 base) and the image the
managed services run from. Everything is removed at the end of the session."""
from __future__ import annotations

import hashlib
import time

import pytest

from tests.harness.app_image import build_app_image
from tests.harness.debian_image import python_base_image, services_image
from tests.platforms.infra import REPO, Lab

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def timings():
    yield TIMINGS
    if TIMINGS:
        print("\nplatform timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="session")
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture(scope="session")
def base_image() -> str:
    return python_base_image()


@pytest.fixture(scope="session")
def svc_image() -> str:
    return services_image()


def worktree_tag(name: str = "chat-test/app") -> str:
    """Image tags are shared by every checkout on this Docker engine: one per
    checkout, so a test never runs another checkout's build."""
    return f"{name}:wt-{hashlib.sha1(str(REPO).encode()).hexdigest()[:10]}"


@pytest.fixture(scope="session")
def app_image(timings) -> str:
    start = time.monotonic()
    tag = build_app_image(worktree_tag())
    timings["image build"] = time.monotonic() - start
    return tag


# Static checks of the files: no Docker needed.
STATIC_MODULES = {"test_manifests.py", "test_schemas.py", "test_shutdown_windows.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/platforms/" in str(item.fspath) and item.fspath.basename not in STATIC_MODULES:
            item.add_marker(pytest.mark.docker)
