"""Fan-out rounds in bench/run.py: a configuration climbs the ladder more than once and its
figure is the best round's, with every round's steps still judged (no servers)."""

from typing import Any

from tests.test_bench_targets import (
    bench_run,
    config,
    fanout,
    find,
    full_run,
    judge,
    ladder,
    step,
)


def later(steps: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """What bench_config returns for a later round: the fan-out alone."""
    return {
        "config": "x",
        "status": "ok",
        "wall_s": 40.0,
        "scenarios": {"fanout": fanout(steps)},
        **top,
    }


def test_the_best_round_gives_the_figure_and_every_step_is_kept() -> None:
    result = config("uvicorn-1", 500.0)
    first_steps = len(result["scenarios"]["fanout"]["steps"])
    bench_run.add_round(result, later(ladder(900.0)), 2)

    f = result["scenarios"]["fanout"]
    assert f["max_sustained"]["deliveries_per_s"] == 900.0
    assert f["max_sustained"]["round"] == 2
    assert len(f["steps"]) == first_steps + 4
    assert [s["round"] for s in f["steps"]] == [1] * first_steps + [2] * 4
    assert [r["max_deliveries_per_s"] for r in f["rounds"]] == [500.0, 900.0]
    assert bench_run.summarize([result])[0]["round_figures"] == [500.0, 900.0]


def test_a_worse_later_round_leaves_the_figure() -> None:
    result = config("uvicorn-1", 900.0)
    bench_run.add_round(result, later(ladder(300.0)), 2)

    f = result["scenarios"]["fanout"]
    assert f["max_sustained"]["deliveries_per_s"] == 900.0
    assert f["max_sustained"]["round"] == 1
    assert f["saturated"] is True


def test_a_loss_in_any_round_misses_the_no_loss_target() -> None:
    result = config("daphne-2", 500.0)
    bench_run.add_round(result, later([step(10), step(20, missing=2), step(80, ok=False)]), 2)
    targets = judge(full_run(**{"daphne-2": result}))

    entry = find(targets, 5, "daphne-2")
    assert entry["status"] == "missed"
    assert "(2 missing)" in entry["measured"]


def in_rounds(name: str, *tops: float) -> dict[str, Any]:
    """A configuration whose fan-out ran one round per figure in `tops`."""
    result = config(name, tops[0])
    for number, top in enumerate(tops[1:], start=2):
        bench_run.add_round(result, later(ladder(top)), number)
    return result


def test_ratios_compare_the_rounds_side_by_side_and_take_their_median() -> None:
    # Round 2 fell in a slow spell for both: best against best would say 0.90x.
    yard = in_rounds("yardstick", 1000.0, 600.0, 1000.0)
    uvi = in_rounds("uvicorn-1", 800.0, 500.0, 900.0)
    targets = judge(full_run(yardstick=yard, **{"uvicorn-1": uvi, "uvicorn-2": uvi}))

    entry = find(targets, 1, "uvicorn-1")
    assert entry["status"] == "met"
    assert entry["measured"] == "0.83x (median of rounds 0.80, 0.83, 0.90)"
    assert bench_run.summarize([yard, uvi])[1]["vs_yardstick"] == 0.9  # the figures' own


def test_one_lucky_round_does_not_carry_a_ratio() -> None:
    uvi = in_rounds("uvicorn-1", 1000.0, 1000.0, 1400.0)
    two = in_rounds("uvicorn-2", 900.0, 850.0, 900.0)
    targets = judge(
        full_run(
            yardstick=in_rounds("yardstick", 1000.0, 1000.0, 1000.0),
            **{"uvicorn-1": uvi, "uvicorn-2": two},
        )
    )

    # Best against best: 900 / 1400 = 0.64x. Round by round: 0.90, 0.85, 0.64.
    entry = find(targets, 2, "uvicorn-2")
    assert entry["status"] == "met"
    assert entry["measured"] == "0.85x (median of rounds 0.90, 0.85, 0.64)"


def test_a_round_the_reference_has_no_figure_for_is_left_out() -> None:
    yard = in_rounds("yardstick", 1000.0, 1000.0)
    yard["scenarios"]["fanout"]["rounds"][1]["max_deliveries_per_s"] = None
    uvi = in_rounds("uvicorn-1", 900.0, 100.0)
    targets = judge(full_run(yardstick=yard, **{"uvicorn-1": uvi, "uvicorn-2": uvi}))

    assert find(targets, 1, "uvicorn-1")["measured"] == "0.90x (900 / 1,000)"


def test_a_failed_later_round_keeps_the_figures_but_is_reported() -> None:
    result = config("daphne-1", 500.0)
    died = {
        "config": "daphne-1",
        "status": "error",
        "error": "server died: exit 1",
        "scenarios": {},
    }
    bench_run.add_round(result, died, 2)

    assert result["status"] == "error"
    assert result["scenarios"]["fanout"]["max_sustained"]["deliveries_per_s"] == 500.0
    row = bench_run.summarize([result])[0]
    assert "fanout round 2: server died: exit 1" in row["problems"]


def test_a_later_round_starts_at_half_the_rate_sustained() -> None:
    params = {"fanout": {"start_rate": 20, "factor": 2, "budget_s": 120}, "idle": {}}
    f = fanout([step(2000), step(4000), step(8000, ok=False)])

    p = bench_run.later_round_params(params, f, 75)
    assert p == {"fanout": {"start_rate": 2000.0, "factor": 2, "budget_s": 75}}
    assert params["fanout"]["start_rate"] == 20  # the first round's are untouched
    # Nothing sustained yet: the usual start.
    assert (
        bench_run.later_round_params(params, fanout([step(20, ok=False)]), 75)["fanout"][
            "start_rate"
        ]
        == 20
    )


def test_only_a_fanout_that_ran_gets_another_round() -> None:
    assert bench_run.wants_another_round(config("daphne-1", 500.0))
    assert not bench_run.wants_another_round({"config": "daphne-1", "status": "skipped"})
    errored = config("daphne-1", 500.0, fanout={"error": "RuntimeError: no room"})
    assert not bench_run.wants_another_round(errored)
