"""A lean WebSocket client (RFC 6455) built on asyncio.Protocol.

The load generator has to receive tens of thousands of frames per second on one
core, so this client does only what it needs: the upgrade handshake, parsing of
unmasked server frames (including frames split across reads and fragmented
messages), masked text/close/pong frames towards the server, and nothing else.
Subclasses override ``on_text`` to consume text messages.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from time import monotonic_ns
from typing import Any, TypeVar, cast

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
MAX_HEADER = 16384


class HandshakeError(Exception):
    pass


def _mask(key: bytes, payload: bytes) -> bytes:
    # XOR through big ints runs in C and is far cheaper than a per-byte loop.
    n = len(payload)
    if not n:
        return payload
    keystream = (key * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")
    return value.to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A single final client frame (masked, as RFC 6455 requires)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    key = os.urandom(4)
    return header + key + _mask(key, payload)


def frame_bounds(data: bytes, pos: int, n: int) -> tuple[int, int] | None:
    """Where the payload of the unmasked frame at `pos` starts and where the frame ends, or
    None if the first `n` bytes of `data` do not hold all of it yet."""
    if n - pos < 2:
        return None
    length = data[pos + 1] & 0x7F
    if length < 126:
        start = pos + 2
    elif length == 126:
        if n - pos < 4:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        start = pos + 4
    else:
        if n - pos < 10:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        start = pos + 10
    end = start + length
    return (start, end) if end <= n else None


class WSClient(asyncio.Protocol):
    """Client protocol; create with ``connect()``."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int | None] = loop.create_future()
        self.close_code: int | None = None
        self._handshaking = True
        self._key = base64.b64encode(os.urandom(16))
        self._buf = b""
        self._frag_op = 0
        self._frags: list[bytes] = []

    # -- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport is not an asyncio.Transport subclass, hence no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        hostport = f"{self.host}:{self.port}"
        request = (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {hostport}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Origin: http://{hostport}\r\n"
            "\r\n"
        )
        self.transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)
        self.on_closed()

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEADER:
                    self._fail_handshake(data[:200])
                else:
                    self._buf = data
                return
            if not self._check_handshake(data[:end]):
                return
            data = data[end + 4 :]
        now = monotonic_ns()  # one clock read per read(): frames in it arrived together
        pos, n = 0, len(data)
        while (bounds := frame_bounds(data, pos, n)) is not None:
            b0 = data[pos]
            start, end = bounds
            pos = end
            if b0 == 0x81:  # the common case: one final text frame
                self.on_text(data[start:end], now)
            else:
                self._other_frame(b0, data[start:end], now)
        if pos < n:
            self._buf = data[pos:]

    # -- internals --------------------------------------------------------------
    def _check_handshake(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        if len(lines[0].split()) < 2 or lines[0].split()[1] != b"101":
            self._fail_handshake(head)
            return False
        accept = base64.b64encode(hashlib.sha1(self._key + WS_GUID).digest())
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"sec-websocket-accept") != accept:
            self._fail_handshake(head)
            return False
        self._handshaking = False
        if not self.opened.done():
            self.opened.set_result(None)
        return True

    def _fail_handshake(self, head: bytes) -> None:
        status = head.split(b"\r\n", 1)[0].decode("latin1", "replace")
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(f"upgrade refused: {status!r}"))
        if self.transport is not None:
            self.transport.close()

    def _other_frame(self, b0: int, payload: bytes, now: int) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode == OP_PING:
            self._write(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            self._write(OP_CLOSE, payload[:2])
            if self.transport is not None:
                self.transport.close()
        elif opcode in (OP_TEXT, OP_BINARY):
            if fin:
                if opcode == OP_TEXT:
                    self.on_text(payload, now)
            else:
                self._frag_op = opcode
                self._frags = [payload]
        elif opcode == OP_CONT:
            self._frags.append(payload)
            if fin:
                message = b"".join(self._frags)
                self._frags = []
                if self._frag_op == OP_TEXT:
                    self.on_text(message, now)

    def _write(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(encode_frame(opcode, payload))

    # -- public API -------------------------------------------------------------
    def send_text(self, text: str) -> None:
        self._write(OP_TEXT, text.encode())

    def close(self, code: int = 1000) -> None:
        """Send a close frame and let the transport flush and close."""
        self._write(OP_CLOSE, code.to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def on_text(self, payload: bytes, now_ns: int) -> None:
        """Called for every complete text message (payload is UTF-8 bytes)."""

    def on_closed(self) -> None:
        """Called once the connection is gone."""


T = TypeVar("T", bound=WSClient)


async def connect(
    factory: type[T],
    host: str,
    port: int,
    path: str,
    timeout: float = 10.0,
    **kwargs: Any,
) -> T:
    """Open a TCP connection, perform the upgrade and return the protocol instance."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: factory(host, port, path, **kwargs), host, port),
        timeout,
    )
    try:
        await asyncio.wait_for(proto.opened, timeout)
    except BaseException:
        proto.abort()
        raise
    return proto
