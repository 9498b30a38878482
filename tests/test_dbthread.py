import asyncio
import threading
import time

import pytest

from rooms import dbthread, nap

# Every call closes the thread's stale connections, which touches the database thread's
# connection once another test has opened it.
pytestmark = pytest.mark.django_db


def where() -> int:
    return threading.get_ident()


async def test_every_call_runs_on_one_thread_off_the_event_loop():
    threads = {await dbthread.run(where) for _ in range(5)}
    assert len(threads) == 1
    assert threads != {threading.get_ident()}


async def test_arguments_go_through_and_results_and_errors_come_back():
    assert await dbthread.run(divmod, 17, 5) == (3, 2)
    assert await dbthread.run(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    with pytest.raises(ZeroDivisionError):
        await dbthread.run(divmod, 1, 0)


async def test_stale_connections_are_closed_before_and_after_every_call(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(dbthread, "close_old_connections", lambda: events.append("hygiene"))

    def fails() -> None:
        events.append("call")
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError):
        await dbthread.run(fails)
    assert events == ["hygiene", "call", "hygiene"]


async def test_a_call_cancelled_while_it_waits_for_the_thread_is_never_made():
    release = threading.Event()
    made: list[str] = []

    def busy() -> None:
        release.wait(10)
        made.append("busy")

    first = asyncio.ensure_future(dbthread.run(busy))
    waiting = asyncio.ensure_future(dbthread.run(made.append, "waiting"))
    await asyncio.sleep(0)  # both are queued for the thread
    waiting.cancel()
    # The cancel reaches the thread's queue on the loop's next turn; until the caller has seen
    # it, the thread could still take the call.
    await asyncio.wait({waiting})
    release.set()
    await first
    assert await dbthread.run(made.append, "after") is None
    assert made == ["busy", "after"]
    assert waiting.cancelled()


async def test_a_call_that_returns_ends_the_loops_nap_so_its_caller_hears_at_once():
    release = threading.Event()
    call = asyncio.ensure_future(dbthread.run(release.wait, 10))
    await asyncio.sleep(0)  # the call is with the thread
    threading.Timer(0.05, release.set).start()
    started = time.monotonic()
    nap.doze(30.0)  # as the loop naps under load, blocking it
    assert time.monotonic() - started < 10.0
    assert await call is True
