"""The benchmark runs end to end on a tiny load and writes its outputs.

No timing is asserted (the machine is shared): only that the real stack
started, the generator processes delivered messages with none twice, the
idle and busy sockets were held, the churn soak reconnected and sampled
memory, a baseline checkout was measured too, and every output file is there
and well-formed. The sweep never stops early (a huge --stop-p99-ms), so the
number of steps does not depend on the machine's speed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.services import REPO

pytestmark = pytest.mark.integration


def test_tiny_benchmark_produces_results_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--configs", "pubsub:1,core:1", "--clients", "20", "--rooms", "2",
         "--loads", "50,100", "--duration", "1.5", "--drain", "2", "--warmup", "0", "--idle", "40",
         "--busy", "40", "--busy-minutes", "0.1", "--busy-step", "3", "--busy-load", "100",
         "--churn", "5", "--churn-minutes", "0.1", "--churn-sample", "1", "--churn-hold", "0.5",
         "--baseline", "HEAD", "--stop-p99-ms", "1e9", "--stop-lost", "2",
         "--gen-procs", "2", "--time-limit", "900", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
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

    check_busy(results["busy"], target=40)
    check_churn(results["churn"])

    # The baseline (HEAD in a temporary worktree, removed afterwards) went through every phase too.
    base = results["baseline"]
    assert base["ref"] == "HEAD" and len(base["commit"]) == 40, base.keys()
    assert [c["name"] for c in base["configs"]] == ["pubsub-w1", "core-w1"]
    assert all(len(c["steps"]) == 2 and c["connected"] == 20 for c in base["configs"])
    check_busy(base["busy"], target=40)
    check_churn(base["churn"])
    assert not Path(base["worktree"]).exists(), base["worktree"]
    listed = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert base["worktree"] not in listed, listed

    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and {s["config"] for s in steps} == {"pubsub-w1", "core-w1"}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.txt").read_text()
    assert "p99 ms" in table and "knee" in table and "idle" in table
    assert "busy (pubsub-w1)" in table and "churn (pubsub-w1)" in table
    labels = [line.strip() for line in table.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    # One before/after block per figure of the issue.
    assert labels == ["knee (p99 ≤ 250 ms, 0 lost)", "p99 at the 10,000/s step", "KiB per busy socket",
                      "churn: workers' RSS slope, second half", "gunicorn start → /readyz 200"], labels
    assert "before:" in table and "after:" in table
    assert "p99 ms" in result.stdout  # the table is printed to the terminal too
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The performance page renders every figure with both columns and says what was not the reference.
    from bench import report

    page = report.readme_section(results)
    assert "| KiB per busy socket |" in page and "| churn: workers' RSS slope, second half |" in page
    assert "not the reference 10,000 sockets for 10 min" in page and "not the reference 200/s for 10 min" in page
    assert "no baseline in this run" not in page


def check_busy(busy, target):
    assert busy["held"] == busy["target"] == target, busy
    assert busy["sent"] > 0 and busy["delivered"] > 0 and busy["duplicated"] == 0, busy
    assert busy["delivered"] <= busy["expected"], busy
    assert busy["steps"] and all("memory" in s for s in busy["steps"]), busy["steps"]
    assert busy["before"]["rss"] > 0 and busy["after"]["rss"] > 0 and busy["after"]["pss"] > 0, busy
    assert isinstance(busy["per_socket_rss_kib"], float) and isinstance(busy["per_socket_pss_kib"], float), busy
    # The probe: every sender sent at least once (min_sends), so something was expected and delivered.
    assert busy["probe"]["senders"] == 2 and busy["probe"]["expected"] >= 2 * 20, busy["probe"]
    assert busy["probe"]["delivered"] > 0, busy["probe"]


def check_churn(churn):
    assert churn["started"] > 0 and churn["completed"] > 0, churn
    assert churn["completed"] + churn["closed_by_server"] + sum(churn["failed"].values()) <= churn["started"], churn
    assert len(churn["samples"]) >= 3 and all(s["workers_rss"] > 0 for s in churn["samples"]), churn["samples"]
    assert churn["slope_samples"] >= 3 and isinstance(churn["workers_rss_slope_kib_per_min"], float), churn
    assert churn["rss_start"] > 0 and churn["rss_end"] > 0, churn


def test_slope_is_least_squares_in_kib_per_minute():
    from bench.soak import slope_kib_per_min

    # 1 KiB every 2 s is 30 KiB/min, whatever the offset; fewer than 3 points give no slope.
    assert slope_kib_per_min([(t, 5_000_000 + 512 * t) for t in range(0, 60, 5)]) == 30.0
    assert slope_kib_per_min([(0, 1), (1, 2)]) is None
    assert slope_kib_per_min([(t, 7) for t in range(10)]) == 0.0


def test_the_readme_performance_block_is_the_reference_run():
    """README.md's performance section is generated from bench/results/reference/results.json
    (bench/report.py readme_block): regenerating it changes nothing, and the block is required."""
    import json
    from pathlib import Path

    import pytest

    from bench import report

    root = Path(__file__).resolve().parents[2]
    results = json.loads((root / "bench/results/reference/results.json").read_text())
    ref = "bench/results/reference"
    memory = f"{ref}/memory.png" if (root / ref / "memory.png").exists() else None
    block = report.readme_block(results, f"{ref}/results.json", f"{ref}/plot.png", memory)
    readme = (root / "README.md").read_text()
    assert report.replace_readme_block(readme, block) == readme, "README.md's bench block is stale: run python -m bench --readme-from bench/results/reference/results.json"
    assert results["machine"]["git"] in block and "| knee" in block and "plot.png" in block
    with pytest.raises(ValueError, match="bench:begin"):
        report.replace_readme_block("# no block here\n", block)
