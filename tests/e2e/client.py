"""A /chat client over a real socket (the `websockets` asyncio client), for e2e tests."""

from __future__ import annotations

import asyncio
import collections
import json
from contextlib import AsyncExitStack
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# Generous, for a loaded CI machine: every such wait is for a frame that must come.
FRAME_TIMEOUT = 10.0
# How long "nothing arrives" is watched for.
SILENCE = 0.3


async def open_ws(url: str, **kwargs: Any) -> ClientConnection:
    """Connect straight to a loopback URL (never through a proxy from the environment)."""
    kwargs.setdefault("open_timeout", FRAME_TIMEOUT)
    kwargs.setdefault("close_timeout", 5)
    return await connect(url, proxy=None, **kwargs)


class Peer:
    """A /chat client past `connecting` and `history`.

    Broadcasts that arrive between those two frames (the client is in its room from
    `connecting` on) are kept and returned first by `recv`.
    """

    def __init__(
        self,
        ws: ClientConnection,
        greeting: dict[str, Any],
        history: dict[str, Any],
        pending: collections.deque[dict[str, Any]] | None = None,
    ) -> None:
        self.ws = ws
        self.greeting = greeting
        self.history = history
        self.pending = pending if pending is not None else collections.deque()
        self.nick: str = greeting["user"]
        self.room: str = greeting["room"]

    async def send(self, body: Any) -> None:
        await self.ws.send(json.dumps(body))

    async def recv(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        if self.pending:
            return self.pending.popleft()
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def request(self, body: Any) -> dict[str, Any]:
        await self.send(body)
        return await self.recv()

    async def recv_action(self, action: str, *, limit: int = 100) -> dict[str, Any]:
        """The next frame with this action, skipping up to `limit` others."""
        for _ in range(limit):
            frame = await self.recv()
            if frame.get("action") == action:
                return frame
        raise AssertionError(f"no {action!r} frame among {limit}")

    async def assert_silent(self, seconds: float = SILENCE) -> None:
        assert not self.pending, f"expected no frame, have {list(self.pending)}"
        # Cancelling recv() is safe: an unread frame stays queued for the next call.
        try:
            frame = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return
        pytest.fail(f"expected no frame, got {frame!r}")

    async def close_code(self, *, limit: int = 100) -> int | None:
        """Read until the server closes the socket; the code in its close frame (None if it
        sent none), skipping up to `limit` frames."""
        try:
            for _ in range(limit):
                await asyncio.wait_for(self.ws.recv(), FRAME_TIMEOUT)
        except ConnectionClosed as closed:
            return None if closed.rcvd is None else closed.rcvd.code
        raise AssertionError(f"the socket was still open after {limit} frames")


async def join_chat(url: str, stack: AsyncExitStack | None = None, **kwargs: Any) -> Peer:
    """Connect to /chat at `url`, read `connecting` and `history`, close with `stack`."""
    ws = await open_ws(url, **kwargs)
    if stack is not None:
        stack.push_async_callback(ws.close)
    greeting = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
    assert greeting.get("action") == "connecting" and "user" in greeting, greeting
    pending: collections.deque[dict[str, Any]] = collections.deque()
    for _ in range(100):
        frame = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
        if frame.get("action") == "history" and "success" in frame:
            return Peer(ws, greeting, frame, pending)
        pending.append(frame)
    raise AssertionError(f"no history frame after connecting; got {list(pending)}")
