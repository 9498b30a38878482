"""Adjustments to the ASGI servers the chat runs under, applied when the app is loaded."""

import functools
import logging
import struct
import sys
from collections.abc import Callable
from typing import Any

from rooms.protocol import CLOSE_ABNORMAL, CLOSE_NO_STATUS

log = logging.getLogger(__name__)
_compression_reported = False


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


def patch_autobahn_debug_args() -> None:
    """Stop autobahn pretty-printing its configuration for every new connection.

    Each connection made passes `pformat(...)` of its ~30 settings to a debug log call; the
    call is a no-op unless debug logging is on, but the argument is built regardless: about
    0.2 ms per connection, some 5% of what daphne spends accepting one. The text is now
    formatted only if the log line is actually written.
    """
    module = sys.modules.get("autobahn.websocket.protocol")
    if module is None or getattr(module, "_chat_lazy_pformat", False):
        return
    pformat = module.pformat

    class Pretty:
        __slots__ = ("value",)

        def __init__(self, value: Any, *args: Any, **kwargs: Any) -> None:
            self.value = value

        def __str__(self) -> str:
            return pformat(self.value)

        __repr__ = __str__

    def timings_text(self: Any) -> str:
        # The one caller that returns the text rather than logging it.
        return pformat(self._timings)

    module.pformat = Pretty
    module.Timings.__str__ = timings_text
    module._chat_lazy_pformat = True


# ASGI hides the connection behind `send`; the adapters below reach it in the two servers the
# chat runs under. Anywhere else they return None and the chat uses plain ASGI.


def _uvicorn_protocol(send: Any) -> Any | None:
    """uvicorn's connection protocol: its ASGI send is a bound method of it."""
    return getattr(send, "__self__", None)


def _daphne_protocol(send: Any) -> Any | None:
    """daphne's connection protocol: its ASGI send is handle_reply partially applied to it."""
    if isinstance(send, functools.partial) and send.args:
        return send.args[0]
    return None


def backlog_gauge(send: Any, limit: int) -> Callable[[], int] | None:
    """A function that tells how many bytes wait unsent on the socket behind `send`.

    A client that stops reading makes that number grow; the hub disconnects it past `limit`
    instead of buffering without bound or stalling the room. ASGI has no way to ask this, so
    it is read from the transport of the two servers the chat runs under; None elsewhere.
    """
    transport = getattr(_uvicorn_protocol(send), "transport", None)
    if transport is not None and hasattr(transport, "get_write_buffer_size"):
        # uvicorn: its send() blocks while the transport is paused above the high-water mark,
        # which would stall the whole room behind one reader. Pause only well past the limit
        # at which the hub gives up on the reader.
        transport.set_write_buffer_limits(high=4 * limit)
        return transport.get_write_buffer_size
    twisted_transport = getattr(_daphne_protocol(send), "transport", None)
    if twisted_transport is not None and hasattr(twisted_transport, "_tempDataLen"):
        # daphne: Twisted never blocks a write and keeps what it could not send itself.
        return lambda: _twisted_unsent(twisted_transport)
    return None


