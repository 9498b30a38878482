"""The database thread of a server process: every database call of the chat runs here.

One thread, as channels' `database_sync_to_async` gives: Django's connections belong to the
thread that opened them, so one thread keeps one connection per process warm, and SQLite sees
one writer from the chat. The hop costs the event loop a third of what
`database_sync_to_async` does (asgiref copies the context and wraps each call in a task and a
shield), and every connect, room switch, disconnect and batch of messages makes one.

The connection hygiene is the same: connections that broke or outlived `CONN_MAX_AGE` are
closed before and after every call.
"""

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import close_old_connections

from rooms import nap

P = ParamSpec("P")
T = TypeVar("T")

# Its one thread starts with the first call.
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-db")


def _hygienic(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()
        # The loop may be napping under load (rooms/nap.py): the caller is waiting for this.
        nap.wake()


async def run(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `fn` on the database thread and return what it returns (or raise what it raises).

    Cancelling the caller does not stop a call that has started; one still waiting for the
    thread when the cancellation reaches it (on the event loop's next turn) is not made.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, _hygienic, fn, args, kwargs)
