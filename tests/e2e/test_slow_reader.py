"""A reader that stops reading is disconnected after a bounded backlog; its room is unaffected."""

import asyncio
import base64
import json
import os
import socket
from contextlib import AsyncExitStack

import pytest

from tests.e2e.client import Peer, join_chat
from tests.e2e.faults import http_get

pytestmark = pytest.mark.e2e

BACKLOG = 64 * 1024
# Comfortably more than the kernel buffers in between hold (up to 4 MiB on the sending side),
# so the backlog builds up in the server itself.
MESSAGES = 4000
# Each one different and random: under permessage-deflate a repeated text would shrink to a
# few bytes, and the backlog would never build up.
TEXTS = [base64.b64encode(os.urandom(1500)).decode() for _ in range(MESSAGES)]
SLOW_READER_ENV = {
    "CHAT_SEND_BACKLOG_BYTES": str(BACKLOG),
    "CHAT_RATE_PER_SEC": "100000",
    "CHAT_RATE_BURST": "100000",
}


def tiny_receive_buffer(port: int) -> socket.socket:
    """A socket whose kernel receive buffer is small, so a reader that stops reading backs
    the server up after kilobytes rather than megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def open_compressed_and_stall(port: int) -> tuple[socket.socket, bytes]:
    """Open /chat offering permessage-deflate, as browsers do, and never read again; the
    socket and the server's handshake response."""
    sock = tiny_receive_buffer(port)
    sock.setblocking(True)
    sock.settimeout(10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1024)
        assert chunk, f"the server closed during the handshake: {response!r}"
        response += chunk
    return sock, response.partition(b"\r\n\r\n")[0]


async def flood_and_read(writer: Peer, reader: Peer) -> tuple[int, list[dict]]:
    """The writer posts MESSAGES (reading its acks); the reader reads every one of them and
    the `left` frames that come with them."""

    async def post_all() -> None:
        async def send() -> None:
            for text in TEXTS:
                await writer.send({"action": "chat_message", "message": text})

        async def count_acks() -> None:
            acks = 0
            while acks < MESSAGES:
                frame = await writer.recv()
                if frame.get("action") == "chat_message" and frame.get("success") is True:
                    acks += 1

        await asyncio.gather(send(), count_acks())

    async def read_all() -> tuple[int, list[dict]]:
        received, lefts = 0, []
        while received < MESSAGES or not lefts:
            frame = await reader.recv()
            if frame.get("action") == "chat_message":
                assert frame["message"] == TEXTS[received]
                received += 1
            elif frame.get("action") == "left":
                lefts.append(frame)
        return received, lefts

    _, outcome = await asyncio.gather(post_all(), read_all())
    return outcome


async def assert_one_slow_reader_dropped(server) -> None:
    status, body = await http_get(server.port, "/healthz")
    assert status == 200
    assert json.loads(body)["worker"]["slow_readers_dropped"] == 1
    assert f"more than {BACKLOG} bytes unread" in server.output()


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
async def test_a_reader_that_stops_reading_is_dropped_and_the_room_keeps_everything(
    server_factory, kind
):
    server = server_factory(kind, env=SLOW_READER_ENV)
    async with AsyncExitStack() as stack:
        writer = await join_chat(server.url(), stack)
        reader = await join_chat(server.url(), stack)
        # max_queue=1: once one frame waits unread, the client stops reading its socket
        # (with compression negotiated this client library keeps inflating into memory).
        stalled = await join_chat(
            server.url(),
            stack,
            sock=tiny_receive_buffer(server.port),
            max_queue=1,
            compression=None,
        )
        await writer.recv_action("joined")
        await writer.recv_action("joined")
        await reader.recv_action("joined")

        received, lefts = await flood_and_read(writer, reader)

    # Every message reached the reader that kept reading, and the stalled one was let go.
    assert received == MESSAGES
    assert [frame["user"] for frame in lefts] == [stalled.nick]
    await assert_one_slow_reader_dropped(server)


async def test_a_stalled_reader_with_compression_is_dropped_without_holding_up_its_room(
    server_factory,
):
    # uvicorn as run without bin/serve compresses when the client asks; then every frame is
    # compressed for its own connection and goes through uvicorn's send, which waits while
    # that connection's buffer is over its high-water mark.
    server = server_factory(
        "uvicorn", env=SLOW_READER_ENV, extra_args=["--ws-per-message-deflate", "true"]
    )
    async with AsyncExitStack() as stack:
        writer = await join_chat(server.url(), stack)
        reader = await join_chat(server.url(), stack)
        sock, handshake = open_compressed_and_stall(server.port)
        stack.callback(sock.close)
        assert b"permessage-deflate" in handshake.lower(), handshake
        await writer.recv_action("joined")  # the reader
        stalled = (await writer.recv_action("joined"))["user"]
        await reader.recv_action("joined")

        received, lefts = await flood_and_read(writer, reader)

    assert received == MESSAGES
    assert [frame["user"] for frame in lefts] == [stalled]
    await assert_one_slow_reader_dropped(server)
