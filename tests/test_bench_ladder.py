"""The fan-out's ladder of offered rates: up until a rate fails twice, then bisected."""

import math
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from loadgen import Ladder  # noqa: E402  (bench/ is a folder of scripts)

PARAMS = {"start_rate": 100, "factor": 2, "max_rate": 1600, "min_rate": 1, "resolution": 0.1}


def climb(capacity: float, glitches: set[int] = frozenset(), **params) -> tuple[list, Ladder]:
    """Run a ladder against a server that passes every rate up to `capacity`, except the
    steps numbered in `glitches` (counted from 0), which fail whatever their rate."""
    ladder = Ladder({**PARAMS, **params})
    steps = []
    for number in range(50):
        rate = ladder.rate
        ok = rate <= capacity and number not in glitches
        steps.append((rate, ok, ladder.retrying))
        if not ladder.record(ok):
            return steps, ladder
    raise AssertionError("the ladder never ended")


def test_a_rate_fails_only_when_its_second_step_fails_too():
    steps, ladder = climb(capacity=500)
    rates = [rate for rate, _, _ in steps]
    assert rates[:5] == [100, 200, 400, 800, 800]  # 800 failed, and failed again
    assert steps[4] == (800, False, True)
    assert ladder.failed / ladder.passed <= 1.1
    assert ladder.passed <= 500 < ladder.failed


def test_one_disturbed_step_does_not_end_the_climb():
    # The step at 400 fails once, then passes: the climb goes on past it.
    steps, ladder = climb(capacity=1000, glitches={2})
    assert [(rate, ok) for rate, ok, _ in steps[:4]] == [
        (100, True),
        (200, True),
        (400, False),
        (400, True),
    ]
    assert ladder.passed <= 1000 < ladder.failed
    assert ladder.passed > 900


def test_without_confirming_one_failed_step_ends_the_climb():
    steps, ladder = climb(capacity=1000, glitches={2}, confirm_failures=False)
    assert [rate for rate, _, _ in steps[:3]] == [100, 200, 400]
    assert steps[3][0] == math.sqrt(200 * 400)  # bisecting at once, below the glitch
    assert ladder.passed < 400 <= ladder.failed
    assert not any(retry for _, _, retry in steps)


def test_a_server_that_never_fails_is_tried_at_the_ceiling_and_is_not_saturated():
    steps, ladder = climb(capacity=10**6)
    assert [rate for rate, _, _ in steps] == [100, 200, 400, 800, 1600]
    assert ladder.failed is None
