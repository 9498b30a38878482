"""A reader that stops reading is disconnected after a bounded backlog; its room is unaffected."""

import asyncio
import base64
import json
import os
import socket
from contextlib import AsyncExitStack

import pytest

from tests.e2e.client import join_chat
from tests.e2e.faults import http_get

pytestmark = pytest.mark.e2e

BACKLOG = 64 * 1024
# Comfortably more than the kernel buffers in between hold (up to 4 MiB on the sending side),
# so the backlog builds up in the server itself.
MESSAGES = 4000
# Incompressible, so a connection that negotiated permessage-deflate backs up as fast.
TEXT = base64.b64encode(os.urandom(1500)).decode()


def tiny_receive_buffer(port: int) -> socket.socket:
    """A socket whose kernel receive buffer is small, so a reader that stops reading backs
    the server up after kilobytes rather than megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
async def test_a_reader_that_stops_reading_is_dropped_and_the_room_keeps_everything(
    server_factory, kind
):
    server = server_factory(
        kind,
        env={
            "CHAT_SEND_BACKLOG_BYTES": str(BACKLOG),
            "CHAT_RATE_PER_SEC": "100000",
            "CHAT_RATE_BURST": "100000",
        },
    )
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

        async def post_all() -> None:
            async def send() -> None:
                for _ in range(MESSAGES):
                    await writer.send({"action": "chat_message", "message": TEXT})

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
                    assert frame["message"] == TEXT
                    received += 1
                elif frame.get("action") == "left":
                    lefts.append(frame)
            return received, lefts

        _, (received, lefts) = await asyncio.gather(post_all(), read_all())

    # Every message reached the reader that kept reading, and the stalled one was let go.
    assert received == MESSAGES
    assert [frame["user"] for frame in lefts] == [stalled.nick]
    status, body = await http_get(server.port, "/healthz")
    assert status == 200
    assert json.loads(body)["worker"]["slow_readers_dropped"] == 1
    assert "more than 65536 bytes unread" in server.output()
