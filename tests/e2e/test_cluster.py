"""Two real server processes (daphne and/or uvicorn) on PostgreSQL and Redis: what one worker's
clients see of the other's, and what happens when a worker is killed or stopped, when Redis
restarts and when the database is unreachable for a while.

Each test runs on a fresh copy of a migrated PostgreSQL database and its own channel-layer
prefix, so no test sees another's users, rooms or messages. After each test, every server the
test did not stop on purpose must still be running.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from websockets.exceptions import ConnectionClosed

from rooms import protocol
from tests.e2e.client import FRAME_TIMEOUT, Peer, join_chat, open_ws
from tests.e2e.faults import RedisServer, TcpProxy, eventually, http_get
from tests.e2e.harness import KINDS, REPO_ROOT, ServerError, ServerProcess, server_env

pytestmark = pytest.mark.e2e

UNAVAILABLE = protocol.UNAVAILABLE
NICK_IN_USE = protocol.NICK_IN_USE
# The server's defaults (chatsite/settings.py), which these tests do not change.
HEARTBEAT = 2.0
PRESENCE_TIMEOUT = 6.0
# How long the tests allow for a dead worker's users to be swept, and for the chat to work
# again after Redis or the database comes back.
RECOVERY = 15.0

Frame = dict[str, Any]
T = TypeVar("T")


# --- databases ------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _admin(postgres_url: str) -> Any:
    import psycopg

    return psycopg.connect(postgres_url, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="module")
def cluster_template(postgres_url: str) -> Iterator[str]:
    """A database migrated once for this module; each test gets a copy of it."""
    from psycopg import sql

    name = f"chat_e2e_tpl_{uuid.uuid4().hex[:12]}"
    url = _with_database(postgres_url, name)
    with _admin(postgres_url) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            done = subprocess.run(
                [sys.executable, "manage.py", "migrate", "--noinput"],
                cwd=REPO_ROOT,
                env=server_env(url),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise ServerError(
                    f"migrate of {name} exited with {done.returncode}:\n"
                    f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
                )
            yield url
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def cluster_db(postgres_url: str, cluster_template: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own (a copy of the module's template)."""
    from psycopg import sql

    template = urlsplit(cluster_template).path.lstrip("/")
    name = f"chat_e2e_{uuid.uuid4().hex[:12]}"
    with _admin(postgres_url) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
        try:
            yield _with_database(postgres_url, name)
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# --- the cluster ----------------------------------------------------------------------------


class Cluster:
    """Worker processes of one test, sharing its database and channel layer.

    The layer is the machine's Redis under a prefix of the test's own, unless `start` is given
    another (`default_layer` is only called then, so tests on their own redis-server do not
    need the machine's).
    """

    def __init__(
        self, factory: Any, database_url: str, default_layer: Callable[[], Mapping[str, str]]
    ) -> None:
        self.factory = factory
        self.database_url = database_url
        self.default_layer = default_layer
        self.workers: list[ServerProcess] = []
        self._may_exit: set[int] = set()

    async def start(
        self,
        *kinds: str,
        database_url: str | None = None,
        layer_env: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> list[ServerProcess]:
        """Start one worker per kind, in parallel, each with a CHAT_WORKER_NAME of its own."""
        servers = []
        for kind in kinds:
            name = f"e2e-{len(self.workers)}-{kind}"
            server = self.factory.create(
                kind,
                database_url=database_url or self.database_url,
                env={
                    **(self.default_layer() if layer_env is None else layer_env),
                    "CHAT_WORKER_NAME": name,
                    **(env or {}),
                },
                migrate=False,  # the database is a copy of a migrated one
            )
            self.workers.append(server)
            servers.append(server)
        await all_of(*(asyncio.to_thread(server.start) for server in servers))
        return servers

    def may_exit(self, server: ServerProcess) -> None:
        """The test stops this worker on purpose."""
        self._may_exit.add(id(server))

    def assert_alive(self) -> None:
        """Every worker the test did not stop on purpose is still running."""
        dead = [
            server
            for server in self.workers
            if id(server) not in self._may_exit and not server.running
        ]
        if dead:
            raise ServerError(
                "worker(s) died unexpectedly:\n"
                + "\n".join(
                    f"===== {server!r} exited with {server.returncode} =====\n{server.output()}"
                    for server in dead
                )
            )


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, cluster_db: str, server_factory: Any
) -> Iterator[Cluster]:
    # cluster_db before server_factory: the servers stop before their database is dropped.
    cluster = Cluster(server_factory, cluster_db, lambda: request.getfixturevalue("redis_url").env)
    yield cluster
    cluster.assert_alive()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free port, which the test may restart."""
    redis = RedisServer()
    try:
        redis.start()
        yield redis
    finally:
        output = redis.output()
        redis.close()
        print(f"===== {redis!r} =====\n{output}")


@pytest.fixture
def pg_proxy(cluster_db: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test's PostgreSQL, which the test may cut."""
    target = urlsplit(cluster_db)
    with TcpProxy(target.port or 5432, target.hostname or "127.0.0.1") as proxy:
        yield proxy


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print a measurement so that it shows in the run's output, captured or not."""
    with capsys.disabled():
        print(f"\n[e2e] {line}", flush=True)


