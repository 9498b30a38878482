"""The benchmark's receiver processes, without servers: their bookkeeping and their failures."""

import asyncio
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import loadgen  # noqa: E402  (bench/ is a folder of scripts, importable once on the path)
import receivers  # noqa: E402


def test_counts_start_at_zero_for_every_step() -> None:
    async def scenario() -> tuple[tuple[int, int], dict[str, object], int]:
        pool = receivers.Receivers(loadgen.Bench([1], []), 2)
        await pool.start()
        try:
            await pool.begin_step(0)
            await pool.begin_step(1)
            progress = await pool.progress(1)
            ended = await pool.end_step(1)
            lost = await pool.lost()
        finally:
            await pool.stop()
        return progress, ended, lost

    progress, ended, lost = asyncio.run(scenario())
    assert progress == (0, 0)
    assert ended == {"received": 0, "last_ns": 0, "lat": [], "errors": 0}
    assert lost == 0


def test_a_bad_request_is_an_error_not_a_hang() -> None:
    async def scenario() -> None:
        pool = receivers.Receivers(loadgen.Bench([1], []), 1)
        await pool.start()
        try:
            await pool.call(0, {"op": "no such thing"})
        finally:
            await pool.stop()

    with pytest.raises(RuntimeError, match="unknown op"):
        asyncio.run(scenario())


def test_a_dead_receiver_is_reported_and_stop_still_ends_the_rest() -> None:
    async def scenario() -> tuple[str, dict[str, object], list[int | None]]:
        pool = receivers.Receivers(loadgen.Bench([1], []), 2)
        await pool.start()
        pool.procs[0].kill()
        await pool.procs[0].wait()
        try:
            await pool.progress(None)
        except RuntimeError as exc:
            failure = str(exc)
        report = await pool.stop()
        return failure, report, [proc.returncode for proc in pool.procs]

    failure, report, codes = asyncio.run(scenario())
    assert "exited" in failure
    assert any("receivers:" in key for key in report["error_samples"])  # type: ignore[attr-defined]
    assert all(code is not None for code in codes)


def test_connect_summaries_add_up() -> None:
    here = {
        "requested": 5,
        "connected": 5,
        "failed": 0,
        "failure_samples": {},
        "seconds": 0.5,
        "connect_latency": {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "max_ms": 3.0},
    }
    there = {
        "requested": 195,
        "connected": 194,
        "failed": 1,
        "failure_samples": {"TimeoutError: ": 1},
        "seconds": 2.0,
        "connect_latency": {"p50_ms": 5.0, "p90_ms": 9.0, "p99_ms": 20.0, "max_ms": 25.0},
    }
    merged = receivers.merge_connect_stats([here, there])
    assert merged["requested"] == 200
    assert merged["connected"] == 199
    assert merged["failed"] == 1
    assert merged["failure_samples"] == {"TimeoutError: ": 1}
    assert merged["seconds"] == 2.0
    assert merged["connects_per_s"] == 99.5
    assert merged["connect_latency"]["p99_ms"] == 20.0
