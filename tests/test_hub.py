"""The hub's fan-out within one process: a batch of stored messages reaches each member of a
room in one write, in order, without the sender's own message."""

import asyncio
import gc
import json
import math
import signal
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer

from rooms import protocol, services
from rooms.hub import Hub, MessageWriter, Pace
from rooms.models import Room, group_name
from rooms.serving import text_frame

pytestmark = pytest.mark.django_db(transaction=True)


class Writer:
    """A stand-in connection whose frames the hub may write straight to its socket."""

    backlog = None
    abort = None
    dropped = False

    def __init__(self, channel_name: str) -> None:
        self.channel_name = channel_name
        self.writes: list[bytes] = []

    def write_frame(self, data: bytes) -> bool:
        self.writes.append(data)
        return True

    async def base_send(self, message: dict[str, Any]) -> None:
        raise AssertionError("the frame writer accepted every write")


def chat_frame(room: str, post: services.Post, stored) -> bytes:
    body = protocol.chat_broadcast(
        room, post.author, post.text, stored.pk, protocol.timestamp(stored.created_at)
    )
    return text_frame(protocol.encode(body).encode())


@database_sync_to_async
def seated(*channel_names: str) -> int:
    room = Room.objects.create(name="hubroom")
    for channel_name in channel_names:
        services.presence_connect(channel_name=channel_name, process="p", worker="w")
        services.room_join(channel_name=channel_name, room_name="hubroom")
    return room.pk


def unpaced(hub: Hub) -> Hub:
    """Take the interval out of the way of tests about what goes out in one turn."""
    hub.pace.base = hub.pace.longest = 0.0
    return hub


async def hub_with(*members: Writer, room_id: int, pace: Pace | None = None) -> Hub:
    hub = Hub(InMemoryChannelLayer())
    if pace is None:
        unpaced(hub)
    else:
        hub.writer.pace = pace
    for member in members:
        hub.attach(member)
        await hub.enter(member, room_id)
    return hub


async def test_posts_stored_together_reach_each_member_in_one_write_without_their_own():
    ann, bob, cid = Writer("ann"), Writer("bob"), Writer("cid")
    room_id = await seated("ann", "bob", "cid")
    hub = await hub_with(ann, bob, cid, room_id=room_id)
    posts = [
        services.Post(channel_name=c, room_id=room_id, room_name="hubroom", author=c, text=t)
        for c, t in (("ann", "one"), ("bob", "two"))
    ]

    # Both are waiting before the writer's first batch starts, so they share it.
    stored = await asyncio.gather(*(hub.writer.submit(post) for post in posts))

    one, two = (chat_frame("hubroom", p, s) for p, s in zip(posts, stored, strict=True))
    assert cid.writes == [one + two]
    assert ann.writes == [two]
    assert bob.writes == [one]
    assert [json.loads(f[2:])["message"] for f in (one, two)] == ["one", "two"]


async def test_a_post_of_a_swept_sender_is_neither_published_nor_acknowledged():
    ann, cid = Writer("ann"), Writer("cid")
    room_id = await seated("ann", "cid")
    hub = await hub_with(ann, cid, room_id=room_id)
    ghost = services.Post(
        channel_name="gone", room_id=room_id, room_name="hubroom", author="x", text="lost"
    )
    kept = services.Post(
        channel_name="ann", room_id=room_id, room_name="hubroom", author="ann", text="kept"
    )

    lost, stored = await asyncio.gather(
        hub.writer.submit(ghost), hub.writer.submit(kept), return_exceptions=True
    )

    assert isinstance(lost, services.NotConnected)
    assert cid.writes == [chat_frame("hubroom", kept, stored)]
    assert ann.writes == []


