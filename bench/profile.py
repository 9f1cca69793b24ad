"""Summarise py-spy `--format raw` (collapsed stacks) files: python -m bench.profile FILE...

Prints, per file set, the share of samples in which a frame appears (inclusive)
and the innermost frames (self), so "where does a delivery's time go" can be
read without a flame-graph viewer.
"""
from __future__ import annotations

import re
import sys
from collections import Counter

FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/app/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def load(paths):
    stacks = Counter()
    for path in paths:
        for line in open(path, errors="replace"):
            line = line.rstrip("\n")
            if not line or " " not in line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                stacks[stack] += int(count)
            except ValueError:
                continue
    return stacks


def summary(paths, top=30) -> str:
    stacks = load(paths)
    total = sum(stacks.values()) or 1
    inclusive, self_ = Counter(), Counter()
    threads = Counter()
    for stack, n in stacks.items():
        frames = [short(f) for f in stack.split(";")]
        if frames and frames[0].startswith(("process", "thread")):
            threads[frames[0]] += n
            frames = frames[1:]
        for f in set(frames):
            inclusive[f] += n
        if frames:
            self_[frames[-1]] += n
    out = [f"{total} samples (active only) in {len(paths)} file(s)", "", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(sys.argv[1:], top=int(__import__("os").environ.get("TOP", "30"))))
