"""Two hubs on one real Redis, as two server processes would be: a broadcast reaches the other
process's members once, and `send_to` reaches one connection on whichever process holds it
(the path moderation takes to reach a socket)."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels_redis.pubsub import RedisPubSubChannelLayer

from rooms.hub import Hub

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

DEADLINE = 10.0


class Recorder:
    """A stand-in connection that records what the hub hands it."""

    backlog = None
    write_frame = None
    abort = None
    dropped = False

    def __init__(self, channel_name: str) -> None:
        self.channel_name = channel_name
        self.sent: list[dict[str, Any]] = []
        self.direct: list[dict[str, Any]] = []

    async def base_send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def on_direct(self, event: dict[str, Any]) -> None:
        self.direct.append(event)


async def until(condition: Callable[[], bool], retry: Callable[[], Awaitable[None]]) -> None:
    """Retry until the condition holds: a SUBSCRIBE takes effect a moment after it is sent,
    so the first publish may go out before the other side listens."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "nothing arrived"
        await retry()
        await asyncio.sleep(0.2)


@pytest.fixture
async def two_hubs(redis_url) -> AsyncIterator[tuple[Hub, Hub]]:
    hubs = []
    for port in (1, 2):
        layer = RedisPubSubChannelLayer(hosts=[redis_url.url], prefix=redis_url.prefix)
        hub = Hub(layer)
        await hub.start({"server": ("127.0.0.1", port)})
        hubs.append(hub)
    yield hubs[0], hubs[1]
    for hub in hubs:
        await hub.stop()
        await hub.layer.flush()


async def test_send_to_reaches_a_connection_on_another_process(two_hubs):
    here, there = two_hubs
    target = Recorder(there.address())
    there.attach(target)
    event = {"body": {"action": "kicked", "reason": "test"}, "close": 4003}

    await until(
        lambda: bool(target.direct),
        lambda: here.send_to(process=there.process, channel_name=target.channel_name, event=event),
    )

    assert target.direct[0]["body"] == event["body"]
    assert target.direct[0]["close"] == 4003


async def test_send_to_a_connection_of_this_process_skips_the_layer(two_hubs):
    here, _ = two_hubs
    target = Recorder(here.address())
    here.attach(target)

    await here.send_to(process=here.process, channel_name=target.channel_name, event={"close": 1})

    assert target.direct == [{"close": 1}]


async def test_broadcast_reaches_the_other_process_once_and_skips_the_sender(two_hubs):
    here, there = two_hubs
    sender, neighbour, remote = (
        Recorder(here.address()),
        Recorder(here.address()),
        Recorder(there.address()),
    )
    for hub, member in ((here, sender), (here, neighbour), (there, remote)):
        hub.attach(member)
        await hub.enter(member, 7)
    body = {"action": "chat_message", "message": "hi", "user": "ann"}
    attempts = 0

    async def broadcast() -> None:
        nonlocal attempts
        attempts += 1
        await here.broadcast(7, body, skip=sender.channel_name)

    await until(lambda: bool(remote.sent), broadcast)
    # A barrier: the sending process hears its own group too, and one subscription delivers
    # in publish order, so once this marker is in, any relayed copy would be as well.
    marker = Recorder(here.address())
    here.attach(marker)
    await here.layer.send(here.process, {"type": "conn.direct", "to": marker.channel_name})
    await until(lambda: bool(marker.direct), _nothing)

    sent = {
        "type": "websocket.send",
        "text": '{"action":"chat_message","message":"hi","user":"ann"}',
    }
    assert remote.sent[0] == sent
    assert sender.sent == []
    # Each broadcast reached the local neighbour once, straight from the hub, never relayed.
    assert neighbour.sent == [sent] * attempts


async def _nothing() -> None:
    """Nothing to resend: the message is already on its way."""