async def next_turn() -> None:
    """Return after the callbacks already scheduled on the event loop have run."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned


def frame_of(body: dict[str, Any]) -> bytes:
    return text_frame(protocol.encode(body).encode())


async def test_broadcasts_to_a_socket_in_one_turn_of_the_loop_go_out_in_one_write():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7)
    first, second = {"n": 1}, {"n": 2}

    await hub.broadcast(7, first)
    await hub.broadcast(7, second)
    assert ann.writes == []
    await next_turn()

    assert ann.writes == [frame_of(first) + frame_of(second)]


async def test_deliveries_to_a_room_in_one_turn_are_one_shared_write_for_its_members():
    ann, bob, cid = Writer("ann"), Writer("bob"), Writer("cid")
    hub = await hub_with(ann, bob, cid, room_id=7)
    mine, theirs = protocol.encode({"from": "here"}), protocol.encode({"from": "elsewhere"})

    # This process's batch, then another process's, as with two processes under load.
    await hub._deliver(7, [mine], ["cid"], own=True)
    await hub._deliver(7, [theirs], [None])
    await next_turn()

    both = text_frame(mine.encode()) + text_frame(theirs.encode())
    assert ann.writes == bob.writes == [both]
    assert ann.writes[0] is bob.writes[0]  # joined once for the room, not once per member
    assert cid.writes == [text_frame(theirs.encode())]


async def test_a_member_gets_what_its_room_heard_while_it_was_in_and_nothing_else():
    ann, bob = Writer("ann"), Writer("bob")
    hub = await hub_with(ann, room_id=7, pace=busy())
    await hub.broadcast(7, {"n": 1})
    await next_turn()
    ann.writes.clear()

    # Within the interval: what the room hears waits for the next write.
    await hub.broadcast(7, {"n": 2})
    hub.attach(bob)
    await hub.enter(bob, 7)
    await hub.broadcast(7, {"n": 3})
    hub.leave(ann, 7)
    await hub.broadcast(7, {"n": 4})
    hub._flush()

    assert ann.writes == [frame_of({"n": 2}) + frame_of({"n": 3})]
    assert bob.writes == [frame_of({"n": 3}) + frame_of({"n": 4})]


async def test_entering_a_room_a_member_is_in_already_keeps_what_waits_for_it():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7)

    await hub.broadcast(7, {"n": 1})
    await hub.enter(ann, 7)
    await next_turn()

    assert ann.writes == [frame_of({"n": 1})]


async def test_a_malformed_delivery_is_refused_without_touching_what_waits():
    ann, bob = Writer("ann"), Writer("bob")
    hub = await hub_with(ann, room_id=7)
    hub.attach(bob)
    await hub.enter(bob, 8)
    await hub.broadcast(7, {"n": 1})
    assert hub.reply(bob, protocol.encode({"reply": True}))

    with pytest.raises(ValueError):
        await hub._deliver(8, [protocol.encode({"n": 2})], [])  # a skip short
    await next_turn()

    assert ann.writes == [frame_of({"n": 1})]
    assert bob.writes == [frame_of({"reply": True})]


async def test_what_waits_for_a_socket_is_written_before_anything_sent_after_it():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7)

    await hub.broadcast(7, {"n": 1})
    await hub.flush_to(ann)
    ann.write_frame(b"reply")
    await next_turn()

    assert ann.writes == [frame_of({"n": 1}), b"reply"]


async def test_replies_and_broadcasts_to_a_socket_go_out_in_one_write_in_their_order():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7)

    await hub.broadcast(7, {"n": 1})
    assert hub.reply(ann, protocol.encode({"reply": True}))
    await hub.broadcast(7, {"n": 2})
    await next_turn()

    assert ann.writes == [frame_of({"n": 1}) + frame_of({"reply": True}) + frame_of({"n": 2})]


class Closing:
    """A socket being closed, with no nick or room: the hub cannot write to it directly, so
    what waits for it goes through the server's own send, which waits for `gate`."""

    backlog = None
    abort = None
    dropped = False

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate = asyncio.Event()

    def write_frame(self, data: bytes) -> bool:
        return False

    async def base_send(self, message: dict[str, Any]) -> None:
        await self.gate.wait()
        self.sent.append(message["text"])


async def test_replies_the_hub_cannot_write_go_through_the_server_in_order():
    sock = Closing()
    sock.gate.set()
    hub = Hub(InMemoryChannelLayer())

    assert hub.reply(sock, "one")
    assert hub.reply(sock, "two")
    await next_turn()
    await hub.flush_to(sock)

    assert sock.sent == ["one", "two"]


