"""Shared fixtures: in-process chat clients and the per-loop hub's cleanup."""

import asyncio
import collections
import functools
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

CHAT_PATH = "/chat"


@dataclass
class ChatClient:
    """One in-process /chat connection, already past its `connecting` and `history` frames.

    A broadcast may arrive between those two (the client is in its room from `connecting`
    on); such frames are kept in `pending` and returned first by `recv`.
    """

    comm: WebsocketCommunicator
    nick: str
    room: str
    greeting: dict[str, Any] = field(default_factory=dict)
    first_history: dict[str, Any] = field(default_factory=dict)
    pending: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)
    closed: bool = False

    async def send(self, body: Any) -> None:
        await self.comm.send_json_to(body)

    async def send_text(self, text: str) -> None:
        await self.comm.send_to(text_data=text)

    async def recv(self) -> dict[str, Any]:
        if self.pending:
            return self.pending.popleft()
        return await self.comm.receive_json_from()

    async def recv_raw(self) -> str:
        if self.pending:
            return json.dumps(self.pending.popleft(), ensure_ascii=False)
        return await self.comm.receive_from()

    async def request(self, body: Any) -> dict[str, Any]:
        """Send one frame and return the next frame this client receives."""
        await self.send(body)
        return await self.recv()

    async def recv_close(self) -> int | None:
        """The next output must be the server closing the socket; returns its code."""
        output = await self.comm.receive_output()
        assert output["type"] == "websocket.close", output
        return output.get("code")

    async def assert_nothing(self) -> None:
        assert not self.pending, f"expected no frame, have {list(self.pending)}"
        assert await self.comm.receive_nothing(), "expected no frame"

    async def set_nick(self, nick: str) -> None:
        reply = await self.request({"action": "set_nick", "nick": nick})
        assert reply == {"action": "set_nick", "success": True, "message": ""}, reply
        self.nick = nick.strip()

    async def join(self, room: str) -> None:
        reply = await self.request({"action": "join_room", "room": room})
        assert reply == {"action": "join_room", "success": True, "message": ""}, reply
        self.room = room.strip()

    async def disconnect(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            await self.comm.disconnect(code=code)


ConnectChat = Callable[..., Awaitable[ChatClient]]


@functools.cache
def asgi_application():
    """`chatsite.asgi.application`, imported once."""
    from chatsite.asgi import application

    return application


async def open_chat(headers: list[tuple[bytes, bytes]] | None = None) -> ChatClient:
    """Connect to /chat through the full ASGI application and read the greeting frames."""
    comm = WebsocketCommunicator(asgi_application(), CHAT_PATH, headers=headers)
    connected, detail = await comm.connect()
    assert connected, f"handshake refused: {detail}"
    greeting = await comm.receive_json_from()
    assert greeting["action"] == "connecting", greeting
    pending: collections.deque[dict[str, Any]] = collections.deque()
    for _ in range(100):
        frame = await comm.receive_json_from()
        if frame["action"] == "history" and "success" in frame:
            break
        pending.append(frame)
    else:
        raise AssertionError(f"no history frame after connecting; got {list(pending)}")
    return ChatClient(
        comm=comm,
        nick=greeting["user"],
        room=greeting["room"],
        greeting=greeting,
        first_history=frame,
        pending=pending,
    )


@pytest.fixture
async def connect_chat() -> AsyncIterator[ConnectChat]:
    """Open /chat clients; every one still open is disconnected (code 1000) at teardown."""
    clients: list[ChatClient] = []

    async def connect(headers: list[tuple[bytes, bytes]] | None = None) -> ChatClient:
        client = await open_chat(headers)
        clients.append(client)
        return client

    yield connect
    # Every client is disconnected even if one of them fails to; the first failure (an
    # exception the consumer raised, say) is reported after all were tried.
    failures: list[BaseException] = []
    for client in reversed(clients):
        if not client.closed:
            client.closed = True
            try:
                await client.comm.disconnect()
            except Exception as error:
                failures.append(error)
    if failures:
        raise failures[0]


@pytest.fixture(autouse=True)
async def _stop_hub() -> AsyncIterator[None]:
    """Stop the hub of this test's event loop, so no heartbeat task outlives the test.

    A hub may also take over SIGINT/SIGTERM for graceful shutdown (a server process wants
    that; the test process does not: the handlers would outlive the test's loop), so the
    handlers the test started with are put back.
    """
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    from rooms import hub as hub_module

    hub = hub_module._hubs.get(asyncio.get_running_loop())
    if hub is not None:
        await hub.stop()
    for signum, handler in handlers.items():
        if signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)
