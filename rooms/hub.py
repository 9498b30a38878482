"""This process's share of the chat: its sockets by room, and one channel-layer mailbox.

The fan-out path is what makes the server fast. A broadcast is encoded once, written straight to
this process's members of the room, and sent once through the channel layer to the group of the
room, whose members are *processes* (their mailboxes), not connections. Each other process
receives it once and writes it to its own members. So the layer carries one message per process
per broadcast instead of one per recipient, and no consumer wakes up to relay a frame.

Any single connection is reachable from any process through `send_to` with the `process` and
`channel_name` stored in its presence row: that is how moderation reaches a socket.
"""

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings

from rooms import dbthread, protocol, services, serving
from rooms.collector import CollectorPacer
from rooms.models import group_name
from rooms.nap import Napper
from rooms.protocol import CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION, CLOSE_TRY_AGAIN_LATER

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBE_GROUP = "chat-probe"
# At most this many messages share one transaction.
MAX_BATCH = 500
# At most this many texts share one channel-layer message.
MAX_LAYER_TEXTS = 500
# A dropped slow reader gets this long to answer the close before its connection is cut.
SLOW_READER_GRACE = 2.0
# Broadcasts kept for replay while the channel layer is down; older ones are dropped.
MAX_UNDELIVERED = 1000
# Every this many heartbeats, this process's presence rows are compared with its sockets.
RECONCILE_EVERY = 15
# Under load, the loop stays awake this long between naps (rooms/nap.py): long enough for a
# message's next few steps to run at once, short enough that the naps still take most of
# the wake-ups. Measured with 3 ms naps at 5,000 to 8,000 msg/s into one room.
NAP_AWAKE = 0.001


class Socket(Protocol):
    """Any WebSocket of this process, as shutdown and slow-reader dropping see it."""

    dropped: bool

    async def base_send(self, message: dict[str, Any]) -> None: ...


class Member(Socket, Protocol):
    """A /chat connection, as the fan-out sees it."""

    channel_name: str
    # Bytes waiting unsent on the socket, if the server lets us know (rooms/serving.py).
    backlog: Callable[[], int] | None
    # Writes a ready-made frame straight to the socket, where that is safe (rooms/serving.py).
    write_frame: Callable[[bytes], bool] | None
    # Drops the connection at once, unsent data and all (rooms/serving.py).
    abort: Callable[[], None] | None

    async def on_direct(self, event: dict[str, Any]) -> None: ...


Stored = list[tuple[services.Post, services.StoredMessage]]


# Frames for one socket (as one piece of bytes), and the texts and skips they were made from
# (no skips: a reply to this socket alone, which may have no channel name, as /echo's have not).
Chunk = tuple[bytes, list[str], list[str | None] | None]


class Pending:
    """A room's broadcasts waiting to be written, framed once for all its members.

    Each member's share is everything from where it starts (0, unless it entered the room or
    was handed its share meanwhile: `start`), less the texts it is skipped for. With two
    processes a room hears at least two deliveries per interval, its own batch and another
    process's: kept per room, each member still costs one look and one write per interval,
    and most members share one piece of bytes rather than each get a copy joined for it.
    """

    __slots__ = ("frames", "skipped", "skips", "start", "texts")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.texts: list[str] = []
        self.skips: list[str | None] = []
        self.skipped: set[str | None] = set()
        self.start: dict[str, int] = {}

    def add(self, texts: list[str], skips: list[str | None]) -> None:
        if len(texts) != len(skips):
            # Refused here, where the caller hears of it, rather than in the flush that
            # writes every room's broadcasts and every reply.
            raise ValueError(f"{len(texts)} texts with {len(skips)} skips")
        self.frames.extend([serving.text_frame(text.encode()) for text in texts])
        self.texts.extend(texts)
        self.skips.extend(skips)
        self.skipped.update(skips)

    def share(self, channel_name: str, everything: bytes) -> Chunk | None:
        """One member's frames, once no more texts can be added (`everything` is all of
        them); None if there are none for it."""
        if channel_name not in self.skipped and not self.start.get(channel_name):
            return everything, self.texts, self.skips
        return self.take(channel_name)

    def take(self, channel_name: str) -> Chunk | None:
        """One member's frames so far, which it will not be given again."""
        start = self.start.get(channel_name, 0)
        end = self.start[channel_name] = len(self.frames)
        skips = self.skips[start:end]
        frames = _texts_for(channel_name, self.frames[start:end], skips)
        if not frames:
            return None
        return b"".join(frames), _texts_for(channel_name, self.texts[start:end], skips), None

    def skip_so_far(self, channel_name: str) -> None:
        """A member that enters the room now does not get what was broadcast before."""
        self.start[channel_name] = len(self.frames)