class Gone(Closing):
    """A socket with no nick (an /echo socket, or one not seated yet) whose server-side send
    fails: it closed under us."""

    async def base_send(self, message: dict[str, Any]) -> None:
        raise OSError("connection closed")


async def test_a_reply_to_a_socket_that_closed_under_us_is_dropped_quietly():
    sock = Gone()
    hub = Hub(InMemoryChannelLayer())

    assert hub.reply(sock, "one")
    await next_turn()
    await hub.flush_to(sock)  # must not raise: its own disconnect cleans up

    assert sock.sent == []


async def test_no_reply_is_queued_behind_a_send_still_in_flight():
    sock = Closing()
    hub = Hub(InMemoryChannelLayer())
    assert hub.reply(sock, "one")
    await next_turn()  # the outbox is flushed; the server's send of "one" is still waiting

    # The caller sends this one itself, after flush_to has waited for "one".
    assert hub.reply(sock, "two") is False
    sock.gate.set()
    await hub.flush_to(sock)

    assert sock.sent == ["one"]


class Compressing(Closing):
    """A connection that negotiated compression: each frame to it is compressed for it alone,
    so everything goes through the server's send, which waits for `gate` (as uvicorn's waits
    while the socket's buffer is over its high-water mark)."""

    write_frame = None

    def __init__(self, channel_name: str) -> None:
        super().__init__()
        self.channel_name = channel_name


async def test_a_send_that_waits_holds_up_neither_the_room_nor_that_sockets_order():
    stuck, ann = Compressing("stuck"), Writer("ann")
    hub = await hub_with(stuck, ann, room_id=7)

    # A guard, not a pause: a broadcast that waited for the stuck socket would never return.
    await asyncio.wait_for(hub.broadcast(7, {"n": 1}), timeout=5)
    await asyncio.wait_for(hub.broadcast(7, {"n": 2}), timeout=5)
    await next_turn()

    assert b"".join(ann.writes) == frame_of({"n": 1}) + frame_of({"n": 2})
    assert stuck.sent == []
    stuck.gate.set()
    await hub.flush_to(stuck)
    assert stuck.sent == [protocol.encode({"n": 1}), protocol.encode({"n": 2})]


async def test_a_socket_the_hub_cannot_gauge_is_dropped_once_its_unsent_texts_pass_the_limit():
    stuck, ann = Compressing("stuck"), Writer("ann")
    stuck.backlog = None  # a server whose buffer the hub cannot read
    hub = await hub_with(stuck, ann, room_id=7)
    hub.backlog_limit = 50

    for n in range(10):
        await hub.broadcast(7, {"n": n, "pad": "x" * 10})
        await next_turn()  # each written apart, as at separate intervals

    assert stuck.dropped is True
    assert hub.slow_dropped == 1
    assert "stuck" not in hub.rooms[7]
    assert b"".join(ann.writes).count(b'"pad"') == 10


class Closed:
    """A socket that records what the server's own send is given; until `gate` is set its
    send waits, as for a reader that stopped reading."""

    dropped = False

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    async def base_send(self, message: dict[str, Any]) -> None:
        await self.gate.wait()
        self.messages.append(message)


async def test_shutdown_is_not_held_up_by_a_socket_that_never_takes_its_close():
    hub = Hub(InMemoryChannelLayer())
    stuck, fine = Closed(), Closed()
    fine.gate.set()
    hub.open_socket(stuck)
    hub.open_socket(fine)

    # A guard, not a pause: before, shutdown waited on the stuck socket for ever.
    await asyncio.wait_for(hub.shutdown(grace=0.2), timeout=5)

    assert fine.messages == [{"type": "websocket.close", "code": 1001}]
    assert fine.aborted is False
    assert stuck.messages == []
    assert stuck.aborted is True


class Seated(Writer):
    """A connection the heartbeat may judge: it records what is sent to it directly."""

    def __init__(self, channel_name: str) -> None:
        super().__init__(channel_name)
        self.direct: list[dict[str, Any]] = []

    async def on_direct(self, event: dict[str, Any]) -> None:
        self.direct.append(event)


async def test_a_connection_seated_while_the_heartbeat_reconciles_is_not_taken_for_swept(
    monkeypatch,
):
    hub = Hub(InMemoryChannelLayer())
    await hub.start()
    try:
        await reconcile_while_a_newcomer_arrives(hub, monkeypatch)
    finally:
        await hub.stop()


