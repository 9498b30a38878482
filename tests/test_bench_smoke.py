"""The benchmark harness runs end to end (smoke mode, the yardstick and our server).

Structure and delivery only: no timing is asserted, so a slow CI machine cannot fail it.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_against_yardstick_and_server(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--smoke",
            "--configs",
            "yardstick",
            "daphne-1",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert report["meta"]["mode"] == "smoke"
    assert [row["config"] for row in report["summary"]] == ["yardstick", "daphne-1"]

    for name in ("yardstick", "daphne-1"):
        config = report["configs"][name]
        assert config["status"] == "ok", config
        fanout = config["scenarios"]["fanout"]
        assert fanout["steps"]
        spread = fanout["params"]["receiver_processes"]
        assert spread >= 1
        assert fanout["connect"]["connected"] == fanout["params"]["clients"]
        for step in fanout["steps"]:
            # Counted across the load generator and its receiver processes: all of it.
            assert step["received"] == step["expected"] > 0
            assert len(step["loadgen_cpu_pct_all"]) == 1 + spread
            assert 0 <= step["host_steal_pct"] <= 100
            assert "delivery_ratio" in step
            assert {"p50_ms", "p90_ms", "p99_ms", "max_ms"} <= step["latency"].keys()
            assert step["errors"] == 0
        # How fast the machine ran the probe's work meanwhile (a step can fall between samples
        # on a starved machine, so not every step need have one).
        timed = [step["probe_ms"] for step in fanout["steps"] if step["probe_ms"] is not None]
        assert timed and min(timed) > 0
        assert fanout["max_sustained"]["deliveries_per_s"] > 0
        # Two rounds, each on a freshly started server, each step counted in full above.
        assert [r["round"] for r in fanout["rounds"]] == [1, 2]
        assert {s["round"] for s in fanout["steps"]} == {1, 2}

        rooms = config["scenarios"]["many_rooms"]
        assert rooms["received"] > 0
        assert "delivery_ratio" in rooms

        idle = config["scenarios"]["idle"]
        assert idle["connect"]["connected"] > 0
        assert "kb_per_connection" in idle
        assert "connects_per_s" in idle

    for row in report["summary"]:
        for key in ("max_deliveries_per_s", "many_rooms_ratio", "idle_kb_per_conn"):
            assert key in row
        # Against the fastest the machine ran the probe's work in any step of the run.
        assert row["speed_at_max"] is None or 0 < row["speed_at_max"] <= 1
    assert report["meta"]["probe_fastest_ms"] > 0
    assert (tmp_path / "probe.txt").read_text().strip()

    # Smoke loads are too small to judge the targets: listed, never met or missed.
    assert report["targets"]
    for entry in report["targets"]:
        assert {"target", "name", "configs", "required", "measured", "status", "note"} <= set(entry)
        assert isinstance(entry["configs"], list) and entry["configs"]
        assert entry["status"] == "not run"
    assert "targets: not judged in smoke mode" in done.stdout
