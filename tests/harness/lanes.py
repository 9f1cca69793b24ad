"""pytest-xdist scheduling by lane: every test of a lane goes to one worker,
in collection order (tests/conftest.py: lane_of, `make test`).

xdist's own `--dist loadgroup` would do this with `xdist_group` marks, but
with pytest 9.2 it silently does not: it appends the group to
`item._nodeid`, and pytest 9.2's `nodeid` no longer reads that attribute, so
every test landed in its own group. `LoadScopeScheduling._split_scope` is the
extension point xdist's own `LoadFileScheduling` overrides;
tests/unit/test_lanes.py pins that it still decides where a test runs.
"""
from __future__ import annotations

from typing import Callable

from xdist.scheduler import LoadScopeScheduling


class LaneScheduling(LoadScopeScheduling):
    def __init__(self, config, log, lane_of: Callable[[str], str]):
        super().__init__(config, log)
        self.lane_of = lane_of

    def _split_scope(self, nodeid: str) -> str:
        return self.lane_of(nodeid)
