"""The loop's naps under load (rooms/nap.py): as long as the load says, awake in between, and
none once the load falls."""

import asyncio
import math
import threading
import time

from rooms.nap import Napper, doze, wake


class Load:
    """A load a test sets, and the naps a napper took under it (instead of sleeping)."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.slept: list[float] = []

    def __call__(self, now: float) -> float:
        return self.value

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def napper_under(
    load: Load, *, nap: float = 0.004, awake: float = 0.0, work_at: float = math.inf
) -> Napper:
    return Napper(nap=nap, awake=awake, load=load, until=lambda: work_at, sleep=load.sleep)


async def turns(count: int) -> None:
    """Let the loop turn: each nap arms the next one with call_later."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_under_load_the_loop_naps_in_proportion_to_the_load_until_it_falls():
    load = Load(0.5)
    napper = napper_under(load)
    napper.loaded()
    assert napper.napping
    await turns(10)
    assert len(load.slept) >= 2
    assert set(load.slept) == {0.002}

    load.value = 0.0
    taken = len(load.slept)
    await turns(10)
    assert not napper.napping
    assert len(load.slept) == taken


async def test_a_load_past_full_naps_no_longer_than_the_nap():
    load = Load(3.0)
    napper = napper_under(load)
    napper.loaded()
    await turns(3)
    napper.stop()
    assert load.slept and set(load.slept) == {0.004}


async def test_while_the_load_is_light_the_loop_does_not_nap():
    load = Load(0.0)
    napper = napper_under(load)
    napper.loaded()
    await turns(5)
    assert not napper.napping
    assert load.slept == []


async def test_work_under_load_while_napping_starts_no_second_round_of_naps():
    load = Load(1.0)
    napper = napper_under(load, awake=3600.0)
    napper.loaded()
    napper.loaded()
    await turns(5)
    napper.loaded()
    await turns(5)
    napper.stop()
    assert load.slept == [0.004]


async def test_a_napper_without_a_nap_never_sleeps():
    load = Load(1.0)
    napper = napper_under(load, nap=0.0)
    napper.loaded()
    await turns(5)
    assert not napper.napping
    assert load.slept == []


async def test_stopping_cancels_the_next_nap():
    load = Load(1.0)
    napper = napper_under(load, awake=0.0)
    napper.loaded()
    napper.stop()
    await turns(5)
    assert not napper.napping
    assert load.slept == []


async def test_a_nap_ends_before_the_work_that_is_due_and_is_not_taken_when_it_is_due_now():
    load = Load(1.0)
    soon = asyncio.get_running_loop().time() + 0.001
    napper = napper_under(load, awake=3600.0, work_at=soon)
    napper.loaded()
    await turns(3)
    napper.stop()
    assert len(load.slept) == 1
    assert 0.0005 <= load.slept[0] <= 0.001

    load.slept.clear()
    napper = napper_under(load, awake=3600.0, work_at=-math.inf)
    napper.loaded()
    await turns(3)
    assert napper.napping  # it still naps once the work is done
    napper.stop()
    assert load.slept == []


def test_a_wake_from_another_thread_ends_the_nap_at_once():
    waker = threading.Timer(0.05, wake)
    started = time.monotonic()
    waker.start()
    doze(30.0)
    waker.join()
    assert time.monotonic() - started < 10.0


def test_a_wake_while_awake_skips_the_next_nap_instead_of_being_lost():
    wake()
    started = time.monotonic()
    doze(30.0)
    assert time.monotonic() - started < 10.0
