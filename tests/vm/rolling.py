"""Moved to tests/harness/rolling.py (shared by every redeploy test)."""
from tests.harness.rolling import Follower, Prober, Sender  # noqa: F401
