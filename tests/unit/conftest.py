import pytest


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """Unit tests count in-process buckets (tests/settings.py): each test starts full."""
    from app.chat import throttle

    throttle.reset_local()
    yield
    throttle.reset_local()