class Pace:
    """How long a process lets messages gather, under load, before it commits a batch: `base`
    while the messages it fans out come slowly, stretching in proportion to their rate up to
    `longest`, which it reaches at `full_rate` messages per second. By as much as the load
    stretches it, the process also holds back its writes to each socket, and what other
    processes send it waits for its own next batch, so that each socket gets one write per
    interval however many processes post to its room.

    Every batch costs the same whatever its size (a commit, a layer message and its receipt,
    and a write to every member of the room, in each process), so that cost per second is set
    by the interval, not by the load. While the load is light the machine has CPU to spare, and
    a short interval spends it on latency; under heavy load every batch fewer is CPU for the
    messages, and tens of milliseconds more go unnoticed. (PostgreSQL's `commit_delay` waits
    only while enough other transactions are active, for the same reason.)
    """

    # The rate is measured over windows this long, each averaged with the one before.
    WINDOW = 0.1

    def __init__(self, base: float, longest: float, full_rate: float) -> None:
        self.base = base
        self.longest = max(base, longest)
        self.full_rate = full_rate
        self.rate = 0.0
        self._counted = 0
        self._window_start = -math.inf

    def count(self, messages: int, now: float) -> None:
        """Note messages fanned out by this process."""
        self._roll(now)
        self._counted += messages

    def interval(self, now: float) -> float:
        self._roll(now)
        if self.full_rate <= 0:
            return self.base
        return min(self.longest, max(self.base, self.longest * self.rate / self.full_rate))

    def stretch(self, now: float) -> float:
        """How much the load has added to the interval: under light load writes are cheap
        enough, and waiting for each other would only add to the latency."""
        return self.interval(now) - self.base

    def load(self, now: float) -> float:
        """How far the load has stretched the interval: 0 while messages come slowly, 1 once
        it is at its longest."""
        span = self.longest - self.base
        return self.stretch(now) / span if span > 0 else 0.0

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed < self.WINDOW:
            return
        if elapsed > 4 * self.WINDOW:
            # After a quiet spell the earlier rate says nothing.
            self.rate = self._counted / elapsed if math.isfinite(elapsed) else 0.0
        else:
            self.rate = (self.rate + self._counted / elapsed) / 2
        self._counted = 0
        self._window_start = now