async def reconcile_while_a_newcomer_arrives(hub: Hub, monkeypatch) -> None:
    loop = asyncio.get_running_loop()
    ghost = hub.address()
    await database_sync_to_async(services.presence_connect)(
        channel_name=ghost, process=hub.process, worker="w"
    )
    hub.release(ghost)  # its socket is gone, its row is not: the heartbeat removes it
    newcomer = Seated(hub.address())
    forget = services.presence_forget

    def forget_while_a_newcomer_arrives(**kwargs):
        removed = forget(**kwargs)
        services.presence_connect(
            channel_name=newcomer.channel_name, process=hub.process, worker="w"
        )
        loop.call_soon_threadsafe(hub.attach, newcomer)
        return removed

    monkeypatch.setattr(services, "presence_forget", forget_while_a_newcomer_arrives)
    await hub.heartbeat()

    assert newcomer.direct == []
    assert hub.members == {newcomer.channel_name: newcomer}


async def test_a_signal_ignored_when_the_server_started_stays_ignored(monkeypatch):
    # A shell starts background jobs with SIGINT ignored. Taking it anyway shut the hub down
    # on ^C-style signals while the server went on running, closing every new socket at once.
    from rooms import hub as hub_module

    monkeypatch.setattr(hub_module, "_signals_taken", False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    hub_module._close_on_signals(Hub(InMemoryChannelLayer()))

    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)


async def test_starting_with_the_server_takes_what_it_loaded_out_of_the_collectors_way(
    monkeypatch, settings
):
    from rooms import hub as hub_module

    async def started(hub: Hub) -> None:
        """Stands in for the hub's start: this test is about what happens before it."""

    monkeypatch.setattr(hub_module, "_start_until_started", started)
    settings.CHAT_HUB_AT_STARTUP = True
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    gc.unfreeze()
    try:
        await hub_module.lifespan({"type": "lifespan"}, receive, send)
        # Django, the app and their modules: tens of thousands of objects a full collection
        # would otherwise walk with the event loop stopped.
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


class SlowLayer:
    """A channel layer whose publishes wait until released, as they wait for Redis."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.publishing = asyncio.Event()
        self.released = asyncio.Event()

    async def group_send(self, group: str, event: dict[str, Any]) -> None:
        self.publishing.set()
        await self.released.wait()
        self.sent.append((group, (event["texts"], event["skips"])))

    async def send(self, channel: str, event: dict[str, Any]) -> None:
        self.sent.append((channel, event["to"]))


def texts(*bodies: dict[str, Any]) -> list[str]:
    return [protocol.encode(body) for body in bodies]


async def test_broadcasts_made_while_a_publish_waits_go_to_each_room_as_one_layer_message():
    layer = SlowLayer()
    hub = Hub(layer)
    one, two, three, four = ({"n": n} for n in range(4))

    await asyncio.wait_for(hub.broadcast(1, one), timeout=5)
    await layer.publishing.wait()
    # Broadcasting does not wait for the layer.
    await asyncio.wait_for(hub.broadcast(1, two), timeout=5)
    await asyncio.wait_for(hub.broadcast(2, three), timeout=5)
    await asyncio.wait_for(hub.broadcast(1, four, skip="ann"), timeout=5)
    layer.released.set()
    await hub.published()

    assert layer.sent == [
        (group_name(1), (texts(one), [None])),
        (group_name(1), (texts(two, four), [None, "ann"])),
        (group_name(2), (texts(three), [None])),
    ]


async def test_an_event_for_one_connection_is_not_sent_ahead_of_broadcasts_before_it():
    layer = SlowLayer()
    hub = Hub(layer)
    hub.process = "here"

    await asyncio.wait_for(hub.broadcast(1, {"kicked": "ann"}), timeout=5)
    await layer.publishing.wait()
    direct = asyncio.create_task(
        hub.send_to(process="there", channel_name="there|7", event={"close": 1008})
    )
    layer.released.set()
    await direct

    assert [target for target, _ in layer.sent] == [group_name(1), "there"]


async def test_a_layer_message_never_carries_more_than_its_cap(monkeypatch):
    from rooms import hub as hub_module

    monkeypatch.setattr(hub_module, "MAX_LAYER_TEXTS", 3)
    layer = SlowLayer()
    hub = Hub(layer)
    bodies = [{"n": n} for n in range(5)]

    await asyncio.wait_for(hub.broadcast(1, bodies[0]), timeout=5)
    await layer.publishing.wait()
    await hub._fan_out(1, texts(*bodies[1:3]), [None, None])
    await hub._fan_out(1, texts(*bodies[3:5]), [None, None])
    layer.released.set()
    await hub.published()

    assert [len(sent_texts) for _, (sent_texts, _) in layer.sent] == [1, 2, 2]
    assert [t for _, (sent_texts, _) in layer.sent for t in sent_texts] == texts(*bodies)


class FakeDatabase:
    """Stands in for the database thread: stores each batch at once and remembers it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def run(self, fn: Any, /, **kwargs: Any) -> list[services.StoredMessage]:
        posts = kwargs["posts"]
        self.batches.append([post.text for post in posts])
        first = sum(map(len, self.batches[:-1]))
        return [
            services.StoredMessage(pk=first + i + 1, created_at=None)  # type: ignore[arg-type]
            for i in range(len(posts))
        ]