# --- clients --------------------------------------------------------------------------------


class Member:
    """A /chat client that keeps every frame it got, and can wait for a particular one.

    Frames read while waiting for another are kept, in order, for `frame` and later waits.
    """

    def __init__(self, peer: Peer, where: ServerProcess) -> None:
        self.peer = peer
        self.where = where
        self.seen: list[Frame] = list(peer.pending)

    def __repr__(self) -> str:
        return f"<Member {self.nick} on {self.where.kind}:{self.where.port}>"

    @property
    def nick(self) -> str:
        return self.peer.nick

    @property
    def ws(self) -> Any:
        return self.peer.ws

    async def _read(self, timeout: float) -> Frame:
        frame = json.loads(await asyncio.wait_for(self.peer.ws.recv(), timeout))
        self.seen.append(frame)
        return frame

    async def frame(self, timeout: float = FRAME_TIMEOUT) -> Frame:
        """The next frame, in the order it arrived."""
        if self.peer.pending:
            return self.peer.pending.popleft()
        return await self._read(timeout)

    async def expect(
        self, match: Callable[[Frame], bool], *, timeout: float = FRAME_TIMEOUT, what: str = ""
    ) -> Frame:
        """The first frame, kept or new, that `match`es; the others stay kept."""
        for index, frame in enumerate(self.peer.pending):
            if match(frame):
                del self.peer.pending[index]
                return frame
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                frame = await self._read(remaining)
            except TimeoutError:
                raise AssertionError(
                    f"{self!r}: no {what or 'matching frame'} within {timeout:.1f}s; "
                    f"other frames: {list(self.peer.pending)}"
                ) from None
            if match(frame):
                return frame
            self.peer.pending.append(frame)

    async def reply(self, action: str, *, timeout: float = FRAME_TIMEOUT) -> Frame:
        return await self.expect(
            lambda f: f.get("action") == action and "success" in f,
            timeout=timeout,
            what=f"reply to {action}",
        )

    async def ask(self, body: Frame, *, timeout: float = FRAME_TIMEOUT) -> Frame:
        await self.peer.send(body)
        return await self.reply(body["action"], timeout=timeout)

    async def set_nick(self, nick: str) -> None:
        answer = await self.ask({"action": "set_nick", "nick": nick})
        assert answer == protocol.ok("set_nick"), (self, answer)
        self.peer.nick = nick

    async def join(self, room: str) -> None:
        answer = await self.ask({"action": "join_room", "room": room})
        assert answer == protocol.ok("join_room"), (self, answer)
        self.peer.room = room

    async def post(self, text: str, *, timeout: float = FRAME_TIMEOUT) -> Frame:
        """Send a chat message; its reply (an ack or a failure)."""
        return await self.ask({"action": "chat_message", "message": text}, timeout=timeout)

    async def users(self, room: str | None = None) -> list[str]:
        body: Frame = {"action": "user_list"}
        if room is not None:
            body["room"] = room
        answer = await self.ask(body)
        assert answer["success"] is True, answer
        return answer["users"]

    async def history(self, room: str) -> list[Frame]:
        """Every stored message of a room, oldest first (all pages)."""
        messages: list[Frame] = []
        after = 0
        for _ in range(100):
            page = await self.ask({"action": "history", "room": room, "after": after, "limit": 200})
            assert page["success"] is True, page
            messages += page["messages"]
            if len(page["messages"]) < 200:
                return messages
            after = page["messages"][-1]["id"]
        raise AssertionError("history has more than 100 pages")

    async def broadcast_of(self, text: str, *, timeout: float = FRAME_TIMEOUT) -> Frame:
        return await self.expect(
            lambda f: (
                f.get("action") == "chat_message"
                and "success" not in f
                and f.get("message") == text
            ),
            timeout=timeout,
            what=f"broadcast of {text!r}",
        )

    async def left_of(self, nick: str, room: str, *, timeout: float = FRAME_TIMEOUT) -> Frame:
        return await self.expect(
            lambda f: f.get("action") == "left" and f.get("user") == nick and f.get("room") == room,
            timeout=timeout,
            what=f"left of {nick} from {room}",
        )