class MessageWriter:
    """Stores chat messages with group commit: posts that arrive while a write is in flight
    go together in the next one, so the database costs one round trip per batch under load
    and nothing extra when idle. Each batch is published together once committed (see
    `Hub.publish`): written to this process's members and handed on to the other processes
    before its senders are answered."""

    def __init__(
        self,
        may_be_swept: Callable[[], bool],
        publish: Callable[[Stored], Awaitable[None]],
        *,
        pace: Pace,
    ) -> None:
        self._waiting: list[tuple[services.Post, asyncio.Future[services.StoredMessage]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._may_be_swept = may_be_swept
        self._publish = publish
        self.pace = pace
        self._last_batch = -math.inf  # the first batch does not wait
        self._next_batch = math.inf

    def submit(self, post: services.Post) -> "asyncio.Future[services.StoredMessage]":
        """Queue a message for the next batch. The future resolves once it is committed and
        published (NotConnected if the sender was swept); messages are stored in the order
        they were submitted."""
        future: asyncio.Future[services.StoredMessage] = asyncio.get_running_loop().create_future()
        self._waiting.append((post, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return future

    @property
    def busy(self) -> bool:
        """Whether messages of this process wait for their batch, or are in one."""
        return self._draining is not None

    def next_batch(self) -> float:
        """When, on the loop's clock, the writer takes its next batch: the time it waits for
        while messages wait for one, never while it has nothing to wait for."""
        return self._next_batch

    async def idle(self, *, timeout: float) -> None:
        """Return once every submitted message is stored and published (or `timeout` passed)."""
        draining = self._draining
        if draining is not None:
            await asyncio.wait({draining}, timeout=timeout)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                # Under load, fewer and larger batches (see `Pace`); a message that comes after
                # a quiet spell does not wait.
                now = loop.time()
                wait = self._last_batch + self.pace.interval(now) - now
                if wait > 0:
                    self._next_batch = now + wait
                    await asyncio.sleep(wait)
                    self._next_batch = math.inf
                self._last_batch = loop.time()
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                try:
                    stored = await dbthread.run(
                        services.messages_create,
                        posts=[post for post, _ in batch],
                        check_presence=self._may_be_swept(),
                    )
                except Exception as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                published = [
                    (post, message)
                    for (post, _), message in zip(batch, stored, strict=True)
                    if message is not None
                ]
                try:
                    await self._publish(published)
                except Exception:
                    # Stored is stored: the senders still get their acknowledgements.
                    log.exception("could not publish %d stored messages", len(published))
                for (post, future), message in zip(batch, stored, strict=True):
                    if future.done():
                        continue
                    if message is None:
                        future.set_exception(services.NotConnected(post.channel_name))
                    else:
                        future.set_result(message)
        finally:
            self._draining = None
            self._next_batch = math.inf


class Hub:
    def __init__(self, layer: Any) -> None:
        self.layer = layer
        # The in-memory layer cannot reach another process, so there is nothing to relay.
        self.distributed = layer is not None and not isinstance(layer, InMemoryChannelLayer)
        self.process = ""
        self.worker = ""
        self.sockets: set[Socket] = set()
        self.members: dict[str, Member] = {}
        self.rooms: dict[int, dict[str, Member]] = {}
        pace = Pace(
            base=settings.CHAT_BATCH_INTERVAL_MS / 1000,
            longest=settings.CHAT_BATCH_INTERVAL_MAX_MS / 1000,
            full_rate=settings.CHAT_BATCH_FULL_RATE,
        )
        self.writer = MessageWriter(self.may_be_swept, self.publish, pace=pace)
        # A nap much longer than the interval's own stretch would hold up what it paces.
        self.napper = Napper(
            nap=min(settings.CHAT_NAP_MS / 1000, pace.longest / 4),
            awake=NAP_AWAKE,
            load=lambda now: self.pace.load(now),
            until=self._next_work,
        )
        self.layer_healthy = True
        self.shutting_down = False
        self.slow_dropped = 0
        self.undelivered_dropped = 0
        self.backlog_limit: int = settings.CHAT_SEND_BACKLOG_BYTES
        self._orphans: dict[str, bool] = {}
        # Broadcasts waiting to be written, by room (`_deliver`); frames waiting for one socket
        # (`reply`, and its share of its room's broadcasts before them), and the sockets with
        # a reply among them, which go out at the end of this turn of the event loop.
        self._pending: dict[int, Pending] = {}
        # The room each member is in, so that a reply finds its share without a search.
        self._room_of: dict[str, int] = {}
        self._outbox: dict[Member, list[Chunk]] = {}
        self._replied: set[Member] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._flush_due = math.inf
        self._replies_handle: asyncio.Handle | None = None
        self._last_flush = -math.inf
        self._sending: dict[Member, asyncio.Future[None]] = {}
        # Characters handed to a socket's chain of server sends and not yet taken by it: the
        # backlog of a socket the hub cannot write to itself, seen from this side.
        self._unsent: dict[Member, int] = {}
        # Addresses handed out and not yet released: connections seated or being seated.
        self._addresses: set[str] = set()
        self._undelivered: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MAX_UNDELIVERED
        )
        # Room broadcasts waiting for the channel layer, in order per room (`_publish_later`).
        self._to_publish: dict[int, list[dict[str, Any]]] = {}
        self._publishing: asyncio.Task[None] | None = None
        self._healthy_beats = 0
        self._beats = 0
        self._subscribed: set[int] = set()
        self._numbers = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        # Started with the server, not with the hub (see `_pace_the_collector`).
        self.pacer: CollectorPacer | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._emptied = asyncio.Event()
        self._database_ok_since: float | None = None
        self._heartbeat_ok_at: float | None = None
        in_main_thread = threading.current_thread() is threading.main_thread()
        if settings.CHAT_GRACEFUL_SHUTDOWN and in_main_thread:
            _close_on_signals(self)

    @property
    def pace(self) -> Pace:
        """The one pace of this process: its commits and its writes to sockets."""
        return self.writer.pace

    def _next_work(self) -> float:
        """When, on the loop's clock, this process next has work of its own: at once while
        replies wait to be written, else its next write to the sockets or its writer's next
        batch, whichever comes first. A batch being stored does not count: the database
        thread ends the nap when it is done (rooms/nap.py, `wake`)."""
        if self._replies_handle is not None:
            return -math.inf
        return min(self._flush_due, self.writer.next_batch())

    async def start(self, scope: dict[str, Any] | None = None) -> None:
        """Open the mailbox, clear what an earlier incarnation left, start the heartbeat."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            if self.distributed:
                self.process = await self.layer.new_channel("chat")
            else:
                self.process = f"local.{uuid.uuid4().hex}"
            self.worker = settings.CHAT_WORKER_NAME or _worker_name(scope)
            departures = await dbthread.run(
                services.presence_clear_worker, worker=self.worker, keep_process=self.process
            )
            await self._announce(departures)
            self._database_ok_since = self._heartbeat_ok_at = time.monotonic()
            if self.distributed:
                self._tasks.append(asyncio.create_task(self._receive_loop()))
            self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
            self._started = True
            log.info("hub started: worker %s, mailbox %s", self.worker, self.process)

    async def stop(self) -> None:
        """Stop the background tasks (the process is going away)."""
        if self.pacer is not None:
            self.pacer.stop()
        self.napper.stop()
        if self._publishing is not None:
            self._tasks.append(self._publishing)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # channels-redis' receive can ignore a cancel for a while; do not wait on it.
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks.clear()

    async def shutdown(self, *, code: int = CLOSE_GOING_AWAY, grace: float = 3.0) -> None:
        """Close every socket of this process, remove their presence and tell their rooms."""
        if self.shutting_down:
            return
        self.shutting_down = True
        # Closing every socket is no time to sleep.
        self.napper.stop()
        self._flush()
        sockets = list(self.sockets)
        log.info("shutting down: closing %d sockets with %d", len(sockets), code)

        async def close(sock: Socket) -> None:
            try:
                # What the flush handed to the server's own send goes out before the close.
                await self.flush_to(sock)
                await sock.base_send({"type": "websocket.close", "code": code})
            except Exception:
                log.debug("close failed", exc_info=True)

        # All at once, and bounded: a send to a reader that stopped reading can wait for as
        # long as it does not read, and must not hold up everyone else's close.
        closing = {asyncio.ensure_future(close(sock)): sock for sock in sockets}
        if closing:
            _, stuck = await asyncio.wait(closing, timeout=grace)
            for task in stuck:
                task.cancel()
                abort = getattr(closing[task], "abort", None)
                if abort is not None:
                    abort()
            if stuck:
                log.warning("dropped %d sockets that did not take their close", len(stuck))
        if self._started:
            # Posts already accepted are stored and heard before their authors' `left`.
            await self.writer.idle(timeout=grace)
            try:
                departures = await dbthread.run(
                    services.presence_clear_process, process=self.process
                )
            except Exception:
                # The other processes' sweep removes them once this one stops heartbeating.
                log.exception("could not remove this process's presence")
            else:
                for gone in departures:
                    await self.broadcast(
                        gone.room_id, protocol.left(gone.room_name, gone.nick, shame=False)
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.published(), grace)
        # Give clients a moment to answer the close handshake before the server goes.
        if self.sockets:
            self._emptied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), grace)
        await self.stop()
        log.info("shutdown complete")

    def may_be_swept(self) -> bool:
        """Whether another process could have swept this one's connections: only once its
        heartbeat has been missing for a good part of the presence timeout."""
        if self._heartbeat_ok_at is None:
            return True
        since = time.monotonic() - self._heartbeat_ok_at
        return since > settings.CHAT_PRESENCE_TIMEOUT_SECONDS / 2

    def address(self) -> str:
        """A new connection address on this process, unique across the service; `release`
        it once its presence is gone."""
        address = f"{self.process}|{next(self._numbers)}"
        self._addresses.add(address)
        return address

    def release(self, address: str) -> None:
        self._addresses.discard(address)

    def open_socket(self, sock: Socket) -> None:
        self.sockets.add(sock)

    def close_socket(self, sock: Socket) -> None:
        self.sockets.discard(sock)
        if not self.sockets:
            self._emptied.set()

    def attach(self, member: Member) -> None:
        self.members[member.channel_name] = member

    def detach(self, member: Member) -> None:
        self.members.pop(member.channel_name, None)

    def orphan(self, channel_name: str, *, shame: bool) -> None:
        """A closed connection whose presence could not be removed: the heartbeat retries."""
        self._orphans[channel_name] = shame

    async def enter(self, member: Member, room_id: int) -> None:
        """Deliver the room's broadcasts to this member from now on.

        A member is in one room at a time (a connection leaves its room before it enters
        another): what waits is kept by room, so one write to a member of two rooms would
        carry each room's broadcasts in order, but not the two rooms' interleaved.
        """
        local = self.rooms.get(room_id)
        if local is None:
            local = self.rooms[room_id] = {}
        if local.get(member.channel_name) is member:
            return
        local[member.channel_name] = member
        self._room_of[member.channel_name] = room_id
        pending = self._pending.get(room_id)
        if pending is not None:
            pending.skip_so_far(member.channel_name)
        if self.distributed and room_id not in self._subscribed:
            self._subscribed.add(room_id)
            try:
                await self.layer.group_add(group_name(room_id), self.process)
            except Exception:
                # The heartbeat adds it again; until then only local members hear the room.
                self._layer_failed("group_add")

    def leave(self, member: Member, room_id: int) -> None:
        """Stop delivering the room's broadcasts to this member.

        The process stays in the room's group until the next heartbeat finds the room empty:
        unsubscribing here could overtake a later re-subscription on another connection.
        """
        local = self.rooms.get(room_id)
        if local is not None and local.pop(member.channel_name, None) is not None:
            if self._room_of.get(member.channel_name) == room_id:
                del self._room_of[member.channel_name]
            if not member.dropped:
                # What the room heard while it was in still reaches it.
                self._take_share(member, room_id)
            if not local:
                del self.rooms[room_id]

    async def broadcast(self, room_id: int, body: dict[str, Any], skip: str | None = None) -> None:
        """Send one body to every member of a room on every process, except `skip`."""
        await self._fan_out(room_id, [protocol.encode(body)], [skip])

    async def publish(self, stored: Stored) -> None:
        """Broadcast a batch of stored chat messages, each to its room except its sender.

        A room's messages of one batch reach each member in one write, and each other process
        in one layer message: under load, when batches grow, the cost per message shrinks.
        """
        rooms: dict[int, tuple[list[str], list[str | None]]] = {}
        for post, message in stored:
            texts, skips = rooms.setdefault(post.room_id, ([], []))
            body = protocol.chat_broadcast(
                post.room_name,
                post.author,
                post.text,
                message.pk,
                protocol.timestamp(message.created_at),
            )
            texts.append(protocol.encode(body))
            skips.append(post.channel_name)
        for room_id, (texts, skips) in rooms.items():
            try:
                await self._fan_out(room_id, texts, skips, own=True)
            except Exception:
                log.exception("could not publish %d messages to room %d", len(texts), room_id)

    async def _fan_out(
        self, room_id: int, texts: list[str], skips: list[str | None], *, own: bool = False
    ) -> None:
        await self._deliver(room_id, texts, skips, own=own)
        if self.distributed:
            self._publish_later(room_id, texts, skips)

    def _publish_later(self, room_id: int, texts: list[str], skips: list[str | None]) -> None:
        """Hand a room's texts to the other processes, after what already waits to go.

        The layer sends one message at a time per process (channels-redis holds a lock
        around each publish until Redis answers): what arrives for a room meanwhile goes out
        with it as one layer message, so a burst costs one publish per room rather than one
        per broadcast, and nobody waits for Redis to broadcast.
        """
        events = self._to_publish.get(room_id)
        if events is None:
            events = self._to_publish[room_id] = []
        if events and len(events[-1]["texts"]) + len(texts) <= MAX_LAYER_TEXTS:
            events[-1]["texts"].extend(texts)
            events[-1]["skips"].extend(skips)
        else:
            events.append(
                {
                    "type": "room.fanout",
                    "room": room_id,
                    "texts": list(texts),
                    "skips": list(skips),
                    "origin": self.process,
                }
            )
        if self._publishing is None:
            self._publishing = asyncio.create_task(self._publish_waiting())

    async def _publish_waiting(self) -> None:
        try:
            while self._to_publish:
                waiting, self._to_publish = self._to_publish, {}
                for events in waiting.values():
                    for event in events:
                        await self._publish(event)
        finally:
            self._publishing = None

    async def _publish(self, event: dict[str, Any]) -> None:
        if self._undelivered:
            # Keep the order: this one goes out after those still waiting.
            self._hold(event)
            return
        try:
            await self.layer.group_send(group_name(event["room"]), event)
        except Exception:
            # Joins, leaves and renames are replayed once the layer is back; posting is
            # refused until then, so no acknowledged message goes unheard.
            self._hold(event)
            self._layer_failed("group_send")

    async def published(self) -> None:
        """Return once every broadcast so far is with the channel layer (or held for it)."""
        while self._publishing is not None:
            await asyncio.wait({self._publishing})

    def _hold(self, event: dict[str, Any]) -> None:
        if len(self._undelivered) == MAX_UNDELIVERED:
            self.undelivered_dropped += 1
            log.warning(
                "channel layer down too long: dropped the oldest held broadcast (%d so far)",
                self.undelivered_dropped,
            )
        self._undelivered.append(event)

    async def send_to(self, *, process: str, channel_name: str, event: dict[str, Any]) -> None:
        """Hand an event to one connection, wherever it lives."""
        if process == self.process:
            await self._direct(channel_name, event)
        elif self.distributed:
            # Not ahead of the broadcasts before it (a kick after the room heard why).
            await self.published()
            await self.layer.send(process, {"type": "conn.direct", "to": channel_name, **event})
        else:
            # Without a shared layer no other process is reachable: a presence row naming one
            # is left over from an earlier run and is swept soon.
            log.warning("cannot reach %s: it belongs to another process", channel_name)

    async def _deliver(
        self, room_id: int, texts: list[str], skips: list[str | None], *, own: bool = False
    ) -> None:
        """Hand texts, in order, to this process's members of a room; each text skips the
        member named beside it.

        The texts wait, framed, with the room (`Pending`) until the end of this turn of the
        event loop, and under heavy load until as long after the previous write as the load
        has stretched the interval (`Pace.stretch`), or until this process's next batch
        (`_schedule_flush`; `own` says the texts are of that batch). Whatever else reaches
        the room meanwhile - this process's next batch, other processes' messages - joins
        them, and each member gets all of it in one write (`_flush`).
        """
        if not self.rooms.get(room_id):
            return
        loop = asyncio.get_running_loop()
        self.pace.count(len(texts), loop.time())
        if not self.shutting_down:
            self.napper.loaded()
        pending = self._pending.get(room_id)
        if pending is None:
            pending = self._pending[room_id] = Pending()
        pending.add(texts, skips)
        self._schedule_flush(loop, own=own)

    def reply(self, member: Member, text: str) -> bool:
        """Queue one text for one socket, behind what already waits for it in the outbox;
        False where the hub does not write to that socket itself, or a send of the server's
        to it is still in flight (the caller then sends after `flush_to`).

        A reply does not wait for the load: it goes out at the end of this turn of the
        event loop, with the broadcasts that wait for the same socket ahead of it, in one
        write, framed here rather than by the server.
        """
        if member.write_frame is None or member in self._sending:
            return False
        self._take_shares(member)
        self._queue(member, (serving.text_frame(text.encode()), [text], None))
        self._replied.add(member)
        if self._replies_handle is None:
            self._replies_handle = asyncio.get_running_loop().call_soon(self._flush_replies)
        return True

    def _queue(self, member: Member, chunk: Chunk) -> None:
        """Put frames for one socket in the outbox."""
        chunks = self._outbox.get(member)
        if chunks is None:
            self._outbox[member] = chunks = []
        chunks.append(chunk)

    def _take_shares(self, member: Member) -> None:
        """Move a member's share of what waits for its room to its own outbox, so that what
        is queued for it next comes after."""
        room_id = self._room_of.get(getattr(member, "channel_name", None))
        if room_id is not None:
            self._take_share(member, room_id)

    def _take_share(self, member: Member, room_id: int) -> None:
        pending = self._pending.get(room_id)
        if pending is None:
            return
        chunk = pending.take(member.channel_name)
        if chunk is not None:
            self._queue(member, chunk)

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop, *, own: bool) -> None:
        """See that the outbox is written: at once after a quiet spell, else once the load's
        stretch has passed since the last write; and under load, whatever does not come from
        this process's own batches waits for the next one of those, if one is on its way."""
        now = loop.time()
        pace = self.pace
        stretch = pace.stretch(now)
        if stretch > 0 and not own and self.writer.busy:
            # Without this, each socket would get a write for this process's batches and one
            # for another's, at whatever phase they come. Waiting one interval, with `base`
            # to spare for its commit, only matters if that batch is late.
            due = self._last_flush + pace.interval(now) + pace.base
        else:
            due = self._last_flush + stretch
        # A write due already is due: one queued earlier in this turn stays where it is.
        due = max(due, now)
        if self._flush_handle is not None:
            if self._flush_due <= due:
                return
            self._flush_handle.cancel()
        if due == now:
            self._flush_handle = loop.call_soon(self._flush)
            self._flush_due = now
        else:
            self._flush_handle = loop.call_at(due, self._flush)
            self._flush_due = due

    def _flush(self) -> None:
        """Write what waits, by room and by socket: one write per socket."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
            self._flush_due = math.inf
        if not self._outbox and not self._pending:
            # Replies took it all: nothing was written, so the next broadcast need not wait.
            return
        self._last_flush = asyncio.get_running_loop().time()
        pending, self._pending = self._pending, {}
        outbox, self._outbox = self._outbox, {}
        for room_id, waiting in pending.items():
            local = self.rooms.get(room_id)
            if not local:
                continue
            everything = b"".join(waiting.frames)
            for member in tuple(local.values()):
                if self.lagging(member):
                    self.drop_slow(member)
                    outbox.pop(member, None)
                    continue
                chunk = waiting.share(member.channel_name, everything)
                if chunk is None:
                    continue
                earlier = outbox.get(member)
                if earlier is not None:
                    earlier.append(chunk)
                else:
                    self._write(member, [chunk])
        for member, chunks in outbox.items():
            self._write(member, chunks)

    def _flush_replies(self) -> None:
        """Write what the outbox holds for the sockets that have a reply in it."""
        self._replies_handle = None
        replied, self._replied = self._replied, set()
        for member in replied:
            chunks = self._outbox.pop(member, None)
            if chunks is not None:
                self._write(member, chunks)

    def _write(self, member: Member, chunks: list[Chunk]) -> None:
        data = chunks[0][0] if len(chunks) == 1 else b"".join(chunk[0] for chunk in chunks)
        write_frame = member.write_frame
        # Not past texts still on their way through the server's own send.
        if write_frame is not None and member not in self._sending and write_frame(data):
            return
        # Closing, or the server holds frames of its own to send first: go through it.
        texts = [
            text
            for _, chunk_texts, chunk_skips in chunks
            for text in (
                chunk_texts
                if chunk_skips is None
                else _texts_for(member.channel_name, chunk_texts, chunk_skips)
            )
        ]
        self._send_later(member, texts)

    def _send_later(self, member: Member, texts: list[str]) -> None:
        """Send texts to one socket through the server's own send, after what is already on
        its way there, without the caller waiting.

        That send may wait (uvicorn's waits while the socket's buffer is over its high-water
        mark): waiting for it here would hold up the rest of the room, and every room behind
        it, for one reader that does not read.
        """
        previous = self._sending.get(member)
        self._count_unsent(member, sum(map(len, texts)))
        task = asyncio.ensure_future(self._send_texts(member, texts, after=previous))
        self._sending[member] = task

        def sent(_: object) -> None:
            if self._sending.get(member) is task:
                del self._sending[member]

        task.add_done_callback(sent)

    async def flush_to(self, member: Any) -> None:
        """Write what waits for one socket now, before something else is sent to it, so that
        every socket receives everything in the order it was sent."""
        self._take_shares(member)
        chunks = self._outbox.pop(member, None)
        if chunks is not None:
            self._write(member, chunks)
        sending = self._sending.get(member)
        if sending is not None:
            await asyncio.shield(sending)

    async def _send_texts(
        self, member: Member, texts: list[str], after: "asyncio.Future[None] | None" = None
    ) -> None:
        left = sum(map(len, texts))
        try:
            if after is not None:
                await asyncio.wait([after])
            for text in texts:
                await member.base_send({"type": "websocket.send", "text": text})
                left -= len(text)
                self._count_unsent(member, -len(text))
        except Exception:
            # A socket that closed under us; its own disconnect cleans up.
            log.debug(
                "send to %s failed", getattr(member, "channel_name", "a socket"), exc_info=True
            )
        finally:
            # What was never sent waits no longer.
            self._count_unsent(member, -left)

    def _count_unsent(self, member: Member, change: int) -> None:
        unsent = self._unsent.get(member, 0) + change
        if unsent > 0:
            self._unsent[member] = unsent
        else:
            self._unsent.pop(member, None)

    def lagging(self, member: Member) -> bool:
        """Whether more than the limit waits unsent for a socket: on the socket itself, as far
        as the server lets us know, or in the chain of the server's sends (`_send_later`)."""
        backlog = member.backlog
        limit = self.backlog_limit
        return (backlog is not None and backlog() > limit) or self._unsent.get(member, 0) > limit

    def drop_slow(self, sock: Socket) -> None:
        """Disconnect a reader that fell too far behind, rather than buffer for it without
        bound or slow its room down. Its own disconnect removes its presence."""
        if getattr(sock, "dropped", False):
            return
        sock.dropped = True
        channel_name = getattr(sock, "channel_name", None)
        for room_id, local in list(self.rooms.items()):
            if channel_name in local:
                self.leave(local[channel_name], room_id)
        self._outbox.pop(sock, None)
        self.slow_dropped += 1
        log.warning(
            "dropping %s: more than %d bytes unread (%d slow readers dropped so far)",
            channel_name or "a socket",
            self.backlog_limit,
            self.slow_dropped,
        )
        task = asyncio.ensure_future(
            sock.base_send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION})
        )
        task.add_done_callback(_ignore_result)
        abort = getattr(sock, "abort", None)
        if abort is not None:
            # It is not reading, so it will not answer the close, and a polite close would
            # wait to flush a buffer that never drains.
            asyncio.get_running_loop().call_later(SLOW_READER_GRACE, abort)

    async def _direct(self, channel_name: str, event: dict[str, Any]) -> None:
        member = self.members.get(channel_name)
        if member is not None:
            await member.on_direct(event)

    async def _receive_loop(self) -> None:
        while True:
            try:
                event = await self.layer.receive(self.process)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._layer_failed("receive")
                await asyncio.sleep(0.5)
                continue
            self._layer_recovered()
            kind = event.get("type")
            try:
                if kind == "room.fanout":
                    if event["origin"] != self.process:
                        await self._deliver(event["room"], event["texts"], event["skips"])
                elif kind == "conn.direct":
                    await self._direct(event["to"], event)
            except Exception:
                log.exception("could not handle %s", kind)

    async def _heartbeat_loop(self) -> None:
        interval = settings.CHAT_HEARTBEAT_SECONDS
        while True:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat failed; retrying in %ss", interval)

    async def heartbeat(self) -> None:
        """Prove this process alive, heal its group membership, and sweep dead processes."""
        try:
            present = await dbthread.run(services.presence_heartbeat, process=self.process)
        except Exception:
            self._database_ok_since = None
            raise
        self._heartbeat_ok_at = time.monotonic()
        if self._database_ok_since is None:
            self._database_ok_since = self._heartbeat_ok_at
        if self._orphans:
            await self._bury_orphans()
        self._beats += 1
        # Counts that differ tell of a mismatch at once; equal counts can hide two, so the
        # sets are compared now and then regardless.
        if present != len(self.members) or self._beats % RECONCILE_EVERY == 0:
            await self._reconcile()
        if self.distributed:
            await self._resubscribe()
        # After the database comes back, every process needs a heartbeat in before anyone may
        # judge the others dead: sweeping sooner would remove live users.
        timeout = settings.CHAT_PRESENCE_TIMEOUT_SECONDS
        if time.monotonic() - self._database_ok_since >= timeout:
            departures = await dbthread.run(services.presence_sweep, timeout_seconds=timeout)
            await self._announce(departures)

    async def _bury_orphans(self) -> None:
        for channel_name, shame in list(self._orphans.items()):
            gone = await dbthread.run(services.presence_disconnect, channel_name=channel_name)
            del self._orphans[channel_name]
            if gone is not None:
                await self.broadcast(
                    gone.room_id, protocol.left(gone.room_name, gone.nick, shame=shame)
                )

    async def _resubscribe(self) -> None:
        # Re-adding is what survives a Redis restart that lost the groups; it also refreshes
        # the groups' expiry.
        try:
            for room_id in list(self._subscribed):
                if room_id in self.rooms:
                    await self.layer.group_add(group_name(room_id), self.process)
                else:
                    self._subscribed.discard(room_id)
                    await self.layer.group_discard(group_name(room_id), self.process)
            for room_id in self.rooms:
                if room_id not in self._subscribed:
                    await self.layer.group_add(group_name(room_id), self.process)
                    self._subscribed.add(room_id)
            # A layer that is already subscribed may not touch Redis above; this always does.
            await self.layer.group_send(PROBE_GROUP, {"type": "probe"})
        except Exception:
            self._healthy_beats = 0
            self._layer_failed("group_add")
            return
        self._layer_recovered()
        self._healthy_beats += 1
        # Replay one heartbeat after recovery: by then every live process has re-joined its
        # rooms' groups (they heal on their own heartbeats), so the replay reaches them.
        if self._undelivered and self._healthy_beats >= 2:
            await self._replay()

    async def _replay(self) -> None:
        """Publish, in order, the broadcasts that failed while the layer was down."""
        log.info("replaying %d broadcasts held while the layer was down", len(self._undelivered))
        while self._undelivered:
            event = self._undelivered[0]
            try:
                await self.layer.group_send(group_name(event["room"]), event)
            except Exception:
                self._healthy_beats = 0
                self._layer_failed("group_send")
                return
            self._undelivered.popleft()

    async def _reconcile(self) -> None:
        """Make the database's idea of this process's connections match its sockets.

        A socket whose presence another process swept while this one was cut off is closed:
        its nick may already belong to someone else. A row without a socket (its removal was
        lost, as presence commits may be in a database crash) is removed silently: its room
        heard `left` when the socket closed.
        """
        alive = set(await dbthread.run(services.presence_channels, process=self.process))
        # Judged now: a connection seated during the awaits below is not in `alive`, and alive.
        swept = [m for name, m in self.members.items() if name not in alive]
        ghosts = alive - self._addresses - self._orphans.keys()
        if ghosts:
            log.warning("removing %d presence rows with no connection behind them", len(ghosts))
            await dbthread.run(
                services.presence_forget, process=self.process, channel_names=sorted(ghosts)
            )
        for member in swept:
            channel_name = member.channel_name
            if self.members.get(channel_name) is member:
                log.warning("%s was swept while connected; closing it", channel_name)
                try:
                    await member.on_direct(
                        {
                            "body": protocol.fail("connecting", protocol.UNAVAILABLE),
                            "close": CLOSE_TRY_AGAIN_LATER,
                        }
                    )
                except Exception:
                    # Already gone: its own disconnect finishes the job.
                    log.debug("closing %s failed", channel_name, exc_info=True)

    def _layer_failed(self, what: str) -> None:
        if self.layer_healthy:
            log.exception("channel layer %s failed; posting is refused until it recovers", what)
        self.layer_healthy = False

    def _layer_recovered(self) -> None:
        if not self.layer_healthy:
            log.info("channel layer is back")
        self.layer_healthy = True

    async def _announce(self, departures: list[services.Departure]) -> None:
        for gone in departures:
            log.info("swept %s from %s (process %s)", gone.nick, gone.room_name, gone.process)
            await self.broadcast(gone.room_id, protocol.left(gone.room_name, gone.nick, shame=True))
            if self.distributed and gone.process != self.process:
                try:
                    await self.layer.group_discard(group_name(gone.room_id), gone.process)
                except Exception:
                    self._layer_failed("group_discard")


def _texts_for(channel_name: str, items: list[T], skips: list[str | None]) -> list[T]:
    """The texts (or their frames) that one member gets: all but those it is skipped for."""
    return [item for item, skip in zip(items, skips, strict=True) if skip != channel_name]


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


_signals_taken = False


def _close_on_signals(hub: Hub) -> None:
    """On SIGTERM or SIGINT, close every socket with 1001 first, then let the server stop.

    daphne (Twisted) and uvicorn both stop on these signals by themselves but would drop the
    sockets without a proper close and without removing their presence.
    """
    global _signals_taken
    if _signals_taken:
        return
    _signals_taken = True
    loop = asyncio.get_running_loop()

    def wrap(signum: int, previous: Callable[..., Any] | int | None) -> Callable[..., None]:
        def pass_on(_: object = None) -> None:
            server = getattr(previous, "__self__", None)
            if hasattr(server, "should_exit"):
                # uvicorn: ask it to exit, rather than through its handler, which re-raises
                # the signal after shutting down and so exits with 128+signal instead of 0.
                server.should_exit = True
            elif callable(previous):
                previous(signum, None)

        def handler(_signum: int, _frame: object) -> None:
            if hub.shutting_down:
                pass_on()
                return
            loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(hub.shutdown()).add_done_callback(pass_on)
            )

        return handler

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            # Ignored by whoever started us (a shell starts background jobs with SIGINT
            # ignored; nohup ignores SIGHUP): taking it would shut the hub down and leave the
            # server running, closing every new socket at once.
            continue
        signal.signal(signum, wrap(signum, previous))


