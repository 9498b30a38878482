"""The machine-speed probe (bench/probe.py): what it writes, and how a step reads it."""

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import probe  # noqa: E402  (bench/ is a folder of scripts, importable once on the path)


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
