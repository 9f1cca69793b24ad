"""Run the target-agnostic contract (tests/contract) against one target.

    run_contract("http://127.0.0.1:8000", "local://", port=8000, redis="127.0.0.1:6379")

It starts pytest in a subprocess, so the very same suite runs unchanged for
every target, and raises AssertionError with the whole output unless every
check ran and passed.
"""
from __future__ import annotations

import re
import subprocess
import sys

from tests.harness.services import REPO

def expected_count(hosts: str) -> int:
    """test_runtime.py's tests once per host, plus the verifier's checks."""
    from tests.contract import verify

    runtime = (REPO / "tests/contract/test_runtime.py").read_text().count("\ndef test_")
    return runtime * len(hosts.split(",")) + len(verify.CHECKS)


def run_contract(url: str, hosts: str, *, workers: int = 2, port: int = 8000, redis: str, host_header: str | None = None,
                 https_proxy: bool = True, insecure: bool = False, second_url: str | None = None, http_url: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict | None = None, timeout: float = 300) -> str:
    args = [
        sys.executable, "-m", "pytest", "tests/contract", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
        f"--hosts={hosts}", f"--target-url={url}", f"--expect-workers={workers}", f"--expect-port={port}",
        f"--redis={redis}", "-p", "no:randomly",
    ]
    if host_header:
        args.append(f"--target-host={host_header}")
    if https_proxy:
        args.append("--https-proxy")
    if insecure:
        args.append("--insecure")
    if second_url:
        args.append(f"--second-url={second_url}")
    if http_url:
        args.append(f"--http-url={http_url}")
    args += list(extra_args)
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    output = result.stdout + result.stderr
    passed = re.search(r"(\d+) passed", output)
    assert result.returncode == 0, f"contract failed against {url} ({hosts}):\n{output}"
    assert passed and int(passed.group(1)) == expected_count(hosts), f"contract ran {passed and passed.group(1)} of {expected_count(hosts)} checks:\n{output}"
    return output
