"""The benchmark runs end to end on a tiny load and writes its outputs.

No timing is asserted (the machine is shared): only that the real stack
started, the generator processes delivered messages with none twice, the
idle sockets were held, and every output file is there and well-formed.
"""
import json
import subprocess
import sys

import pytest

from tests.harness.services import REPO

pytestmark = pytest.mark.integration


def test_tiny_benchmark_produces_results_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--configs", "pubsub:1,core:1", "--clients", "20", "--rooms", "2",
         "--loads", "50,100", "--duration", "1.5", "--drain", "2", "--warmup", "0", "--idle", "40",
         "--gen-procs", "2", "--time-limit", "240",
         # Both steps always run: a busy CI machine must not end the sweep early.
         "--stop-p99-ms", "600000", "--stop-lost-share", "1.0", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=420,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    results = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in results["configs"]] == ["pubsub-w1", "core-w1"]
    for config in results["configs"]:
        assert config["connected"] == 20, config
        assert config["ready_seconds"] > 0
        assert len(config["steps"]) == 2, config["steps"]
        for step in config["steps"]:
            for key in ("offered_deliveries_per_s", "delivered_per_s", "lost", "duplicated", "p50_ms", "p95_ms", "p99_ms"):
                assert key in step, key
            assert step["sent"] > 0 and step["delivered"] > 0, step
            assert step["duplicated"] == 0, step
            # Every delivery counted belongs to a message some client sent to that room.
            assert step["delivered"] <= step["expected"], step
    idle = results["idle"]
    assert idle["held"] == idle["target"] == 40, idle
    assert idle["after"]["rss"] > 0 and idle["probe"]["delivered"] > 0, idle

    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and {s["config"] for s in steps} == {"pubsub-w1", "core-w1"}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.txt").read_text()
    assert "p99 ms" in table and "knee" in table and "idle" in table
    assert "p99 ms" in result.stdout  # the table is printed to the terminal too