async def member(server: ServerProcess, clients: AsyncExitStack) -> Member:
    return Member(await join_chat(server.url("/chat"), clients), server)


async def all_of(*waits: Awaitable[T]) -> list[T]:
    """Await them all, concurrently; then raise the first failure, if any. Unlike a bare
    gather, no wait is left running on a socket after another failed."""
    results = await asyncio.gather(*waits, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


async def healthz(server: ServerProcess) -> tuple[int, Frame]:
    status, body = await http_get(server.port, "/healthz")
    return status, json.loads(body)


async def until_health(server: ServerProcess, status: int, *, timeout: float) -> Frame:
    """Poll /healthz until it answers `status`; its body."""

    async def check() -> Frame | None:
        got, body = await healthz(server)
        return body if got == status else None

    return await eventually(check, timeout=timeout, what=f"{server!r} /healthz {status}")


def assert_acked_in_history(acked: Mapping[int, tuple[str, str]], history: list[Frame]) -> None:
    """Every message acked to its sender is stored as acked: id, author and text."""
    stored = {message["id"]: (message["user"], message["message"]) for message in history}
    missing = {pk: what for pk, what in acked.items() if stored.get(pk) != what}
    assert not missing, f"acked but not in history: {missing}"


# --- 1. cross-process behaviour -------------------------------------------------------------


@pytest.mark.parametrize(
    "kinds",
    [("daphne", "daphne"), ("uvicorn", "uvicorn"), ("daphne", "uvicorn")],
    ids=lambda kinds: "+".join(kinds),
)
async def test_two_workers_share_rooms_nicks_messages_and_history(cluster, clients, kinds):
    one, two = await cluster.start(*kinds)
    alice = await member(one, clients)
    bob = await member(two, clients)
    assert await alice.frame() == protocol.joined("Default", bob.nick)

    old = alice.nick
    await alice.set_nick("alice")
    assert await bob.frame() == protocol.nick_changed("Default", old, "alice")
    old = bob.nick
    await bob.set_nick("bob")
    assert await alice.frame() == protocol.nick_changed("Default", old, "bob")
    # Nicks are unique across processes, whatever the case.
    assert await bob.ask({"action": "set_nick", "nick": "ALICE"}) == protocol.fail(
        "set_nick", NICK_IN_USE
    )

    # Fan-out, both ways.
    ack = await alice.post("from one")
    assert ack == protocol.chat_ack("from one", ack["id"], ack["ts"])
    assert await bob.frame() == protocol.chat_broadcast(
        "Default", "alice", "from one", ack["id"], ack["ts"]
    )
    back = await bob.post("from two")
    assert back["success"] is True, back
    assert await alice.frame() == protocol.chat_broadcast(
        "Default", "bob", "from two", back["id"], back["ts"]
    )
    assert back["id"] > ack["id"]

    # A third client, on worker one: both hear it join, and its greeting holds the history.
    carol = await member(one, clients)
    assert await alice.frame() == protocol.joined("Default", carol.nick)
    assert await bob.frame() == protocol.joined("Default", carol.nick)
    expected_history = [
        {"id": ack["id"], "user": "alice", "message": "from one", "ts": ack["ts"]},
        {"id": back["id"], "user": "bob", "message": "from two", "ts": back["ts"]},
    ]
    assert carol.peer.history["messages"] == expected_history
    for peer in (alice, bob, carol):
        assert await peer.users() == ["alice", "bob", carol.nick], peer
        assert await peer.history("Default") == expected_history, peer
        assert await peer.ask({"action": "room_list"}) == protocol.room_list(
            [{"room": "Default", "users": 3}]
        ), peer

    # A room with a non-ASCII name, entered from both workers.
    room = "数学 ☕ café"
    await alice.join(room)
    assert await bob.frame() == protocol.left("Default", "alice", shame=False)
    assert await carol.frame() == protocol.left("Default", "alice", shame=False)
    await bob.join(room)
    assert await alice.frame() == protocol.joined(room, "bob")
    assert await carol.frame() == protocol.left("Default", "bob", shame=False)
    text = "你好, 世界 🌏\nzweite Zeile"
    said = await bob.post(text)
    assert said["success"] is True, said
    assert await alice.frame() == protocol.chat_broadcast(room, "bob", text, said["id"], said["ts"])
    answer = await alice.post("ça va? 👍")
    assert answer["success"] is True, answer
    assert await bob.frame() == protocol.chat_broadcast(
        room, "alice", "ça va? 👍", answer["id"], answer["ts"]
    )
    room_history = [
        {"id": said["id"], "user": "bob", "message": text, "ts": said["ts"]},
        {"id": answer["id"], "user": "alice", "message": "ça va? 👍", "ts": answer["ts"]},
    ]
    rooms = protocol.room_list([{"room": room, "users": 2}, {"room": "Default", "users": 1}])
    for peer in (alice, bob, carol):
        assert await peer.users(room) == ["alice", "bob"], peer
        assert await peer.users("Default") == [carol.nick], peer
        assert await peer.history(room) == room_history, peer
        assert await peer.history("Default") == expected_history, peer
        assert await peer.ask({"action": "room_list"}) == rooms, peer
    # Nothing said in the room reached carol, who is not in it.
    await carol.peer.assert_silent()

    # Leaving crosses processes too.
    await bob.ws.close()
    assert await alice.frame() == protocol.left(room, "bob", shame=False)
    await carol.ws.close()
    await alice.peer.assert_silent()
    assert await alice.users(room) == ["alice"]
    assert await alice.ask({"action": "room_list"}) == protocol.room_list(
        [{"room": room, "users": 1}]
    )
    cluster.assert_alive()


# --- 2. nick race ---------------------------------------------------------------------------


async def test_same_nick_claimed_at_once_on_two_workers_has_exactly_one_winner(cluster, clients):
    # A higher burst than the default 20 frames: the rounds go as fast as the replies come.
    one, two = await cluster.start("daphne", "uvicorn", env={"CHAT_RATE_BURST": "100"})
    first = await member(one, clients)
    second = await member(two, clients)
    tag = uuid.uuid4().hex[:6]
    wins = {first: 0, second: 0}
    for round_ in range(20):
        nick = f"racer{round_}-{tag}"
        # Every other round the claims differ in case: still the same nick.
        claims = (nick, nick.upper() if round_ % 2 else nick)
        replies = await all_of(
            first.ask({"action": "set_nick", "nick": claims[0]}),
            second.ask({"action": "set_nick", "nick": claims[1]}),
        )
        outcome = sorted(replies, key=lambda reply: reply["success"])
        assert outcome == [protocol.fail("set_nick", NICK_IN_USE), protocol.ok("set_nick")], (
            f"round {round_}: {replies}"
        )
        winner, loser = (first, second) if replies[0]["success"] else (second, first)
        won = claims[0] if winner is first else claims[1]
        old = winner.nick
        winner.peer.nick = won
        wins[winner] += 1
        # The loser, in the same room, hears of the winner's new nick.
        assert await loser.expect(
            lambda f, old=old: f.get("action") == "nick_changed" and f.get("from_user") == old,
            what=f"nick_changed from {old}",
        ) == protocol.nick_changed("Default", old, won)
    for peer in (first, second):
        assert await peer.users() == [first.nick, second.nick]
    print(f"nick race: worker one won {wins[first]}, worker two {wins[second]} of 20 rounds")
    cluster.assert_alive()


# --- 3. kill -9 -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_killed_worker_users_are_swept_with_shame_and_their_nicks_freed(
    cluster, clients, capsys, kind
):
    survivor, victim = await cluster.start(kind, kind)
    watcher = await member(survivor, clients)
    await watcher.set_nick("watcher")
    lobby_watcher = await member(survivor, clients)
    await lobby_watcher.set_nick("lobbywatcher")
    await lobby_watcher.join("Lobby")
    doomed = await member(victim, clients)
    await doomed.set_nick("victim1")
    lobby_doomed = await member(victim, clients)
    await lobby_doomed.set_nick("victim2")
    await lobby_doomed.join("Lobby")
    await lobby_watcher.expect(
        lambda f: f == protocol.joined("Lobby", "victim2"), what="victim2 joining Lobby"
    )
    said = await doomed.post("last words")
    assert said["success"] is True, said
    await watcher.broadcast_of("last words")

    cluster.may_exit(victim)
    killed = time.monotonic()
    await asyncio.to_thread(victim.kill)
    deadline = killed + RECOVERY

    async def swept(peer: Member, nick: str, room: str) -> float:
        frame = await peer.left_of(nick, room, timeout=deadline - time.monotonic())
        delay = time.monotonic() - killed
        assert frame == protocol.left(room, nick, shame=True), frame
        return delay

    delays = await all_of(
        swept(watcher, "victim1", "Default"), swept(lobby_watcher, "victim2", "Lobby")
    )
    report(
        capsys,
        f"kill -9 of {kind}: left with shame seen on the other worker after "
        f"{delays[0]:.2f}s (Default) and {delays[1]:.2f}s (Lobby)",
    )
    assert max(delays) < RECOVERY
    # The killed worker's clients lost their connection without a close frame.
    assert await doomed.peer.close_code() is None
    assert await lobby_doomed.peer.close_code() is None

    assert await watcher.users() == ["watcher"]
    assert await lobby_watcher.users() == ["lobbywatcher"]
    newcomer = await member(survivor, clients)
    await newcomer.set_nick("victim1")
    assert await newcomer.ask({"action": "set_nick", "nick": "VICTIM2"}) == protocol.ok("set_nick")
    assert (await watcher.history("Default"))[-1]["id"] == said["id"]
    cluster.assert_alive()


