"""A connection's posts are answered in order from their commit callbacks, and nothing that
goes wrong while answering one post leaves the posts behind it unanswered."""

import asyncio
import collections
import json

from channels.layers import InMemoryChannelLayer
from django.utils import timezone

from rooms import protocol
from rooms.consumers import ChatConsumer
from rooms.hub import Hub
from rooms.models import Message


def opened_consumer(gate: asyncio.Event | None = None) -> ChatConsumer:
    """A ChatConsumer as opened() leaves it, on a socket the hub cannot write to itself, so
    that every answer goes through `base_send`; a text "held" waits there for `gate`."""
    consumer = ChatConsumer()
    consumer.scope = {"path": "/chat"}
    consumer.hub = Hub(InMemoryChannelLayer())
    consumer.channel_name = "p|1"
    consumer._posts = collections.deque()
    consumer._posts_moved = asyncio.Event()
    consumer.sent = []

    async def base_send(message):
        if gate is not None and message.get("text") == "held":
            await gate.wait()
        consumer.sent.append(json.loads(message["text"]) if message["text"] != "held" else "held")

    consumer.base_send = base_send
    return consumer


def post(consumer: ChatConsumer, text: str) -> asyncio.Future:
    """What chat_message does after submitting, with a commit the test resolves itself."""
    stored = asyncio.get_running_loop().create_future()
    consumer._posts.append((text, stored))
    stored.add_done_callback(consumer._answer_posts)
    return stored


def committed(pk: int) -> Message:
    return Message(pk=pk, created_at=timezone.now())


def answers(consumer: ChatConsumer) -> list[tuple[bool, str]]:
    return [(body["success"], body["message"]) for body in consumer.sent if body != "held"]


async def test_commits_that_land_out_of_order_are_answered_in_order():
    consumer = opened_consumer()
    first, second, third = post(consumer, "a"), post(consumer, "b"), post(consumer, "c")
    third.set_result(committed(3))
    first.set_result(committed(1))
    second.set_result(committed(2))

    await asyncio.wait_for(consumer.answered(), timeout=5)

    assert answers(consumer) == [(True, "a"), (True, "b"), (True, "c")]


async def test_an_answer_that_fails_to_build_is_an_internal_error_and_the_rest_follow(
    monkeypatch,
):
    consumer = opened_consumer()
    first, second = post(consumer, "a"), post(consumer, "b")
    build = protocol.chat_ack
    calls = 0

    def fails_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("cannot build")
        return build(*args)

    monkeypatch.setattr(protocol, "chat_ack", fails_once)
    second.set_result(committed(2))
    first.set_result(committed(1))

    # A guard, not a pause: before the fix the second post was never answered.
    await asyncio.wait_for(consumer.answered(), timeout=5)

    assert answers(consumer) == [(False, protocol.INTERNAL_ERROR), (True, "b")]


async def test_posts_behind_a_send_that_was_cancelled_are_still_answered():
    gate = asyncio.Event()
    consumer = opened_consumer(gate)
    consumer.hub._send_later(consumer, ["held"])  # a send to this socket, waiting
    first, second = post(consumer, "a"), post(consumer, "b")
    first.set_result(committed(1))
    await asyncio.sleep(0)  # let the first answer start waiting behind the held send
    second.set_result(committed(2))
    consumer.hub._sending[consumer].cancel()

    await asyncio.wait_for(consumer.answered(), timeout=5)

    assert answers(consumer)[-1] == (True, "b")
