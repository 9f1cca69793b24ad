"""`make test`'s two lanes (tests/conftest.py lane_of, tests/harness/lanes.py):
real pytest-xdist workers, every test of a lane in one worker, the lanes in
different workers. Plain `-n 2` (xdist's load scheduling) is the control: it
spreads one file's tests over both workers."""
from __future__ import annotations

import os
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


def test_one_build_of_an_image_tag_at_a_time():
    """Both lanes may ask for one image (tests/harness/debian_image.building):
    the second build waits for the first; another tag does not (the control)."""
    import secrets
    import threading

    from tests.harness.debian_image import building, lock_path

    tag, other = f"chat-test/lock-{secrets.token_hex(4)}:a", f"chat-test/lock-{secrets.token_hex(4)}:b"
    order = []

    def build(name):
        with building(name):
            order.append(name)

    try:
        with building(tag):
            same, different = threading.Thread(target=build, args=(tag,)), threading.Thread(target=build, args=(other,))
            same.start(), different.start()
            different.join(5)
            same.join(0.5)
            assert not different.is_alive() and same.is_alive(), "a build of the same tag did not wait"
            order.append("first done")
        same.join(5)
        assert order == [other, "first done", tag]
    finally:
        for name in (tag, other):
            os.unlink(lock_path(name))
