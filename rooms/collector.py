"""Garbage collection paced for a server holding many long-lived connections.

CPython's full collection walks every tracked object with the event loop stopped, and it runs
whenever the objects that survived since the last one exceed a quarter of those that survived
it. Each connection keeps about fifty tracked objects (mostly the server's and asyncio's), so
while connections pile up - a reconnect storm after a deploy - full collections come at every
quarter of growth and each walks all of them: measured at 2,000 connections, 190 ms with every
socket of the process waiting; at 10,000 it would be about a second.

Almost none of a connection is cyclic garbage when it closes: reference counting frees it.
So what has lived a while is frozen out of the collector's way (`gc.freeze` only moves a list
head), and full collections walk only what arrived since. The price is a cycle that was frozen
while alive and dies later: it stays until the next `full` collection, which unfreezes and
collects everything once per `full_every` seconds, at a time of this process's choosing and
logged. Measured after 2,000 connections came and went under frequent freezing: about one
object per connection was left for it (the HTTP half of a handshake caught mid-upgrade).
"""

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class CollectorPacer:
    def __init__(
        self,
        *,
        freeze_at: int,
        full_every: float,
        check_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Freeze once the oldest generation holds this many objects (0: never freeze).
        self.freeze_at = freeze_at
        self.full_every = full_every
        self.check_every = check_every
        self._clock = clock
        self._full_at = clock()
        self._frozen_since_full = False
        self._handle: asyncio.TimerHandle | None = None
        self.freezes = 0
        self.fulls = 0

    def start(self) -> None:
        """Check on the running loop every `check_every` seconds until `stop`."""
        if self.freeze_at > 0 and self._handle is None:
            self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self.check_every, self._run)

    def _run(self) -> None:
        try:
            self.check()
        finally:
            self._schedule()

    def check(self) -> None:
        """Freeze the long-lived objects if there are enough of them; collect everything
        once `full_every` has passed since the last full collection, if something was frozen
        since (otherwise the collector's own full collections saw everything)."""
        # Listing the oldest generation costs as much as its size, which freezing keeps small.
        if self.freeze_at > 0 and len(gc.get_objects(generation=2)) >= self.freeze_at:
            gc.freeze()
            self.freezes += 1
            self._frozen_since_full = True
        if self._frozen_since_full and self._clock() - self._full_at >= self.full_every:
            self.full()

    def full(self) -> None:
        """Collect everything, frozen or not, then freeze what survives."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        took = time.perf_counter() - started
        self._full_at = self._clock()
        self._frozen_since_full = False
        self.fulls += 1
        log.info(
            "full garbage collection: %d unreachable objects freed, %d kept, in %.0f ms",
            freed,
            gc.get_freeze_count(),
            took * 1000,
        )
