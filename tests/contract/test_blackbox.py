"""Black-box contract: the verifier's checks, one test each, over HTTP/WS only."""
import pytest

from tests.contract import verify


@pytest.mark.parametrize("check", verify.CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_blackbox(check, blackbox):
    check(blackbox)
