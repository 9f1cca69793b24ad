"""`make test`'s two lanes (tests/conftest.py lane_of, tests/harness/lanes.py):
real pytest-xdist workers, every test of a lane in one worker, the lanes in
different workers. Plain `-n 2` (xdist's load scheduling) is the control: it
spreads one file's tests over both workers."""
from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict

from tests.harness.services import REPO

MAIN = "tests/unit/test_origin.py"  # 25 quick tests
VM = "tests/vm/test_ansible_lint.py::test_playbook_syntax"  # no hosts needed


def workers_by_file(*options: str) -> dict[str, set[str]]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-n", "2", *options, MAIN, VM],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seen = defaultdict(set)
    for worker, nodeid in re.findall(r"^\[(gw\d+)\] .*?PASSED (\S+)", out.stdout, re.M):
        seen[nodeid.split("::")[0]].add(worker)
    assert sum(1 for line in out.stdout.splitlines() if "PASSED" in line) == 26, out.stdout[-3000:]
    return seen


def test_each_lane_runs_in_one_worker_of_its_own():
    seen = workers_by_file("--lanes")
    main, vm = seen["tests/unit/test_origin.py"], seen["tests/vm/test_ansible_lint.py"]
    assert len(main) == 1 and len(vm) == 1 and main != vm, dict(seen)


def test_control_without_lanes_one_file_is_spread():
    seen = workers_by_file()
    assert len(seen["tests/unit/test_origin.py"]) == 2, dict(seen)
