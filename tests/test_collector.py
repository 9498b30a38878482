import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from rooms.collector import CollectorPacer


class Node:
    """Something the garbage collector tracks, that can hold a cycle."""

    other: "Node | None" = None


@pytest.fixture(autouse=True)
def nothing_frozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_long_lived_objects_are_frozen_once_enough_accumulate() -> None:
    gc.collect()  # everything that survives lands in the oldest generation
    assert len(gc.get_objects(generation=2)) >= 1000
    pacer = CollectorPacer(freeze_at=1000, full_every=3600)

    pacer.check()

    assert pacer.freezes == 1
    assert gc.get_freeze_count() >= 1000
    assert len(gc.get_objects(generation=2)) < 1000


def test_nothing_is_frozen_below_the_threshold() -> None:
    gc.collect()
    gc.freeze()
    pacer = CollectorPacer(freeze_at=1_000_000, full_every=3600)
    frozen = gc.get_freeze_count()

    pacer.check()

    assert pacer.freezes == 0
    assert gc.get_freeze_count() == frozen


def test_a_cycle_frozen_while_alive_is_freed_by_the_next_full_collection() -> None:
    clock = Clock()
    pacer = CollectorPacer(freeze_at=1, full_every=60, clock=clock)
    node = Node()
    node.other = node
    alive = weakref.ref(node)
    gc.collect()

    pacer.check()
    del node
    gc.collect()
    # The price of freezing: the collector no longer looks at it.
    assert alive() is not None

    clock.now = 59
    pacer.check()
    assert alive() is not None
    assert pacer.fulls == 0

    clock.now = 60
    pacer.check()
    assert alive() is None
    assert pacer.fulls == 1
    # What survived the full collection is frozen again.
    assert gc.get_freeze_count() > 0


def test_no_full_collection_unless_something_was_frozen_since_the_last() -> None:
    clock = Clock()
    pacer = CollectorPacer(freeze_at=1_000_000, full_every=60, clock=clock)

    clock.now = 3600
    pacer.check()

    assert pacer.fulls == 0


async def test_the_pacer_checks_on_the_running_loop_until_stopped() -> None:
    pacer = CollectorPacer(freeze_at=1, full_every=3600, check_every=0.001)
    checks: list[None] = []
    checked = asyncio.Event()

    def check() -> None:
        checks.append(None)
        if len(checks) == 2:
            checked.set()

    pacer.check = check  # type: ignore[method-assign]
    pacer.start()
    await asyncio.wait_for(checked.wait(), timeout=5)
    pacer.stop()
    assert len(checks) >= 2
    assert pacer._handle is None


def test_a_pacer_that_never_freezes_is_not_started() -> None:
    pacer = CollectorPacer(freeze_at=0, full_every=3600)

    pacer.start()  # no running loop needed: it does nothing

    assert pacer._handle is None