def post(text: str, room_id: int = 1) -> services.Post:
    return services.Post(
        channel_name="bob", room_id=room_id, room_name="r", author="bob", text=text
    )


async def published(_: object) -> None:
    pass


@pytest.mark.parametrize(
    ("interval", "batches"), [(0.0, [["a"], ["b"], ["c"]]), (0.05, [["a"], ["b", "c"]])]
)
async def test_under_load_posts_wait_for_the_commit_interval_and_go_together(
    monkeypatch: pytest.MonkeyPatch, interval: float, batches: list[list[str]]
) -> None:
    database = FakeDatabase()
    monkeypatch.setattr("rooms.hub.dbthread.run", database.run)
    writer = MessageWriter(lambda: False, published, pace=Pace(interval, interval, 0))
    await writer.submit(post("a"))
    second = writer.submit(post("b"))
    for _ in range(5):  # let the writer take "b" now, if it is not to wait
        await asyncio.sleep(0)
    third = writer.submit(post("c"))
    assert [(await second).pk, (await third).pk] == [2, 3]
    assert database.batches == batches


async def test_the_writer_says_when_it_takes_its_next_batch_and_never_while_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = FakeDatabase()
    monkeypatch.setattr("rooms.hub.dbthread.run", database.run)
    writer = MessageWriter(lambda: False, published, pace=Pace(3600.0, 3600.0, 0))
    assert writer.next_batch() == math.inf
    await writer.submit(post("a"))
    second = writer.submit(post("b"))
    for _ in range(5):
        await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    assert loop.time() < writer.next_batch() <= loop.time() + 3600.0
    draining = writer._draining
    draining.cancel()  # an hour is too long to wait
    await asyncio.wait({draining})
    second.cancel()
    assert writer.next_batch() == math.inf


async def test_a_post_after_a_quiet_spell_does_not_wait_for_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = FakeDatabase()
    monkeypatch.setattr("rooms.hub.dbthread.run", database.run)
    writer = MessageWriter(lambda: False, published, pace=Pace(3600.0, 3600.0, 0))
    stored = await asyncio.wait_for(writer.submit(post("alone")), timeout=5)
    assert stored.pk == 1
    assert database.batches == [["alone"]]


