"""Adjustments to the ASGI servers the chat runs under, applied when the app is loaded."""

import functools
import sys
from collections.abc import Callable
from typing import Any


def patch_daphne_close_codes() -> None:
    """Let the application close sockets with the codes RFC 6455 reserves for servers.

    daphne closes through autobahn's public `sendClose`, which accepts only 1000 and 3000-4999,
    so `websocket.close` with 1001 (shutdown), 1003 (binary frame), 1008 (flooding), 1009
    (too big) or 1013 (try again later) raises inside daphne and the client sees 1011 instead.
    `sendCloseFrame` is the same close handshake without that client-side rule.
    """
    ws_protocol = sys.modules.get("daphne.ws_protocol")
    if ws_protocol is None or getattr(ws_protocol, "_chat_close_codes", False):
        return

    def server_close(self, code=None):
        self.sendCloseFrame(code=1000 if code is None else code, isReply=False)

    ws_protocol.WebSocketProtocol.serverClose = server_close
    ws_protocol._chat_close_codes = True


def backlog_gauge(send: Any, limit: int) -> Callable[[], int] | None:
    """A function that tells how many bytes wait unsent on the socket behind `send`.

    A client that stops reading makes that number grow; the hub disconnects it past `limit`
    instead of buffering without bound or stalling the room. ASGI has no way to ask this, so
    it is read from the transport of the two servers the chat runs under; None elsewhere.
    """
    owner = getattr(send, "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is not None and hasattr(transport, "get_write_buffer_size"):
        # uvicorn: its send() blocks while the transport is paused above the high-water mark,
        # which would stall the whole room behind one reader. Pause only well past the limit
        # at which the hub gives up on the reader.
        transport.set_write_buffer_limits(high=4 * limit)
        return transport.get_write_buffer_size
    if isinstance(send, functools.partial) and send.args:
        # daphne: send is handle_reply bound to the connection's protocol; Twisted's transport
        # never blocks a write and keeps what it could not send yet in these buffers.
        twisted_transport = getattr(send.args[0], "transport", None)
        if twisted_transport is not None and hasattr(twisted_transport, "_tempDataLen"):
            return lambda: (
                len(twisted_transport.dataBuffer)
                - twisted_transport.offset
                + twisted_transport._tempDataLen
            )
    return None