def _worker_name(scope: dict[str, Any] | None) -> str:
    server = scope.get("server") if scope else None
    where = server[1] if server and server[1] is not None else f"pid{os.getpid()}"
    return f"{socket.gethostname()}:{where}"


_starting: set[asyncio.Task[None]] = set()


def start_with_server() -> None:
    """Start this process's hub as soon as daphne runs, rather than at its first chat
    connection: a worker nobody is connected to must still heartbeat, and sweep the users of
    workers that died. daphne has no lifespan events; it loads the application before its
    reactor runs, so the start is queued on the reactor. (uvicorn says when it starts through
    the ASGI lifespan protocol: see `lifespan`.)"""
    if not settings.CHAT_HUB_AT_STARTUP or "daphne.server" not in sys.modules:
        return
    from twisted.internet import reactor

    # Under uvicorn daphne.server is imported too (INSTALLED_APPS), but its reactor never
    # runs. callLater runs inside the asyncio loop that daphne's reactor drives.
    reactor.callWhenRunning(lambda: reactor.callLater(0, _start_in_background))


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI lifespan protocol (uvicorn): start the hub when the server starts."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if settings.CHAT_HUB_AT_STARTUP:
                # In the background: a database or layer that is down does not stop the server.
                _start_in_background()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            # Sockets were closed on the signal already (`_close_on_signals`).
            await send({"type": "lifespan.shutdown.complete"})
            return


