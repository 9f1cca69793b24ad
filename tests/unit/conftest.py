import pytest


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """Unit tests count in-process buckets (tests/settings.py): each test starts full."""
    from app.chat import throttle

    throttle.reset_local()
    yield
    throttle.reset_local()


@pytest.fixture(autouse=True)
def fresh_readiness():
    """/readyz reuses its result for a second: no test sees another test's answer."""
    from app import health

    health._ready.update(result=None, at=0.0, task=None)
    yield
    health._ready.update(result=None, at=0.0, task=None)
