"""The machine-speed probe (bench/probe.py): what it writes, and how a step reads it."""

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import probe  # noqa: E402  (bench/ is a folder of scripts, importable once on the path)
import run  # noqa: E402


def test_a_step_reads_the_median_of_the_samples_taken_within_it(tmp_path: Path) -> None:
    path = tmp_path / "probe.txt"
    # monotonic ns, then the ns the unit of work took
    path.write_text("100 9000000\n200 2000000\n300 1000000\n400 3000000\n500 7000000\n")
    assert probe.unit_ms(path, 200, 400) == 2.0
    assert probe.unit_ms(path, 150, 250) == 2.0
    assert probe.unit_ms(path, 0, 1000) == 3.0
    assert probe.unit_ms(path, 600, 700) is None  # no sample in the window
    assert probe.unit_ms(None, 0, 1000) is None  # no probe in this run
    assert probe.unit_ms(tmp_path / "missing.txt", 0, 1000) is None


def test_the_probe_times_its_work_on_the_shared_monotonic_clock(tmp_path: Path) -> None:
    path = tmp_path / "probe.txt"
    before = time.monotonic_ns()
    subprocess.run(
        [sys.executable, probe.SCRIPT, str(path), "--units", "3", "--interval", "0"],
        check=True,
        timeout=60,
    )
    after = time.monotonic_ns()
    samples = [tuple(map(int, line.split())) for line in path.read_text().splitlines()]
    assert len(samples) == 3
    assert all(before <= at <= after and took > 0 for at, took in samples)
    assert [at for at, _ in samples] == sorted(at for at, _ in samples)
    median_ns = sorted(took for _, took in samples)[1]
    assert probe.unit_ms(path, before, after) == round(median_ns / 1e6, 3)


def fanout_result(name: str, probe_ms: list[float | None], best: int) -> dict:
    steps = [
        {"probe_ms": ms, "delivered_per_s": 1000.0 * (i + 1), "ok": True}
        for i, ms in enumerate(probe_ms)
    ]
    best_step = steps[best]
    return {
        "config": name,
        "status": "ok",
        "scenarios": {
            "fanout": {
                "steps": steps,
                "max_sustained": {
                    "deliveries_per_s": best_step["delivered_per_s"],
                    "probe_ms": best_step["probe_ms"],
                },
            }
        },
    }


def test_each_figure_is_given_the_speed_of_its_best_step_against_the_runs_fastest() -> None:
    results = [
        fanout_result("yardstick", [2.0, 1.5, None], best=1),
        fanout_result("uvicorn-1", [3.0, 2.5], best=1),
        fanout_result("daphne-1", [None], best=0),
    ]
    assert run.fastest_probe_ms(results) == 1.5
    rows = {row["config"]: row for row in run.summarize(results)}
    assert rows["yardstick"]["speed_at_max"] == 1.0
    assert rows["uvicorn-1"]["speed_at_max"] == 0.6
    assert rows["uvicorn-1"]["probe_ms_at_max"] == 2.5
    assert rows["daphne-1"]["speed_at_max"] is None


def test_a_figure_measured_on_a_slow_machine_is_flagged_under_the_table(capsys) -> None:
    results = [
        fanout_result("yardstick", [1.5], best=0),
        fanout_result("uvicorn-1", [2.5], best=0),
    ]
    run.print_table(run.summarize(results), clients=200)
    out = capsys.readouterr().out
    assert "uvicorn-1: its best step ran with the machine at 0.60 of its fastest" in out
    assert "yardstick: its best step ran" not in out