def fed(pace: Pace, per_second: int, now: float = 0.0) -> float:
    """Count `per_second` messages a second into `pace` for two seconds from `now`, a tenth
    of a second at a time; the time after."""
    for _ in range(20):
        pace.count(per_second // 10, now)
        now += 0.1
    return now


def test_the_interval_stays_short_while_messages_come_slowly() -> None:
    pace = Pace(base=0.01, longest=0.04, full_rate=2000)
    now = fed(pace, 400)
    assert pace.rate == pytest.approx(400, rel=0.01)
    assert pace.interval(now) == 0.01


def test_the_interval_stretches_with_the_rate_up_to_the_longest() -> None:
    pace = Pace(base=0.01, longest=0.04, full_rate=2000)
    now = fed(pace, 1000)
    assert pace.interval(now) == pytest.approx(0.02, rel=0.01)
    now = fed(pace, 5000, now)
    assert pace.interval(now) == 0.04


def test_a_quiet_spell_brings_the_interval_back_at_once() -> None:
    pace = Pace(base=0.01, longest=0.04, full_rate=2000)
    now = fed(pace, 5000)
    assert pace.interval(now) == 0.04
    assert pace.interval(now + 5.0) == 0.01


def stretched(base: float, longest: float) -> Pace:
    """A pace that has just seen far more messages than it takes to stretch it to the
    longest interval, on the running loop's clock: writes wait `longest - base` after the
    last one."""
    pace = Pace(base=base, longest=longest, full_rate=1.0)
    now = asyncio.get_running_loop().time()
    pace.count(10**6, now - 0.2)
    pace.count(0, now - 0.1)  # one window of a million messages: 10 million a second
    return pace


def busy(longest: float = 3600.0) -> Pace:
    return stretched(base=0.0, longest=longest)


def test_writes_wait_only_for_what_the_load_adds_to_the_interval() -> None:
    pace = Pace(base=0.01, longest=0.04, full_rate=2000)
    assert pace.stretch(0.0) == 0.0
    now = fed(pace, 5000)
    assert pace.stretch(now) == pytest.approx(0.03)


def test_the_load_is_how_far_the_interval_is_stretched() -> None:
    pace = Pace(base=0.01, longest=0.04, full_rate=2000)
    assert pace.load(0.0) == 0.0
    now = fed(pace, 1000)
    assert pace.load(now) == pytest.approx(1 / 3, rel=0.01)
    now = fed(pace, 5000, now)
    assert pace.load(now) == 1.0
    assert Pace(base=0.01, longest=0.01, full_rate=2000).load(now) == 0.0


async def test_under_load_a_delivery_sets_the_loop_napping_and_a_shutdown_stops_it():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7, pace=busy(longest=0.04))
    await hub.broadcast(7, {"n": 1})
    assert hub.napper.napping

    await hub.shutdown(grace=0.1)
    assert not hub.napper.napping


async def test_under_light_load_a_delivery_does_not_set_the_loop_napping():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7, pace=Pace(base=0.01, longest=0.04, full_rate=2000))
    await hub.broadcast(7, {"n": 1})
    await next_turn()
    assert not hub.napper.napping
    assert ann.writes == [frame_of({"n": 1})]


class Recorder(Writer):
    """A Writer that lets a test await its next write instead of sleeping for it."""

    def __init__(self, channel_name: str) -> None:
        super().__init__(channel_name)
        self.written = asyncio.Event()

    def write_frame(self, data: bytes) -> bool:
        self.written.set()
        return super().write_frame(data)


async def test_under_load_broadcasts_to_a_socket_wait_for_the_interval_and_go_together():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7, pace=busy())

    await hub.broadcast(7, {"n": 1})
    await next_turn()
    assert ann.writes == [frame_of({"n": 1})]  # after a quiet spell: at once

    await hub.broadcast(7, {"n": 2})
    await hub.broadcast(7, {"n": 3})
    await next_turn()
    assert ann.writes == [frame_of({"n": 1})]  # within the interval: waiting

    await hub.flush_to(ann)  # as before anything else is sent to it
    assert ann.writes == [frame_of({"n": 1}), frame_of({"n": 2}) + frame_of({"n": 3})]


async def test_the_interval_is_over_when_the_waiting_broadcasts_are_written():
    ann = Recorder("ann")
    hub = await hub_with(ann, room_id=7, pace=busy(longest=0.01))
    await hub.broadcast(7, {"n": 1})
    await hub.broadcast(7, {"n": 2})
    await next_turn()
    ann.written.clear()

    await hub.broadcast(7, {"n": 3})
    await asyncio.wait_for(ann.written.wait(), timeout=5)

    assert b"".join(ann.writes) == b"".join(frame_of({"n": n}) for n in (1, 2, 3))