# --- 4. SIGTERM -----------------------------------------------------------------------------


async def post_until_closed(
    peer: Member, prefix: str, acked: dict[int, tuple[str, str]], started: asyncio.Event
) -> int | None:
    """Post one message at a time (within the rate limit) until the server closes the socket;
    records what was acked and returns the close code."""
    for number in range(1000):
        text = f"{prefix} {number}"
        try:
            answer = await peer.post(text)
        except ConnectionClosed as closed:
            return None if closed.rcvd is None else closed.rcvd.code
        if answer["success"]:
            acked[answer["id"]] = (peer.nick, text)
        if len(acked) >= 3:
            started.set()
        # Pacing, not synchronisation: stay under the default 10 frames per second.
        await asyncio.sleep(0.12)
    raise AssertionError("the socket was never closed")


@pytest.mark.parametrize(
    ("kind", "signum"),
    [(kind, signal.SIGTERM) for kind in KINDS] + [(kind, signal.SIGINT) for kind in KINDS],
    ids=lambda value: value if isinstance(value, str) else signal.Signals(value).name,
)
async def test_stop_signal_closes_with_1001_says_goodbye_and_exits_0(
    cluster, clients, capsys, kind, signum
):
    survivor, leaving = await cluster.start(kind, kind)
    watcher = await member(survivor, clients)
    await watcher.set_nick("watcher")
    quiet = await member(leaving, clients)
    await quiet.set_nick("leaver1")
    chatty = await member(leaving, clients)
    await chatty.set_nick("leaver2")
    acked: dict[int, tuple[str, str]] = {}
    for peer in (watcher, quiet, chatty, watcher):
        answer = await peer.post(f"before, from {peer.nick}")
        assert answer["success"] is True, answer
        acked[answer["id"]] = (peer.nick, f"before, from {peer.nick}")
    # One client of the leaving worker keeps posting while it shuts down.
    started = asyncio.Event()
    chatty_acked: dict[int, tuple[str, str]] = {}
    poster = asyncio.create_task(post_until_closed(chatty, "during", chatty_acked, started))
    try:
        await asyncio.wait_for(started.wait(), FRAME_TIMEOUT)

        cluster.may_exit(leaving)
        stopped = time.monotonic()
        leaving.signal(signum)
        quiet_code, chatty_code = await all_of(
            quiet.peer.close_code(), asyncio.wait_for(poster, FRAME_TIMEOUT)
        )
    finally:
        poster.cancel()
    assert (quiet_code, chatty_code) == (1001, 1001)
    for nick in ("leaver1", "leaver2"):
        frame = await watcher.left_of(nick, "Default")
        assert frame == protocol.left("Default", nick, shame=False), frame

    code = await asyncio.to_thread(leaving.wait, 10)  # ServerError, with its log, if not
    took = time.monotonic() - stopped
    report(capsys, f"{signal.Signals(signum).name} of {kind}: exited with {code} after {took:.2f}s")
    assert code == 0, f"exit code {code}:\n{leaving.output()}"
    assert took < 5, f"took {took:.1f}s to exit:\n{leaving.output()}"

    assert await watcher.users() == ["watcher"]
    acked.update(chatty_acked)
    assert_acked_in_history(acked, await watcher.history("Default"))
    cluster.assert_alive()