def _twisted_unsent(transport: Any) -> int:
    """Bytes a Twisted transport holds that the socket has not taken yet: the rest of the
    buffer it is sending, and what was written since."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked WebSocket text frame (RFC 6455 section 5.2), as a server sends.

    A server's frames carry no mask, so the same bytes are valid on every connection that
    negotiated no extension: a broadcast is framed once, not once per recipient.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def frame_writer(send: Any) -> Callable[[bytes], bool] | None:
    """A function that writes a ready-made frame straight to the socket behind `send`, and
    says whether it could; None where that is not known to be equivalent to ASGI's send.

    ASGI has no broadcast: each server re-encodes and re-frames the same text for every
    recipient, which profiles showed is most of the fan-out cost (websockets' framing under
    uvicorn; autobahn's framing and per-frame debug-log arguments under daphne). Writing the
    shared frame to the transport skips that. The writer declines (and the caller falls back
    to `send`) whenever the connection is not plainly open: closing, closed, or a compression
    extension negotiated, which makes frames differ per connection. Frames are written whole
    and in call order, the same order the server's own sends use, so they never interleave.
    """
    owner = _uvicorn_protocol(send)
    if type(owner).__name__ == "WebSocketsSansIOProtocol":
        return _uvicorn_writer(owner)
    protocol = _daphne_protocol(send)
    if hasattr(protocol, "_perMessageCompress") and hasattr(protocol, "send_queue"):
        return _daphne_writer(protocol)
    return None


def _uvicorn_writer(protocol: Any) -> Callable[[bytes], bool] | None:
    from websockets.protocol import State

    connection = protocol.conn
    if connection.extensions:
        _report_compression(connection.extensions)
        return None
    transport = protocol.transport
    opened = State.OPEN

    def write(frame: bytes) -> bool:
        if protocol.close_sent or connection.state is not opened or transport.is_closing():
            return False
        transport.write(frame)
        return True

    return write


def _report_compression(extensions: list[Any]) -> None:
    """Say once per process that uvicorn compresses, and what it costs."""
    global _compression_reported
    if _compression_reported:
        return
    _compression_reported = True
    log.warning(
        "a connection negotiated %s: each such connection holds its own compressor (about "
        "100 KB) and every broadcast is compressed once per recipient; run uvicorn with "
        "--ws-per-message-deflate false (bin/serve does) to share one frame among recipients",
        ", ".join(getattr(extension, "name", type(extension).__name__) for extension in extensions),
    )


def _daphne_writer(protocol: Any) -> Callable[[bytes], bool] | None:
    if protocol._perMessageCompress is not None:
        return None
    opened = protocol.STATE_OPEN
    queue = protocol.send_queue
    plain_tcp = getattr(sys.modules.get("twisted.internet.tcp"), "Server", None)

    def write(frame: bytes) -> bool:
        # autobahn writes straight to the transport unless its own queue holds something;
        # then a direct write would overtake it.
        transport = protocol.transport
        if protocol.state != opened or queue or transport is None:
            return False
        if type(transport) is plain_tcp:
            _send_now(transport, frame)
        else:
            transport.write(frame)
        return True

    return write


def _send_now(transport: Any, frame: bytes) -> None:
    """Write to a plain Twisted TCP connection the way asyncio's transports do: try the
    socket at once, and leave only what it did not take to Twisted's buffer.

    Twisted's own write always buffers, asks the reactor to watch the socket for
    writability, sends on the next turn, then stops watching: two epoll_ctl calls and a
    loop turn for every write, about a fifth of daphne's main thread when 2,000 clients
    connect. Sending directly is only equivalent while Twisted holds nothing unsent for
    this connection (or the frame would overtake it) and the connection is plain TCP,
    open for writing.
    """
    if (
        transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnecting
        or _twisted_unsent(transport)
    ):
        transport.write(frame)
        return
    try:
        sent = transport.socket.send(frame)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # A broken connection: Twisted finds it on its own write and reports it as usual.
        sent = 0
    if sent < len(frame):
        transport.write(frame[sent:])


def dropped_without_close(send: Any, code: int | None) -> bool:
    """Whether the client went away without a close frame (a killed client, a lost network).

    daphne reports such a drop as 1006. uvicorn's websockets-sansio reports 1005, the code it
    also uses for a close frame that carries no code, so there the protocol object decides:
    it knows whether a close frame arrived.
    """
    if code == CLOSE_ABNORMAL:
        return True
    connection = getattr(_uvicorn_protocol(send), "conn", None)
    if code == CLOSE_NO_STATUS and connection is not None and hasattr(connection, "close_rcvd"):
        return connection.close_rcvd is None
    return False


def aborter(send: Any) -> Callable[[], None] | None:
    """A function that drops the connection behind `send` at once, unsent data and all.

    For a reader that stopped reading: a polite close waits to flush a buffer that never
    drains (uvicorn closes its transport that way after the close timeout).
    """
    transport = getattr(_uvicorn_protocol(send), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        return transport.abort
    twisted_transport = getattr(_daphne_protocol(send), "transport", None)
    if twisted_transport is not None and hasattr(twisted_transport, "abortConnection"):
        return twisted_transport.abortConnection
    return None