async def test_a_server_shutdown_writes_what_waits_for_the_interval_before_the_close():
    ann = Writer("ann")
    hub = await hub_with(ann, room_id=7, pace=busy())
    closes: list[dict[str, Any]] = []

    async def base_send(message: dict[str, Any]) -> None:
        closes.append(message)
        hub.close_socket(ann)

    ann.base_send = base_send  # type: ignore[method-assign]
    hub.open_socket(ann)
    await hub.broadcast(7, {"n": 1})
    await next_turn()
    await hub.broadcast(7, {"n": 2})

    await hub.shutdown(grace=0.1)

    assert ann.writes == [frame_of({"n": 1}), frame_of({"n": 2})]
    assert [message["type"] for message in closes] == ["websocket.close"]


async def test_a_reply_does_not_wait_for_the_interval_nor_overtake_a_broadcast():
    ann = Recorder("ann")
    hub = await hub_with(ann, room_id=7, pace=busy())
    await hub.broadcast(7, {"n": 1})
    await next_turn()

    await hub.broadcast(7, {"n": 2})
    assert hub.reply(ann, protocol.encode({"reply": True}))
    await next_turn()

    assert ann.writes == [
        frame_of({"n": 1}),
        frame_of({"n": 2}) + frame_of({"reply": True}),
    ]


class GatedDatabase(FakeDatabase):
    """Stores the first batch at once and every later one when `opened` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()

    async def run(self, fn: Any, /, **kwargs: Any) -> list[services.StoredMessage]:
        if self.batches:
            await self.opened.wait()
        return await super().run(fn, **kwargs)


FIRST = post("first", room_id=7)


def stored_frame(post: services.Post, pk: int) -> bytes:
    return chat_frame("r", post, services.StoredMessage(pk=pk, created_at=None))


async def after_a_first_batch(
    monkeypatch: pytest.MonkeyPatch, database: FakeDatabase, member: Writer, pace: Pace
) -> Hub:
    """A hub whose member `member` of room 7 has been written the first post of a batch
    stored at once (after a quiet spell), with `database` storing its batches."""
    monkeypatch.setattr("rooms.hub.dbthread.run", database.run)
    monkeypatch.setattr("rooms.protocol.timestamp", lambda _: "t")
    hub = await hub_with(member, room_id=7, pace=pace)
    await hub.writer.submit(FIRST)
    await next_turn()
    return hub


async def test_under_load_what_another_process_sends_goes_out_with_this_ones_next_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ann = Writer("ann")
    pace = stretched(base=0.05, longest=0.2)
    hub = await after_a_first_batch(monkeypatch, FakeDatabase(), ann, pace)
    second = post("second", room_id=7)
    waiting = hub.writer.submit(second)  # waits for the interval

    await hub._deliver(7, [protocol.encode({"from": "elsewhere"})], [None])
    await waiting
    await next_turn()

    # Not written apart once the stretch (0.15 s) was over: with the batch, 0.2 s on.
    assert ann.writes == [
        stored_frame(FIRST, 1),
        frame_of({"from": "elsewhere"}) + stored_frame(second, 2),
    ]


async def test_what_another_process_sends_does_not_wait_long_for_a_late_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = GatedDatabase()
    ann = Recorder("ann")
    hub = await after_a_first_batch(monkeypatch, database, ann, stretched(0.01, 0.05))
    ann.written.clear()
    late = hub.writer.submit(post("late", room_id=7))  # its commit does not come back

    await hub._deliver(7, [protocol.encode({"from": "elsewhere"})], [None])
    await asyncio.wait_for(ann.written.wait(), timeout=5)

    assert not late.done()
    assert ann.writes[-1] == frame_of({"from": "elsewhere"})
    database.opened.set()
    await late


async def test_under_light_load_what_another_process_sends_does_not_wait_for_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = GatedDatabase()
    ann = Writer("ann")
    # The rate never stretches the interval: writes do not wait.
    unstretched = Pace(base=0.05, longest=0.05, full_rate=0)
    hub = await after_a_first_batch(monkeypatch, database, ann, unstretched)
    pending = hub.writer.submit(post("second", room_id=7))  # its commit does not come back

    await hub._deliver(7, [protocol.encode({"from": "elsewhere"})], [None])
    await next_turn()

    assert ann.writes[-1] == frame_of({"from": "elsewhere"})
    database.opened.set()
    await pending