def _start_in_background() -> None:
    hub = get_hub()
    _pace_the_collector(hub)
    task = asyncio.ensure_future(_start_until_started(hub))
    _starting.add(task)
    task.add_done_callback(_starting.discard)


def _pace_the_collector(hub: Hub) -> None:
    """Take what the server has loaded by the time it runs (Django, the app, every module)
    out of the garbage collector's way, and from then on what its connections keep alive
    (see rooms/collector.py).

    Left to the collector, each full collection walks all of it again: 60-75 ms with the
    event loop stopped on a 2-core machine under load for the modules alone, which set the
    p99 latency of whole benchmark runs, and more with every connection.
    """
    if hub.pacer is None:
        hub.pacer = CollectorPacer(
            freeze_at=settings.CHAT_GC_FREEZE_AT, full_every=settings.CHAT_GC_FULL_SECONDS
        )
        hub.pacer.full()
        hub.pacer.start()


async def _start_until_started(hub: Hub) -> None:
    while not hub._started:
        try:
            await hub.start()
        except Exception:
            log.warning(
                "could not start the hub yet (database or channel layer down?); retrying",
                exc_info=True,
            )
            await asyncio.sleep(settings.CHAT_HEARTBEAT_SECONDS)


_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]" = weakref.WeakKeyDictionary()


def get_hub() -> Hub:
    """The hub of the running event loop (one per server process)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = Hub(get_channel_layer())
    return hub
