"""Under load, the event loop naps: it sleeps a few milliseconds at a time, then takes in one
go what arrived meanwhile.

Left alone, a process under load wakes for nearly every frame a client sends: the kernel wakes
it, the caches that the last wake-up warmed are cold again, and it handles one or two posts
before it sleeps in the poll once more. On a machine whose processes share few cores (the
server, its database and cache, other workers) those wake-ups cost more than the frames: and a
room spread over two processes wakes both of them for its posts, which is what made two
processes cost a fifth to a half more per delivery than one. Napping bounds the wake-ups by
the clock instead of by the clients.

What it costs is latency, and only under load: a frame that arrives during a nap waits for its
end, where the batch interval (rooms/hub.py, `Pace`) already adds tens of milliseconds. The
nap follows the load as the interval does: none while messages come slowly, all of it once
the interval is fully stretched. It never runs into the process's own work: the caller says
when that is next due (`until`: replies to write, the next batch, a write to the sockets),
and a nap ends before it or is not taken; a call on the database thread ends a nap as soon as
it returns (`wake`), so that a batch's commit is answered at once. Between naps the loop stays
awake for `awake` seconds, so that what the last nap held up runs before the next one.

Sleeping blocks the loop on purpose: asyncio has no way to make its poll wait a minimum time
(uvloop no more than the selector loop), and a blocking sleep is what that would do. The
process's database thread runs on meanwhile.
"""

import asyncio
import threading
from collections.abc import Callable

# A nap shorter than this saves less than the wake-up it replaces.
SHORTEST_NAP = 0.0005

# Set by `wake` from another thread of the process to end the loop's nap early.
_woken = threading.Event()


def wake() -> None:
    """End the loop's current nap, if it is taking one (safe from any thread)."""
    _woken.set()


def doze(seconds: float) -> None:
    """Sleep for `seconds`, or until `wake` is called."""
    # Cleared after, not before: a wake that came while the loop was awake skips the next nap
    # rather than being lost.
    _woken.wait(seconds)
    _woken.clear()


class Napper:
    def __init__(
        self,
        *,
        nap: float,
        awake: float,
        load: Callable[[float], float],
        until: Callable[[], float],
        sleep: Callable[[float], None] = doze,
    ) -> None:
        self.nap = nap
        self.awake = awake
        # How loaded the process is at a time of the loop's clock: 0 (light) to 1 (full).
        self._load = load
        # When, on the loop's clock, the process next has work of its own to do.
        self._until = until
        self.doze = sleep
        self._handle: asyncio.Handle | None = None
        self.naps = 0

    @property
    def napping(self) -> bool:
        """Whether the loop takes naps now (until the load falls)."""
        return self._handle is not None

    def loaded(self) -> None:
        """The process has work under load: start napping, if it is not already."""
        if self._handle is not None or self.nap <= 0:
            return
        loop = asyncio.get_running_loop()
        if self._load(loop.time()) > 0:
            self._handle = loop.call_soon(self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        loop = asyncio.get_running_loop()
        load = min(1.0, self._load(loop.time()))
        if load <= 0:
            self._handle = None
            return
        nap = min(self.nap * load, self._until() - loop.time())
        if nap >= SHORTEST_NAP:
            self.naps += 1
            self.doze(nap)
        self._handle = loop.call_later(self.awake, self._run)
