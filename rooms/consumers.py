"""The WebSocket shells: decode a frame, validate it in `protocol`, call one service or
selector, reply, and fan out through the hub."""

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError

from rooms import dbthread, protocol, selectors, services
from rooms.hub import Hub, get_hub
from rooms.limits import RateLimiter
from rooms.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NO_STATUS,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNSUPPORTED_DATA,
    ProtocolError,
)
from rooms.serving import aborter, backlog_gauge, dropped_without_close, frame_writer

log = logging.getLogger(__name__)


class FrameGuard(AsyncJsonWebsocketConsumer):
    """What every JSON endpoint shares: no per-connection layer mailbox, no per-frame
    database hop, bounded frames, flood control, a reply instead of a traceback for bad
    input, and a 1001 close when the server shuts down."""

    # Broadcasts and direct events reach the socket through the process hub, so the consumer
    # does not open a channel-layer mailbox of its own (one fewer layer receive per recipient
    # per message, and less memory per idle connection).
    channel_layer_alias = None

    hub: Hub
    limiter: RateLimiter
    max_frame_bytes: int
    max_message_chars: int
    backlog: Callable[[], int] | None = None
    write_frame: Callable[[bytes], bool] | None = None
    abort: Callable[[], None] | None = None
    dropped = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # channels' loop (await_many_dispatch) wraps every receive in a new task and an
        # asyncio.wait, so that it can listen to a layer mailbox too; there is none here, and
        # reading the socket directly saves both on every frame.
        if self.channel_layer_alias is not None:
            # A subclass that wants a mailbox gets channels' own loop.
            await super().__call__(scope, receive, send)
            return
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        except asyncio.CancelledError:
            # The server gave up waiting for this consumer (daphne cancels it some seconds
            # after its socket closed) before the disconnect was handled.
            self.abandoned()
            raise

    def abandoned(self) -> None:
        """Forget a socket whose disconnect will never be handled."""
        hub = getattr(self, "hub", None)
        if hub is not None:
            hub.close_socket(self)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # AsyncConsumer.dispatch awaits aclose_old_connections() - a thread hop - before every
        # frame. Every database call here goes through rooms.dbthread, which closes
        # stale connections around itself, so the hop would buy nothing.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        try:
            await handler(message)
        except OSError:
            if message["type"] == "websocket.disconnect":
                raise
            # The peer went away while we were answering it (uvicorn's send raises
            # ClientDisconnected, an OSError, rather than queueing the disconnect first): leave
            # the way every closed socket leaves, or its seat would outlive it.
            log.debug("peer of %s gone mid-send", self.scope.get("path"), exc_info=True)
            await self.websocket_disconnect(
                {"type": "websocket.disconnect", "code": CLOSE_NO_STATUS}
            )

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return protocol.encode(content)

    async def send_body(self, body: dict[str, Any]) -> None:
        text = self.reply_now(body)
        if text is not None:
            await self.send_after_queued(text)

    def reply_now(self, body: dict[str, Any]) -> str | None:
        """Queue a reply with the hub, without waiting; the encoded text where the caller must
        send it itself (`send_after_queued`), None where nothing is left to do."""
        # A client that sends but never reads its replies is a slow reader too: under uvicorn
        # this send would block on flow control, under daphne the replies would pile up.
        if self.hub.lagging(self):
            self.hub.drop_slow(self)
            return None
        text = protocol.encode(body)
        if self.hub.reply(self, text):
            return None
        return text

    async def send_after_queued(self, text: str) -> None:
        """Send through the server, after what the hub holds for this socket."""
        await self.hub.flush_to(self)
        await self.base_send({"type": "websocket.send", "text": text})

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        await self.hub.flush_to(self)
        await super().close(code, reason)

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        self.hub = get_hub()
        self.hub.open_socket(self)
        await self.accept()
        if self.hub.shutting_down:
            await self.close(CLOSE_GOING_AWAY)
            return
        self.limiter = RateLimiter(
            rate=settings.CHAT_RATE_PER_SEC,
            burst=settings.CHAT_RATE_BURST,
            max_strikes=settings.CHAT_RATE_STRIKES,
        )
        # Read once per connection rather than through Django's lazy settings on every frame.
        self.max_frame_bytes = settings.CHAT_MAX_FRAME_BYTES
        self.max_message_chars = settings.CHAT_MAX_MESSAGE_CHARS
        self.backlog = backlog_gauge(self.base_send, settings.CHAT_SEND_BACKLOG_BYTES)
        self.write_frame = frame_writer(self.base_send)
        self.abort = aborter(self.base_send)
        await self.opened()

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        self.hub.close_socket(self)
        await self.closed(message.get("code"))
        raise StopConsumer

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        if text is None:
            await self.answered()
            await self.close(CLOSE_UNSUPPORTED_DATA)
            return
        if _too_big(text, self.max_frame_bytes):
            await self.answered()
            await self.close(CLOSE_TOO_BIG)
            return
        if not self.limiter.allow():
            await self.answered()
            await self.send_body(protocol.fail(protocol.peek_action(text), protocol.SLOW_DOWN))
            if self.limiter.exhausted:
                await self.close(CLOSE_POLICY_VIOLATION)
            return
        await self.receive_text(text)

    async def opened(self) -> None:
        """The socket was accepted."""

    async def answered(self) -> None:
        """Return once every earlier frame has its answer: replies go out in frame order."""

    async def closed(self, code: int | None) -> None:
        """The socket is gone; `code` is the close code the server reported."""

    async def receive_text(self, text: str) -> None:
        raise NotImplementedError


