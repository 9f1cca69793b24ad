"""The contract (testinfra + black-box) against the bare stack on this machine."""
from tests.harness.contract import run_contract


def test_contract_passes_on_the_bare_stack(stack):
    run_contract(stack.url, "local://", workers=2, port=stack.port, redis=f"127.0.0.1:{stack.redis.port}")
