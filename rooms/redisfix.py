"""A correction to redis-py, applied when the app is loaded, for as long as it is needed."""

import inspect
import logging
from typing import Any

_EAGER = '"Push response: " + str(response)'
_push_log = logging.getLogger("push_response")


def patch_redis_push_debug_log() -> list[str]:
    """Stop redis-py formatting every pub/sub message it receives for a debug line that is
    not written; returns the parsers it corrected.

    Its parsers log `"Push response: " + str(response)`: the string is built before the log
    call decides to drop it, so each message that reaches a process through the Redis layer
    is turned into its printable form first - a copy of the whole layer message, escaped
    byte by byte, and about one per cent of a process's time under load here. redis-py
    fixed it (redis/redis-py#4231) after the release the chat pins; a parser whose source
    no longer holds the eager form is left alone.
    """
    try:
        from redis._parsers import hiredis, resp3
    except ImportError:
        return []
    patched = []
    for parser in (hiredis._AsyncHiredisParser, resp3._AsyncRESP3Parser):
        method = parser.__dict__.get("handle_pubsub_push_response")
        if method is None or not _is_eager(method):
            continue
        parser.handle_pubsub_push_response = _handle_pubsub_push_response
        patched.append(parser.__name__)
    return patched


def _is_eager(method: Any) -> bool:
    try:
        return _EAGER in inspect.getsource(method)
    except (OSError, TypeError):
        return False


async def _handle_pubsub_push_response(self: Any, response: Any) -> Any:
    _push_log.debug("Push response: %s", response)
    return response