# --- 5. Redis restart -----------------------------------------------------------------------


async def probe(
    sender: Member,
    receivers: list[Member],
    *,
    deadline: float,
    acked: dict[int, tuple[str, str]],
    tag: str,
) -> int:
    """Post probe messages from `sender` until one reaches every receiver; returns how many
    it took. A probe is either acked (and recorded) or refused as unavailable."""
    for attempt in range(1000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        text = f"probe {tag} {attempt}"
        answer = await sender.post(text)
        if answer["success"]:
            acked[answer["id"]] = (sender.nick, text)
            try:
                await all_of(
                    *(
                        peer.broadcast_of(text, timeout=max(0.1, min(2.0, remaining)))
                        for peer in receivers
                    )
                )
            except AssertionError:
                continue
            return attempt + 1
        assert answer == protocol.fail("chat_message", UNAVAILABLE), answer
        # Pacing: a retry rate a client might use.
        await asyncio.sleep(0.3)
    raise AssertionError(f"no probe from {sender!r} reached everyone before the deadline")


@pytest.mark.parametrize("layer_kind", ["pubsub", "core"])
async def test_redis_restart_loses_no_acked_message_and_the_chat_recovers(
    cluster, clients, own_redis, capsys, layer_kind
):
    layer = {
        "REDIS_URL": own_redis.url,
        "CHAT_LAYER_PREFIX": f"chat-e2e-{uuid.uuid4().hex[:8]}",
        "CHAT_LAYER": layer_kind,
    }
    one, two = await cluster.start("daphne", "uvicorn", layer_env=layer)
    everyone = [
        await member(one, clients),
        await member(one, clients),
        await member(two, clients),
        await member(two, clients),
    ]
    for index, peer in enumerate(everyone):
        await peer.set_nick(f"peer{index}")
    acked: dict[int, tuple[str, str]] = {}
    await probe(everyone[0], everyone[1:], deadline=time.monotonic() + 10, acked=acked, tag="up")

    await asyncio.to_thread(own_redis.stop)
    went_down = time.monotonic()
    refused = {one.port: 0, two.port: 0}
    unhealthy: set[int] = set()
    # While Redis is down: every post is acked (and then stored) or refused, never lost. Keep
    # it down for a few heartbeats, and until both workers refused posts and reported 503.
    for attempt in range(200):
        if time.monotonic() - went_down > 15:
            break
        for peer in (everyone[0], everyone[2]):
            text = f"while down {attempt} from {peer.nick}"
            answer = await peer.post(text)
            if answer["success"]:
                acked[answer["id"]] = (peer.nick, text)
            else:
                assert answer == protocol.fail("chat_message", UNAVAILABLE), answer
                refused[peer.where.port] += 1
        for server in (one, two):
            status, body = await healthz(server)
            if status == 503:
                assert body["status"] == "unavailable", body
                assert body["channel_layer"]["ok"] is False, body
                assert body["database"]["ok"] is True, body
                unhealthy.add(server.port)
        down_long_enough = time.monotonic() - went_down > 2 * HEARTBEAT + 1
        if all(refused.values()) and len(unhealthy) == 2 and down_long_enough:
            break
        await asyncio.sleep(0.3)  # pacing
    assert all(refused.values()), f"posts were never refused while Redis was down: {refused}"
    assert unhealthy == {one.port, two.port}, "/healthz never said 503 while Redis was down"
    # Everything acked so far is stored, although Redis is still down.
    assert_acked_in_history(acked, await everyone[1].history("Default"))

    await asyncio.to_thread(own_redis.start)
    came_back = time.monotonic()
    deadline = came_back + RECOVERY
    tries = [
        await probe(everyone[0], everyone[1:], deadline=deadline, acked=acked, tag="w1"),
        await probe(
            everyone[2], everyone[:2] + everyone[3:], deadline=deadline, acked=acked, tag="w2"
        ),
    ]
    recovered = time.monotonic() - came_back
    for server in (one, two):
        body = await until_health(server, 200, timeout=deadline - time.monotonic())
        assert body["channel_layer"]["ok"] is True, body
    report(
        capsys,
        f"Redis restart ({layer_kind}): down {came_back - went_down:.1f}s, refused "
        f"{list(refused.values())} posts; messages reached every client on both workers "
        f"{recovered:.2f}s after it came back ({tries} probes)",
    )
    for peer in everyone:
        assert_acked_in_history(acked, await peer.history("Default"))
    cluster.assert_alive()


# --- 6. PostgreSQL unreachable --------------------------------------------------------------


def insert_ghost(database_url: str, nick: str) -> None:
    """A presence row of a process that stopped heartbeating long ago, in Default: the next
    sweep removes it, which shows that a sweep ran."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("INSERT INTO rooms_room (name) VALUES ('Default') ON CONFLICT DO NOTHING")
        conn.execute(
            """
            INSERT INTO rooms_presence (channel_name, process, worker, nick, nick_key, room_id,
                                        connected_at, joined_at, last_heartbeat)
            SELECT %(channel)s, %(process)s, %(worker)s, %(nick)s, %(key)s, id,
                   now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour'
            FROM rooms_room WHERE name = 'Default'
            """,
            {
                "channel": f"ghost.{uuid.uuid4().hex}|1",
                "process": f"ghost.{uuid.uuid4().hex}",
                "worker": "ghost-worker",
                "nick": nick,
                "key": nick.casefold(),
            },
        )


@pytest.mark.parametrize("kind", KINDS)
async def test_a_worker_nobody_connected_to_sweeps_dead_workers_users(cluster, kind):
    """A worker with no chat client yet (and no health check) still heartbeats and sweeps:
    daphne and uvicorn do not say when they start, so the hub starts when the app loads."""
    await cluster.start(kind)  # ready once /echo answers, which does not start the hub
    await asyncio.to_thread(insert_ghost, cluster.database_url, "ghost")
    assert await asyncio.to_thread(ghosts, cluster.database_url) == 1

    async def ghost_gone() -> bool | None:
        return True if not await asyncio.to_thread(ghosts, cluster.database_url) else None

    await eventually(ghost_gone, timeout=RECOVERY, what="the ghost's presence swept")


def ghosts(database_url: str) -> int:
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM rooms_presence WHERE nick = 'ghost'").fetchone()
    return row[0]


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_database_outage_refuses_changes_and_sweeps_nobody_alive(
    cluster, clients, pg_proxy, cluster_db, capsys, mode
):
    """reset: the database refuses connections (it is down). blackhole: connections hang (a
    network that drops packets), so every attempt waits for the 3 s connect timeout."""
    # How long a reply may take while the database is away: in blackhole mode a request waits
    # for its own connect timeout and for those of the requests queued before it.
    slow = FRAME_TIMEOUT if mode == "reset" else 30.0
    one, two = await cluster.start("daphne", "uvicorn", database_url=pg_proxy.url_for(cluster_db))
    anna = await member(one, clients)
    await anna.set_nick("anna")
    bert = await member(two, clients)
    await bert.set_nick("bert")
    quitter = await member(two, clients)
    await quitter.set_nick("quitter")
    acked: dict[int, tuple[str, str]] = {}
    for peer in (anna, bert):
        answer = await peer.post(f"before, from {peer.nick}")
        assert answer["success"] is True, answer
        acked[answer["id"]] = (peer.nick, f"before, from {peer.nick}")
    await anna.broadcast_of("before, from bert")
    await bert.broadcast_of("before, from anna")

    await asyncio.to_thread(pg_proxy.cut, mode)
    cut = time.monotonic()

    # Changes are refused, with the documented reply and no ack.
    waits: list[float] = []  # how long each refusal took

    async def timed(reply: Awaitable[Frame]) -> Frame:
        began = time.monotonic()
        answer = await reply
        waits.append(time.monotonic() - began)
        return answer

    async def refused(peer: Member) -> None:
        assert await timed(peer.post("while cut", timeout=slow)) == protocol.fail(
            "chat_message", UNAVAILABLE
        ), peer
        assert await timed(
            peer.ask({"action": "set_nick", "nick": f"{peer.nick}2"}, timeout=slow)
        ) == protocol.fail("set_nick", UNAVAILABLE), peer

    await all_of(refused(anna), refused(bert))
    for server in (one, two):
        body = await until_health(server, 503, timeout=10)
        assert body["database"]["ok"] is False, body

    # A new connection cannot be seated: the failure reply, then 1013.
    async def not_seated(server: ServerProcess) -> None:
        ws = await open_ws(server.url("/chat"))
        clients.push_async_callback(ws.close)
        assert json.loads(await asyncio.wait_for(ws.recv(), slow)) == protocol.fail(
            "connecting", UNAVAILABLE
        )
        try:
            await asyncio.wait_for(ws.recv(), slow)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
        else:
            raise AssertionError("a second frame instead of the close")

    await all_of(not_seated(one), not_seated(two))
    # A client that leaves while the database is away is announced once it is back.
    await quitter.ws.close()
    await asyncio.to_thread(insert_ghost, cluster_db, "ghost")

    # Keep the database away for longer than the presence timeout: every presence is stale
    # when it comes back, and only the processes' patience keeps their users from being swept.
    outage = PRESENCE_TIMEOUT + 2
    attempts = 0
    while time.monotonic() - cut < outage:
        attempts += 1
        answers = await all_of(
            *(timed(peer.post(f"still cut {attempts}", timeout=slow)) for peer in (anna, bert))
        )
        assert answers == [protocol.fail("chat_message", UNAVAILABLE)] * 2, answers
        await asyncio.sleep(0.5)  # pacing
    cluster.assert_alive()

    await asyncio.to_thread(pg_proxy.restore)
    restored = time.monotonic()
    down = restored - cut
    deadline = restored + RECOVERY
    await probe(anna, [bert], deadline=deadline, acked=acked, tag="after-a")
    await probe(bert, [anna], deadline=deadline, acked=acked, tag="after-b")
    chat_back = time.monotonic() - restored
    for server in (one, two):
        await until_health(server, 200, timeout=max(1.0, deadline - time.monotonic()))
    for peer in (anna, bert):
        frame = await peer.left_of(
            "quitter", "Default", timeout=max(1.0, deadline - time.monotonic())
        )
        assert frame == protocol.left("Default", "quitter", shame=False), frame

    # The ghost's departure shows that a sweep ran after the outage (at most about one
    # presence timeout plus two heartbeats after the database came back).
    sweep_deadline = restored + PRESENCE_TIMEOUT + 3 * HEARTBEAT + 5
    for peer in (anna, bert):
        frame = await peer.left_of(
            "ghost", "Default", timeout=max(1.0, sweep_deadline - time.monotonic())
        )
        assert frame == protocol.left("Default", "ghost", shame=True), frame
    swept_after = time.monotonic() - restored
    report(
        capsys,
        f"database outage ({mode}) of {down:.1f}s: chat back {chat_back:.2f}s after restore, "
        f"first sweep seen {swept_after:.2f}s after restore; {len(waits)} refusals took "
        f"{min(waits):.2f}-{max(waits):.2f}s; proxy turned away {pg_proxy.refused} connections",
    )
    # ... and that it swept nobody who was alive.
    for peer in (anna, bert):
        shamed = [f for f in peer.seen if f.get("action") == "left" and f.get("shame")]
        assert shamed == [protocol.left("Default", "ghost", shame=True)], (peer, shamed)
        assert await peer.users() == ["anna", "bert"], peer
        assert_acked_in_history(acked, await peer.history("Default"))
    # The socket of a live user was not closed, and it may still change its nick.
    await anna.set_nick("anna2")
    await bert.expect(
        lambda f: f == protocol.nick_changed("Default", "anna", "anna2"), what="anna2"
    )
    cluster.assert_alive()


# --- 7. changes during a Redis outage -------------------------------------------------------


async def test_nick_and_room_changes_during_a_redis_outage_are_refused_or_heard_everywhere(
    cluster, clients, own_redis
):
    """While Redis is down a worker cannot reach the others' members. It refuses chat messages
    for that reason (test above); a nick change or room move it accepts must still reach the
    other worker's members of the room once Redis is back, or be refused as unavailable -
    otherwise they keep showing a nick that no longer exists, in a room it has left."""
    layer = {"REDIS_URL": own_redis.url, "CHAT_LAYER_PREFIX": f"chat-e2e-{uuid.uuid4().hex[:8]}"}
    one, two = await cluster.start("daphne", "uvicorn", layer_env=layer)
    anna = await member(one, clients)
    await anna.set_nick("anna")
    carl = await member(one, clients)
    await carl.set_nick("carl")
    bert = await member(two, clients)
    await bert.set_nick("bert")
    await anna.expect(lambda f: f.get("to_user") == "bert", what="bert's nick")

    await asyncio.to_thread(own_redis.stop)
    went_down = time.monotonic()
    # Until worker one has noticed (its posts are refused).
    for attempt in range(100):
        if (await anna.post(f"noticed yet? {attempt}"))["success"] is False:
            break
        assert time.monotonic() - went_down < 10, "posting was never refused"
        await asyncio.sleep(0.2)  # pacing
    renamed = await anna.ask({"action": "set_nick", "nick": "anna2"})
    moved = await anna.ask({"action": "join_room", "room": "Elsewhere"})
    for answer, action in ((renamed, "set_nick"), (moved, "join_room")):
        assert answer in (protocol.ok(action), protocol.fail(action, UNAVAILABLE)), answer

    await asyncio.to_thread(own_redis.start)
    acked: dict[int, tuple[str, str]] = {}
    await probe(carl, [bert], deadline=time.monotonic() + RECOVERY, acked=acked, tag="back")
    nick = "anna"
    if renamed["success"]:
        nick = "anna2"
        await bert.expect(
            lambda f: f == protocol.nick_changed("Default", "anna", "anna2"),
            timeout=2 * HEARTBEAT,
            what="nick_changed anna -> anna2 (set_nick was acked while Redis was down)",
        )
    if moved["success"]:
        await bert.expect(
            lambda f: f == protocol.left("Default", nick, shame=False),
            timeout=2 * HEARTBEAT,
            what=f"left of {nick} (join_room was acked while Redis was down)",
        )
    expected = ["carl", "bert"] if moved["success"] else [nick, "carl", "bert"]
    assert await bert.users() == expected
    cluster.assert_alive()