def _too_big(text: str, limit: int) -> bool:
    # A UTF-8 character takes 1 to 4 bytes: only frames in between need encoding to measure.
    if len(text) > limit:
        return True
    return len(text) * 4 > limit and len(text.encode()) > limit


class EchoConsumer(FrameGuard):
    """/echo: every JSON value sent comes back as {"echo": value}."""

    async def receive_text(self, text: str) -> None:
        try:
            value = protocol.decode_value(text)
        except ProtocolError as refused:
            await self.send_body(protocol.fail(None, refused.message))
            return
        await self.send_body(protocol.echo(value))


Action = Callable[["ChatConsumer", dict[str, Any]], Awaitable[None]]


# A connection's posts are stored and answered in order while it goes on reading; once this
# many wait for their commit, the socket is not read until the oldest is through. That bounds
# what one connection holds (this many texts of at most CHAT_MAX_MESSAGE_CHARS), and it caps
# what one connection can post at this many per batch: at the longest default interval (40 ms)
# a window of 32 held each sender to 800 posts a second, 256 allows 6,400.
MAX_POSTS_IN_FLIGHT = 256


class ChatConsumer(FrameGuard):
    """/chat: rooms and nicknames, as described in docs/protocol.md."""

    seat: services.Seat | None = None
    # Posts waiting for their commit, in the order they came, with their texts; the head is
    # answered first (`_answer_posts`).
    _posts: collections.deque[tuple[str, "asyncio.Future[services.StoredMessage]"]]
    # An answer that could not be queued at once, and is being sent; later ones wait for it.
    _answering: "asyncio.Task[None] | None" = None
    _posts_moved: asyncio.Event

    async def opened(self) -> None:
        self._posts = collections.deque()
        self._posts_moved = asyncio.Event()
        try:
            await self.hub.start(self.scope)
            self.channel_name = self.hub.address()
            seat = await dbthread.run(
                services.presence_connect,
                channel_name=self.channel_name,
                process=self.hub.process,
                worker=self.hub.worker,
            )
        except Exception:
            log.exception("could not seat a new connection")
            await self.send_body(protocol.fail("connecting", protocol.UNAVAILABLE))
            await self.close(CLOSE_TRY_AGAIN_LATER)
            return
        self.seat = seat
        self.hub.attach(self)
        try:
            await self.send_body(protocol.connecting(seat.room_name, seat.nick))
            await self.hub.enter(self, seat.room_id)
            await self._broadcast(protocol.joined(seat.room_name, seat.nick))
            await self._send_history(
                seat.room_name, room_id=seat.room_id, limit=settings.CHAT_HISTORY_DEFAULT
            )
        except Exception:
            # Seated but not fully greeted: close, and let closed() take the seat back.
            log.exception("could not finish connecting %s", self.channel_name)
            await self.close(CLOSE_INTERNAL_ERROR)

    async def closed(self, code: int | None) -> None:
        try:
            await self._unseat(code)
        finally:
            address = getattr(self, "channel_name", None)
            if address is not None:
                self.hub.release(address)

    def abandoned(self) -> None:
        super().abandoned()
        if self._leave_hub():
            # As when _unseat itself is cancelled: the heartbeat takes the seat back and tells
            # the room, so that the nick is not held until the process restarts.
            self.hub.orphan(self.channel_name, shame=False)
            self.hub.release(self.channel_name)

    def _leave_hub(self) -> bool:
        """Stop this connection's deliveries; False if it was not seated (or already left)."""
        seat = self.seat
        if seat is None:
            return False
        self.seat = None
        self.hub.detach(self)
        self.hub.leave(self, seat.room_id)
        return True

    async def _unseat(self, code: int | None) -> None:
        if not self._leave_hub():
            return
        shame = dropped_without_close(self.base_send, code)
        try:
            # Posts sent before the socket closed are stored and heard before it leaves.
            await self.answered()
            gone = await dbthread.run(services.presence_disconnect, channel_name=self.channel_name)
        except asyncio.CancelledError:
            # The server stopped waiting for this consumer: the heartbeat takes the seat back
            # and tells the room, as for any seat whose removal failed.
            self.hub.orphan(self.channel_name, shame=shame)
            raise
        except Exception:
            log.warning("could not clear presence of %s; retrying later", self.channel_name)
            self.hub.orphan(self.channel_name, shame=shame)
            return
        if gone is not None:
            await self.hub.broadcast(
                gone.room_id, protocol.left(gone.room_name, gone.nick, shame=shame)
            )

    async def receive_text(self, text: str) -> None:
        if self.seat is None:
            return
        try:
            action, body = protocol.decode(text)
        except ProtocolError as refused:
            await self.answered()
            await self.send_body(protocol.fail(None, refused.message))
            return
        handler = self.actions.get(action)
        if handler is not ChatConsumer.chat_message:
            # Only posts overlap (see chat_message); anything else waits for them to be through.
            await self.answered()
        if handler is None:
            await self.send_body(protocol.fail(action, protocol.NOT_ALLOWED))
            return
        try:
            await handler(self, body)
        except Exception as error:
            await self.answered()
            await self._refuse(action, error)

    async def _refuse(self, action: str, error: Exception) -> None:
        """Answer an action that failed: a failure body, never a traceback."""
        if isinstance(error, ProtocolError):
            await self.send_body(protocol.fail(error.action, error.message))
        elif isinstance(error, services.NotConnected):
            # Another process swept this connection while its own could not heartbeat; its
            # nick may be someone else's by now, so the client must start over.
            await self.send_body(protocol.fail(action, protocol.UNAVAILABLE))
            await self.close(CLOSE_TRY_AGAIN_LATER)
        elif isinstance(error, OperationalError | InterfaceError):
            # The database is unreachable: expected during an outage, one line per refusal.
            log.warning("database unavailable in %s: %s", action, error)
            await self.send_body(protocol.fail(action, protocol.UNAVAILABLE))
        elif isinstance(error, DatabaseError):
            log.error("database error in %s", action, exc_info=error)
            await self.send_body(protocol.fail(action, protocol.UNAVAILABLE))
        else:
            log.error("error in %s", action, exc_info=error)
            await self.send_body(protocol.fail(action, protocol.INTERNAL_ERROR))

    async def on_direct(self, event: dict[str, Any]) -> None:
        """An event addressed to this one connection, from any process."""
        if "body" in event:
            await self.send_body(event["body"])
        if "close" in event:
            await self.close(event["close"])

    async def _broadcast(self, body: dict[str, Any]) -> None:
        assert self.seat is not None
        await self.hub.broadcast(self.seat.room_id, body, skip=self.channel_name)

    async def _send_history(self, room: str, **page: Any) -> None:
        """Send a history page of a room; `page` selects it (see selectors.message_history)."""
        messages = await dbthread.run(selectors.message_history, **page)
        await self.send_body(protocol.history(room, messages))

    async def set_nick(self, body: dict[str, Any]) -> None:
        nick = protocol.nick_from(body)
        try:
            previous, seat = await dbthread.run(
                services.nick_set, channel_name=self.channel_name, nick=nick
            )
        except services.NickInUse:
            raise ProtocolError("set_nick", protocol.NICK_IN_USE) from None
        self.seat = seat
        await self.send_body(protocol.ok("set_nick"))
        if previous != seat.nick:
            await self._broadcast(protocol.nick_changed(seat.room_name, previous, seat.nick))

    async def join_room(self, body: dict[str, Any]) -> None:
        room = protocol.room_from(body)
        try:
            old, new = await dbthread.run(
                services.room_join, channel_name=self.channel_name, room_name=room
            )
        except services.AlreadyInRoom:
            raise ProtocolError("join_room", protocol.ALREADY_IN_ROOM) from None
        self.hub.leave(self, old.room_id)
        self.seat = new
        await self.hub.broadcast(old.room_id, protocol.left(old.room_name, old.nick, shame=False))
        await self.send_body(protocol.ok("join_room"))
        await self.hub.enter(self, new.room_id)
        await self._broadcast(protocol.joined(new.room_name, new.nick))

    async def chat_message(self, body: dict[str, Any]) -> None:
        assert self.seat is not None
        text = protocol.message_text_from(body, self.max_message_chars)
        if not self.hub.layer_healthy:
            # It could be stored but not delivered to the other processes' members.
            raise ProtocolError("chat_message", protocol.UNAVAILABLE)
        seat = self.seat
        while len(self._posts) >= MAX_POSTS_IN_FLIGHT:
            # Stop reading this socket until its oldest post is through.
            await self._post_answered()
        # The hub broadcasts the message once it is stored; this socket goes on reading
        # meanwhile, so a client's next post does not wait for this one's commit.
        stored = self.hub.writer.submit(
            services.Post(
                channel_name=self.channel_name,
                room_id=seat.room_id,
                room_name=seat.room_name,
                author=seat.nick,
                text=text,
            )
        )
        self._posts.append((text, stored))
        stored.add_done_callback(self._answer_posts)

    def _answer_posts(self, _: object = None) -> None:
        """Answer the posts at the head of the queue whose commit is through, in order.

        A callback rather than a task per post: under load this runs for every message, and
        a task plus an asyncio.wait for the post before it cost more than the answer itself.
        """
        posts = self._posts
        while self._answering is None and posts and posts[0][1].done():
            text, stored = posts.popleft()
            self._posts_moved.set()
            if stored.cancelled():
                continue
            unsent = None
            try:
                refused = stored.exception()
                if refused is None:
                    message = stored.result()
                    ts = protocol.timestamp(message.created_at)
                    unsent = self.reply_now(protocol.chat_ack(text, message.pk, ts))
            except Exception as error:
                # Raised in a callback, it would vanish into the loop's handler and leave
                # the posts behind this one unanswered, and answered() waiting forever.
                refused = error
            if refused is not None:
                self._answer_later(self._refuse("chat_message", refused))
                return
            if unsent is not None:
                self._answer_later(self.send_after_queued(unsent))
                return

    def _answer_later(self, answer: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await answer
            except Exception:
                # The client left before its answer: its disconnect cleans up.
                log.debug("could not answer a post of %s", self.channel_name, exc_info=True)
            finally:
                # Even when cancelled: the posts behind this one still need their answers.
                self._answering = None
                self._posts_moved.set()
                asyncio.get_running_loop().call_soon(self._answer_posts)

        self._answering = asyncio.ensure_future(run())

    async def _post_answered(self) -> None:
        self._posts_moved.clear()
        await self._posts_moved.wait()

    async def answered(self) -> None:
        """Return once every post received so far has been answered."""
        while self._posts or self._answering is not None:
            await self._post_answered()

    async def user_list(self, body: dict[str, Any]) -> None:
        assert self.seat is not None
        room = protocol.user_list_room_from(body, self.seat.room_name)
        users = await dbthread.run(selectors.room_users, room_name=room)
        await self.send_body(protocol.user_list(room, users))

    async def history(self, body: dict[str, Any]) -> None:
        assert self.seat is not None
        query = protocol.history_query_from(
            body,
            current=self.seat.room_name,
            default_limit=settings.CHAT_HISTORY_DEFAULT,
            max_limit=settings.CHAT_HISTORY_MAX,
        )
        await self._send_history(
            query.room,
            room_name=query.room,
            before=query.before,
            after=query.after,
            limit=query.limit,
        )

    async def room_list(self, body: dict[str, Any]) -> None:
        rooms = await dbthread.run(selectors.room_list)
        await self.send_body(protocol.room_list(rooms))

    actions: dict[str, Action] = {
        "set_nick": set_nick,
        "join_room": join_room,
        "chat_message": chat_message,
        "user_list": user_list,
        "history": history,
        "room_list": room_list,
    }
