"""The targets checklist of bench/run.py, judged on synthetic results (no servers)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench_run() -> ModuleType:
    # run.py imports its siblings (`from servers import ...`) as top-level modules.
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_DIR / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_run = load_bench_run()
import loadgen  # noqa: E402  (a sibling of run.py, importable once bench/ is on the path)

FAN = 199
SERVERS = ["daphne-1", "uvicorn-1", "daphne-2", "uvicorn-2"]


def step(
    rate: float,
    *,
    ok: bool = True,
    missing: int = 0,
    errors: int = 0,
    delivered: float | None = None,
) -> dict[str, Any]:
    sent = int(rate * 3)
    expected = sent * FAN
    received = expected - missing
    return {
        "offered_msgs_per_s": rate,
        "offered_deliveries_per_s": rate * FAN,
        "sent": sent,
        "acked": sent,
        "errors": errors,
        "expected": expected,
        "received": received,
        "delivery_ratio": round(received / expected, 5),
        "delivered_per_s": rate * FAN if delivered is None else delivered,
        "latency": {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 5.0, "max_ms": 9.0},
        "server_cpu_pct": 90.0,
        "loadgen_cpu_pct": 60.0,
        "ok": ok,
    }


def ladder(top: float, saturated: bool = True) -> list[dict[str, Any]]:
    """Two easy steps, a passing step delivering `top`/s, and (if saturated) a failing one."""
    steps = [step(10, delivered=top / 4), step(20, delivered=top / 2), step(40, delivered=top)]
    if saturated:
        steps.append(step(80, ok=False, missing=1000))
    return steps


def fanout(steps: list[dict[str, Any]]) -> dict[str, Any]:
    passed = [s for s in steps if s["ok"]]
    best = max(passed, key=lambda s: s["delivered_per_s"], default=None)
    return {
        "steps": steps,
        "saturated": any(not s["ok"] for s in steps),
        "max_sustained": loadgen.max_sustained(best),
    }


def many_rooms(missing: int = 0, p99: float | None = 5.0, errors: int = 0) -> dict[str, Any]:
    expected = 36_000
    return {
        "sent": 4000,
        "expected": expected,
        "received": expected - missing,
        "errors": errors,
        "delivery_ratio": round((expected - missing) / expected, 5),
        "latency": {"p99_ms": p99},
    }


def idle(
    kb: float = 22.0, rate: float = 350.0, connected: int = 2000, still_open: int | None = None
) -> dict[str, Any]:
    return {
        "connect": {"requested": 2000, "connected": connected, "failed": 2000 - connected},
        "connects_per_s": rate,
        "kb_per_connection": kb,
        "still_open_after_hold": connected if still_open is None else still_open,
    }


def config(name: str, top: float, saturated: bool = True, **scenarios: Any) -> dict[str, Any]:
    return {
        "config": name,
        "status": "ok",
        "scenarios": {
            "fanout": scenarios.pop("fanout", None) or fanout(ladder(top, saturated)),
            "many_rooms": scenarios.pop("many_rooms", None) or many_rooms(),
            "idle": scenarios.pop("idle", None) or idle(),
        },
    }


def full_run(**overrides: dict[str, Any]) -> list[dict[str, Any]]:
    tops = {
        "yardstick": 1000.0,
        "daphne-1": 500.0,
        "uvicorn-1": 900.0,
        "daphne-2": 450.0,
        "uvicorn-2": 800.0,
    }
    return [overrides.get(name) or config(name, top) for name, top in tops.items()]


def judge(results: list[dict[str, Any]], mode: str = "full") -> list[dict[str, Any]]:
    rows = bench_run.summarize(results)
    return bench_run.evaluate_targets(rows, {r["config"]: r for r in results}, mode)


def find(targets: list[dict[str, Any]], number: int, name: str) -> dict[str, Any]:
    (entry,) = [t for t in targets if t["target"] == number and t["configs"][0] == name]
    return entry


def test_a_good_full_run_meets_every_target() -> None:
    targets = judge(full_run())

    assert len(targets) == 2 + 2 + 3 * len(SERVERS)
    assert {t["status"] for t in targets} == {"met"}
    assert all(t["settled"] and t["bound"] is None for t in targets)
    assert bench_run.target_counts(targets) == {"met": 16, "missed": 0, "not run": 0}
    assert find(targets, 1, "uvicorn-1")["configs"] == ["uvicorn-1", "yardstick"]
    assert find(targets, 2, "daphne-2")["configs"] == ["daphne-2", "daphne-1"]
    assert find(targets, 1, "uvicorn-1")["measured"] == "0.90x (900 / 1,000)"
    assert find(targets, 2, "uvicorn-2")["measured"] == "0.89x (800 / 900)"
    for entry in targets:
        assert set(entry) == {
            "target",
            "name",
            "configs",
            "required",
            "measured",
            "status",
            "settled",
            "bound",
            "note",
        }


def test_fanout_ratios_below_the_targets_are_missed() -> None:
    targets = judge(
        full_run(
            **{
                "uvicorn-1": config("uvicorn-1", 790.0),
                "daphne-1": config("daphne-1", 240.0),
                "daphne-2": config("daphne-2", 150.0),
            }
        )
    )

    assert find(targets, 1, "uvicorn-1")["status"] == "missed"
    assert find(targets, 1, "uvicorn-1")["measured"] == "0.79x (790 / 1,000)"
    assert find(targets, 1, "daphne-1")["status"] == "missed"
    assert find(targets, 2, "daphne-2")["status"] == "missed"  # 150 / 240
    assert find(targets, 2, "uvicorn-2")["status"] == "met"  # 800 / 790
    assert all(t["settled"] for t in targets)


def test_a_ratio_exactly_at_the_target_is_met() -> None:
    targets = judge(full_run(**{"uvicorn-1": config("uvicorn-1", 800.0)}))

    assert find(targets, 1, "uvicorn-1")["status"] == "met"


def test_a_ratio_just_under_the_target_is_not_printed_as_the_target() -> None:
    targets = judge(full_run(**{"uvicorn-1": config("uvicorn-1", 799.9)}))

    entry = find(targets, 1, "uvicorn-1")
    assert entry["status"] == "missed"
    assert entry["measured"].startswith("0.7999x")


def test_unsaturated_numerator_is_a_lower_bound_that_settles_a_met_target() -> None:
    targets = judge(full_run(**{"uvicorn-1": config("uvicorn-1", 950.0, saturated=False)}))

    entry = find(targets, 1, "uvicorn-1")
    assert entry["status"] == "met"
    assert entry["bound"] == "lower"
    assert entry["settled"] is True
    assert entry["measured"] == ">=0.95x (950+ / 1,000)"


def test_unsaturated_numerator_below_the_target_is_an_unsettled_miss() -> None:
    targets = judge(full_run(**{"uvicorn-1": config("uvicorn-1", 700.0, saturated=False)}))

    entry = find(targets, 1, "uvicorn-1")
    assert entry["status"] == "missed"
    assert entry["bound"] == "lower"
    assert entry["settled"] is False
    assert "lower bound" in entry["note"]


def test_unsaturated_reference_makes_the_ratio_an_upper_bound() -> None:
    targets = judge(
        full_run(
            yardstick=config("yardstick", 1000.0, saturated=False),
            **{"daphne-1": config("daphne-1", 200.0)},
        )
    )

    met = find(targets, 1, "uvicorn-1")  # 0.90x: the true ratio could be lower
    assert (met["status"], met["bound"], met["settled"]) == ("met", "upper", False)
    assert met["measured"] == "<=0.90x (900 / 1,000+)"
    assert "yardstick never saturated" in met["note"]
    missed = find(targets, 1, "daphne-1")  # 0.20x: lower still, so the miss stands
    assert (missed["status"], missed["bound"], missed["settled"]) == ("missed", "upper", True)


def test_two_unsaturated_figures_give_no_direction() -> None:
    targets = judge(
        full_run(
            yardstick=config("yardstick", 1000.0, saturated=False),
            **{"uvicorn-1": config("uvicorn-1", 990.0, saturated=False)},
        )
    )

    entry = find(targets, 1, "uvicorn-1")
    assert (entry["status"], entry["bound"], entry["settled"]) == ("met", "unknown", False)
    assert entry["measured"].startswith("~0.99x")


def test_absent_skipped_and_errored_configurations_are_not_run() -> None:
    results = full_run()[:3]  # quick mode: yardstick, daphne-1, uvicorn-1
    results.append({"config": "daphne-2", "status": "skipped", "error": "time budget spent"})
    results.append(
        {"config": "uvicorn-2", "status": "error", "error": "failed to start: port busy\nmore"}
    )
    targets = judge(results, "quick")

    for number in (3, 4, 5):
        assert find(targets, number, "daphne-2")["status"] == "not run"
        assert find(targets, number, "daphne-2")["note"] == "daphne-2 skipped: time budget spent"
        assert find(targets, number, "uvicorn-2")["note"] == (
            "uvicorn-2 error: failed to start: port busy"
        )
    assert find(targets, 2, "daphne-2")["status"] == "not run"
    assert find(targets, 2, "daphne-2")["measured"] is None
    assert bench_run.target_counts(targets) == {"met": 8, "missed": 0, "not run": 8}

    without_yardstick = judge(full_run()[1:])
    assert find(without_yardstick, 1, "uvicorn-1")["status"] == "not run"
    assert find(without_yardstick, 1, "uvicorn-1")["note"] == "yardstick not in this run"
    assert find(without_yardstick, 2, "uvicorn-2")["status"] == "met"


def test_a_scenario_error_only_affects_that_scenarios_targets() -> None:
    broken = config("daphne-1", 500.0)
    broken["scenarios"]["many_rooms"] = {"error": "RuntimeError: 3 clients failed to connect"}
    targets = judge(full_run(**{"daphne-1": broken}))

    rooms = find(targets, 3, "daphne-1")
    assert rooms["status"] == "not run"
    assert rooms["note"] == "daphne-1 many_rooms: RuntimeError: 3 clients failed to connect"
    assert find(targets, 4, "daphne-1")["status"] == "met"
    assert find(targets, 5, "daphne-1")["status"] == "met"


def test_no_passing_fanout_step_misses_the_ratio_and_leaves_loss_unjudged() -> None:
    dead = config("uvicorn-1", 0.0, fanout=fanout([step(20, ok=False, missing=5000)]))
    targets = judge(full_run(**{"uvicorn-1": dead}))

    assert find(targets, 1, "uvicorn-1")["status"] == "missed"
    assert find(targets, 1, "uvicorn-1")["measured"] == "no fan-out step passed"
    assert find(targets, 5, "uvicorn-1")["status"] == "not run"
    assert find(targets, 2, "uvicorn-2")["status"] == "not run"


def test_one_lost_delivery_below_saturation_is_caught_despite_a_ratio_of_1() -> None:
    steps = [step(10), step(2000, missing=1), step(4000, ok=False)]
    assert steps[1]["delivery_ratio"] == 1.0  # rounded: the ratio alone would hide it
    targets = judge(full_run(**{"daphne-2": config("daphne-2", 0.0, fanout=fanout(steps))}))

    entry = find(targets, 5, "daphne-2")
    assert entry["status"] == "missed"
    expected = (30 + 6000) * FAN
    assert entry["measured"] == f"{expected - 1:,}/{expected:,} (1 missing) in 2 steps"


def test_loss_above_saturation_does_not_count() -> None:
    steps = [step(10), step(20), step(40, ok=False, missing=900)]
    targets = judge(full_run(**{"daphne-1": config("daphne-1", 0.0, fanout=fanout(steps))}))

    entry = find(targets, 5, "daphne-1")
    assert entry["status"] == "met"
    assert entry["measured"] == f"{90 * FAN:,}/{90 * FAN:,} in 2 steps"


def test_a_failed_step_at_or_below_the_max_sustained_rate_still_counts() -> None:
    steps = [step(10), step(20, ok=False, missing=3), step(40)]
    targets = judge(full_run(**{"daphne-1": config("daphne-1", 0.0, fanout=fanout(steps))}))

    entry = find(targets, 5, "daphne-1")
    assert entry["status"] == "missed"
    assert "(3 missing) in 3 steps" in entry["measured"]


def test_a_duplicate_in_one_step_does_not_cancel_a_loss_in_another() -> None:
    steps = [step(10, missing=-2), step(20, missing=2), step(40, ok=False)]
    targets = judge(full_run(**{"daphne-1": config("daphne-1", 0.0, fanout=fanout(steps))}))

    assert find(targets, 5, "daphne-1")["status"] == "missed"


def test_refused_messages_below_saturation_are_a_miss() -> None:
    steps = [step(10), step(20, errors=1), step(40, ok=False)]
    targets = judge(full_run(**{"uvicorn-2": config("uvicorn-2", 0.0, fanout=fanout(steps))}))

    entry = find(targets, 5, "uvicorn-2")
    assert entry["status"] == "missed"
    assert entry["measured"].endswith(", 1 error in 2 steps")


@pytest.mark.parametrize(
    ("rooms", "status", "note"),
    [
        (many_rooms(p99=50.0), "met", None),
        (many_rooms(p99=50.1), "missed", "short on p99"),
        (many_rooms(p99=None, missing=36_000), "missed", "short on delivery, p99"),
        (many_rooms(missing=1), "missed", "short on delivery"),
        (many_rooms(errors=2), "missed", "short on delivery"),
    ],
)
def test_many_rooms(rooms: dict[str, Any], status: str, note: str | None) -> None:
    targets = judge(full_run(**{"uvicorn-1": config("uvicorn-1", 900.0, many_rooms=rooms)}))

    entry = find(targets, 3, "uvicorn-1")
    assert (entry["status"], entry["note"]) == (status, note)


@pytest.mark.parametrize(
    ("data", "status", "note"),
    [
        (idle(kb=35.0, rate=300.0), "met", None),
        (idle(kb=35.01), "missed", "short on KB/conn"),
        (idle(rate=299.9), "missed", "short on connects/s"),
        (idle(connected=1999), "missed", "short on connections"),
        (idle(still_open=1990), "missed", "short on connections"),
    ],
)
def test_idle(data: dict[str, Any], status: str, note: str | None) -> None:
    targets = judge(full_run(**{"daphne-2": config("daphne-2", 450.0, idle=data)}))

    entry = find(targets, 4, "daphne-2")
    assert (entry["status"], entry["note"]) == (status, note)


def test_idle_measured_text() -> None:
    targets = judge(full_run(**{"daphne-2": config("daphne-2", 450.0, idle=idle(rate=263.2))}))

    assert find(targets, 4, "daphne-2")["measured"] == "22.0 KB/conn; 2,000/2,000 at 263/s"


def test_smoke_mode_judges_nothing_but_keeps_the_figures() -> None:
    results = full_run()[:2]
    targets = judge(results, "smoke")

    assert {t["status"] for t in targets} == {"not run"}
    entry = find(targets, 4, "daphne-1")
    assert entry["note"] == "smoke mode: not judged"
    assert entry["measured"] == "22.0 KB/conn; 2,000/2,000 at 350/s"
    assert find(targets, 4, "uvicorn-1")["note"] == "uvicorn-1 not in this run"


def test_print_targets(capsys: pytest.CaptureFixture[str]) -> None:
    targets = judge(
        full_run(
            yardstick=config("yardstick", 1000.0, saturated=False),
            **{"daphne-2": config("daphne-2", 450.0, idle=idle(rate=200.0))},
        )
    )
    bench_run.print_targets(targets, "full")
    lines = capsys.readouterr().out.splitlines()

    assert lines[1].startswith("targets (full mode)")
    assert len(lines) == 2 + len(targets) + 1
    assert lines[-1] == "targets: 15 met, 1 missed, 0 not run (2 judged on a bound, marked ?)"
    uvicorn = next(line for line in lines if "1. uvicorn-1" in line)
    assert uvicorn.split()[0] == "met?"
    assert "<=0.90x (900 / 1,000+)" in uvicorn
    idle_line = next(line for line in lines if "4. daphne-2" in line)
    assert idle_line.split()[0] == "missed"
    assert idle_line.endswith("(short on connects/s)")


def test_print_targets_in_smoke_mode(capsys: pytest.CaptureFixture[str]) -> None:
    bench_run.print_targets(judge(full_run()[:2], "smoke"), "smoke")
    lines = capsys.readouterr().out.splitlines()

    assert "none judged" in lines[1]
    assert lines[-1] == "targets: not judged in smoke mode (16 listed)"
    assert not any(line.split()[0] in ("met", "missed") for line in lines[2:-1])


def test_a_configuration_measured_while_the_host_took_the_cpu_is_flagged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = full_run()
    calm, busy = results[1], results[2]
    for s in calm["scenarios"]["fanout"]["steps"]:
        s["host_steal_pct"] = 2.0
    busy["scenarios"]["fanout"]["steps"][1]["host_steal_pct"] = 52.0
    busy["scenarios"]["idle"]["host_steal_pct"] = 7.5

    rows = bench_run.summarize(results)
    bench_run.print_table(rows, 200)
    out = capsys.readouterr().out

    assert [row["host_steal_pct_max"] for row in rows[:3]] == [None, 2.0, 52.0]
    assert "uvicorn-1: the host took up to 52% of this machine's CPU (steal)" in out
    assert "daphne-1: the host took" not in out


def probed_run(probe_ms: dict[str, float]) -> list[dict[str, Any]]:
    """A good full run whose steps recorded these probe times (bench/probe.py), by config."""
    results = full_run()
    for result in results:
        ms = probe_ms.get(result["config"])
        for s in result["scenarios"]["fanout"]["steps"]:
            s["probe_ms"] = ms
        result["scenarios"]["fanout"]["max_sustained"]["probe_ms"] = ms
    return results


def test_each_figure_is_given_the_speed_of_its_best_step_against_the_runs_fastest() -> None:
    results = probed_run({"yardstick": 1.5, "uvicorn-1": 2.5})
    # A step may fall between two probe samples: it has no figure, and counts for nothing.
    results[0]["scenarios"]["fanout"]["steps"][0]["probe_ms"] = None
    assert bench_run.fastest_probe_ms(results) == 1.5
    rows = {row["config"]: row for row in bench_run.summarize(results)}
    assert rows["yardstick"]["speed_at_max"] == 1.0
    assert rows["uvicorn-1"]["speed_at_max"] == 0.6
    assert rows["uvicorn-1"]["probe_ms_at_max"] == 2.5
    assert rows["daphne-1"]["speed_at_max"] is None


def test_a_figure_measured_on_a_slow_machine_is_flagged_under_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = probed_run({"yardstick": 1.5, "uvicorn-1": 2.5})
    bench_run.print_table(bench_run.summarize(results), 200)
    out = capsys.readouterr().out
    assert "uvicorn-1: its best step ran with the machine at 0.60 of its fastest" in out
    assert "yardstick: its best step ran" not in out
