"""Everything that changes chat state, each change atomic; called from async code through
`rooms.dbthread`, and from the admin and management commands directly.

What every connection does (connect, rename, switch rooms, disconnect) is written in SQL: it runs
on the one database thread of a server process, where the ORM's cost of building each query
capped how fast clients could connect. Connect, room switch and disconnect run without a
transaction around them: one statement each on PostgreSQL, where every statement is a network
round trip, and one or two on SQLite. The rest uses the ORM.
"""

import functools
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple, TypeVar

from django.db import IntegrityError, connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from rooms import prepared
from rooms.models import Message, Nickname, Presence, Room, name_key

DEFAULT_ROOM = "Default"
T = TypeVar("T")
# Rows per multi-row statement: four parameters each stays under SQLite's oldest limit of 999.
_ROWS_PER_STATEMENT = 200
# Rows per INSERT from arrays (PostgreSQL): four parameters whatever the number of rows.
_ROWS_PER_ARRAY_STATEMENT = 10_000


class NickInUse(Exception):
    """Another connected client holds that nick (compared case-insensitively)."""


class AlreadyInRoom(Exception):
    """The connection is already in the room it asked to join."""


class NotConnected(Exception):
    """The connection has no presence any more (it was swept while unreachable)."""


@dataclass(frozen=True, slots=True)
class Seat:
    """Where one connection is: its nick and its room."""

    nick: str
    room_id: int
    room_name: str


@dataclass(frozen=True, slots=True)
class Departure:
    """A presence that was removed, with what its room must be told."""

    nick: str
    room_id: int
    room_name: str
    process: str


def _departure(presence: Presence) -> Departure:
    return Departure(
        nick=presence.nick,
        room_id=presence.room_id,
        room_name=presence.room.name,
        process=presence.process,
    )


def _nickname_seen(nick: str) -> None:
    # Chosen nicks only: the random User<n> of every guest would bury them.
    Nickname.objects.bulk_create(
        [Nickname(name=nick, key=name_key(nick), last_seen=timezone.now())],
        update_conflicts=True,
        unique_fields=["key"],
        update_fields=["name", "last_seen"],
    )


@functools.cache
def _sql(vendor: str) -> dict[str, str]:
    """The hot statements for one database vendor (the same for every connection to it)."""
    compiler = Presence.objects.none().query.get_compiler(connection=connection)
    # The database's clock, as the column defaults use: one clock for every process.
    now, _ = compiler.compile(Now())
    # Except for when a user entered a room, on SQLite: its clock ticks in milliseconds, so
    # entries in one tick would tie. SQLite serves one machine, whose clock the app reads.
    entered = "%s" if vendor == "sqlite" else now
    lock = " FOR UPDATE OF p" if connection.features.has_select_for_update_of else ""
    presence, room, nickname, message = (
        connection.ops.quote_name(model._meta.db_table)
        for model in (Presence, Room, Nickname, Message)
    )
    key = connection.ops.quote_name("key")
    statements = {
        "room_id": f"SELECT id FROM {room} WHERE name = %s",
        # ON CONFLICT DO NOTHING: a nick (or address) already taken inserts nothing, and
        # rowcount says so without an exception and its savepoint.
        "where": f"SELECT p.nick, p.nick_key, p.room_id, r.name, p.process FROM {presence} p"
        f" JOIN {room} r ON r.id = p.room_id WHERE p.channel_name = %s{lock}",
        "seat": f"INSERT INTO {presence} (channel_name, process, worker, nick, nick_key, room_id,"
        f" joined_at) VALUES (%s, %s, %s, %s, %s, %s, {entered}) ON CONFLICT DO NOTHING",
        "move": f"UPDATE {presence} SET room_id = %s, joined_at = {entered}"
        " WHERE channel_name = %s",
        "unseat": f"DELETE FROM {presence} WHERE channel_name = %s",
        "rename": f"UPDATE {presence} SET nick = %s, nick_key = %s WHERE channel_name = %s",
        "nick_seen": f"UPDATE {nickname} SET last_seen = {now} WHERE {key} = %s",
        "present": f"SELECT channel_name FROM {presence} WHERE channel_name IN (",
        "post": f"INSERT INTO {message} (room_id, author, text, created_at) VALUES",
    }
    if vendor == "postgresql":
        # What every connection does, each in one statement: in autocommit that is one round
        # trip, where a transaction of separate statements (BEGIN, SET LOCAL, the reads, the
        # writes, COMMIT) took five to seven, and as many executions on the database. Each
        # relaxes its own commit (see `_relaxed_commit`) with set_config(..., true). They
        # return no row when they do not apply as they stand (no such room yet, a nick taken,
        # the same room, no presence); the transactions below then take over.
        relaxed = "relaxed AS (SELECT set_config('synchronous_commit', 'off', true))"
        statements |= {
            # The arrays go in PostgreSQL's binary format (%b): in text format psycopg quotes
            # and escapes every element in Python, which took longer than the insert itself.
            "post_arrays": f"INSERT INTO {message} (room_id, author, text, created_at)"
            " SELECT r, a, t, %s FROM unnest(%b::bigint[], %b::text[], %b::text[])"
            " WITH ORDINALITY AS u(r, a, t, n) ORDER BY n RETURNING id",
            "seat_now": f"WITH {relaxed} INSERT INTO {presence} (channel_name, process, worker,"
            " nick, nick_key, room_id) SELECT %s, %s, %s, %s, %s, r.id"
            f" FROM {room} r, relaxed WHERE r.name = %s ON CONFLICT DO NOTHING RETURNING room_id",
            "move_now": f"WITH {relaxed}, old AS (SELECT p.nick, p.room_id, r.name"
            f" FROM {presence} p JOIN {room} r ON r.id = p.room_id WHERE p.channel_name = %s),"
            f" new AS (SELECT id FROM {room} WHERE name = %s)"
            f" UPDATE {presence} p SET room_id = new.id, joined_at = {now}"
            # A row changed since `old` read it (unlocked) matches nothing: the locked
            # transaction below decides then.
            " FROM old, new, relaxed WHERE p.channel_name = %s AND new.id <> old.room_id"
            " AND p.room_id = old.room_id AND p.nick = old.nick"
            " RETURNING old.nick, old.room_id, old.name, new.id",
            "unseat_now": f"WITH {relaxed}, gone AS (DELETE FROM {presence}"
            " WHERE channel_name = %s RETURNING nick, nick_key, room_id, process),"
            f" seen AS (UPDATE {nickname} SET last_seen = {now} FROM gone"
            f" WHERE {nickname}.{key} = gone.nick_key)"
            f" SELECT gone.nick, gone.room_id, r.name, gone.process FROM gone"
            f" JOIN {room} r ON r.id = gone.room_id, relaxed",
        }
    elif vendor == "sqlite":
        # The same paths without a transaction around them: on SQLite, BEGIN, the reads, the
        # writes and COMMIT cost more in Python than SQLite takes to run them. Each path is
        # one statement, except a room switch (RETURNING has no old values, so it reads
        # first) and a disconnect (the nickname is updated apart), and, as above, returns no
        # row when it does not apply as it stands.
        statements |= {
            "seat_now": f"INSERT INTO {presence} (channel_name, process, worker, nick, nick_key,"
            " room_id, joined_at) SELECT %s, %s, %s, %s, %s, r.id, %s"
            f" FROM {room} r WHERE r.name = %s ON CONFLICT DO NOTHING RETURNING room_id",
            # Guarded by what `where` read just before, as move_now is on PostgreSQL.
            "move_now": f"UPDATE {presence} SET room_id = r.id, joined_at = %s FROM {room} r"
            f" WHERE {presence}.channel_name = %s AND r.name = %s AND r.id <> %s"
            f" AND {presence}.room_id = %s AND {presence}.nick = %s RETURNING room_id",
            "unseat_now": f"DELETE FROM {presence} WHERE channel_name = %s RETURNING nick,"
            f" room_id, (SELECT name FROM {room} WHERE id = room_id), process, nick_key",
        }
    return statements


def _execute(cursor, statement: str, params: list[object]) -> None:
    cursor.execute(_sql(connection.vendor)[statement], params)


def _entered() -> list[object]:
    """The parameter that the entry time takes, if the statements take one (see `_sql`)."""
    if connection.vendor == "sqlite":
        return [connection.ops.adapt_datetimefield_value(timezone.now())]
    return []


def _relaxed_commit(cursor) -> None:
    """Let this transaction's commit return before PostgreSQL flushes it to disk.

    For presence only: who is connected where is void after a database crash anyway (the
    processes re-seat or sweep every connection), and it is what every connect and room
    switch writes. Visibility to other processes is unchanged. Messages keep durable commits.
    """
    if connection.vendor == "postgresql":
        cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _room_id(name: str) -> int:
    """The id of a room, created on first use."""
    with prepared.cursor() as cursor:
        _execute(cursor, "room_id", [name])
        row = cursor.fetchone()
    if row is not None:
        return row[0]
    return Room.objects.get_or_create(name=name)[0].pk


class _Presence(NamedTuple):
    nick: str
    nick_key: str
    room_id: int
    room_name: str
    process: str


def _locked(cursor, channel_name: str) -> _Presence | None:
    """A connection's presence, locked until the transaction ends; None if it has none."""
    _execute(cursor, "where", [channel_name])
    row = cursor.fetchone()
    return None if row is None else _Presence(*row)


def _fast_paths() -> bool:
    """Whether the database has transaction-free forms of the hot paths (see `_sql`)."""
    return connection.vendor in ("postgresql", "sqlite")


def _random_nick() -> str:
    return f"User{secrets.randbelow(1_000_000)}"


def presence_connect(*, channel_name: str, process: str, worker: str) -> Seat:
    """Seat a new connection in the default room under a random free nick `User<n>`."""
    if _fast_paths():
        nick = _random_nick()
        with prepared.cursor() as cursor:
            seat = [channel_name, process, worker, nick, name_key(nick), *_entered()]
            _execute(cursor, "seat_now", [*seat, DEFAULT_ROOM])
            rows = cursor.fetchall()
        if rows:
            return Seat(nick=nick, room_id=rows[0][0], room_name=DEFAULT_ROOM)
    return _seat(channel_name=channel_name, process=process, worker=worker)


@transaction.atomic
def _seat(*, channel_name: str, process: str, worker: str) -> Seat:
    room_id = _room_id(DEFAULT_ROOM)
    with prepared.cursor() as cursor:
        _relaxed_commit(cursor)
        for _attempt in range(100):
            nick = _random_nick()
            seat = [channel_name, process, worker, nick, name_key(nick), room_id, *_entered()]
            _execute(cursor, "seat", seat)
            if cursor.rowcount == 1:
                return Seat(nick=nick, room_id=room_id, room_name=DEFAULT_ROOM)
    raise RuntimeError("no free random nick after 100 attempts")


def presence_disconnect(*, channel_name: str) -> Departure | None:
    """Remove a closed connection's presence, freeing its nick; None if already swept."""
    if _fast_paths():
        with prepared.cursor() as cursor:
            _execute(cursor, "unseat_now", [channel_name])
            rows = cursor.fetchall()
            if not rows:
                return None
            if connection.vendor == "sqlite":
                # A DELETE there cannot update another table too, as PostgreSQL's does.
                *gone, nick_key = rows[0]
                _execute(cursor, "nick_seen", [nick_key])
            else:
                gone = rows[0]
        return Departure(*gone)
    return _unseat(channel_name=channel_name)


@transaction.atomic
def _unseat(*, channel_name: str) -> Departure | None:
    with prepared.cursor() as cursor:
        _relaxed_commit(cursor)
        presence = _locked(cursor, channel_name)
        if presence is None:
            return None
        _execute(cursor, "unseat", [channel_name])
        _execute(cursor, "nick_seen", [presence.nick_key])
    return Departure(
        nick=presence.nick,
        room_id=presence.room_id,
        room_name=presence.room_name,
        process=presence.process,
    )


@transaction.atomic
def nick_set(*, channel_name: str, nick: str) -> tuple[str, Seat]:
    """Rename a connection; returns its previous nick and its new seat."""
    with prepared.cursor() as cursor:
        presence = _locked(cursor, channel_name)
        if presence is None:
            raise NotConnected(channel_name)
        try:
            with transaction.atomic():
                _execute(cursor, "rename", [nick, name_key(nick), channel_name])
        except IntegrityError:
            raise NickInUse(nick) from None
    _nickname_seen(nick)
    return presence.nick, Seat(nick=nick, room_id=presence.room_id, room_name=presence.room_name)


def room_join(*, channel_name: str, room_name: str) -> tuple[Seat, Seat]:
    """Move a connection to another room (created on first use); returns (old, new) seats."""
    if _fast_paths():
        moved = _move_now(channel_name=channel_name, room_name=room_name)
        if moved is not None:
            return moved
    return _move(channel_name=channel_name, room_name=room_name)


def _move_now(*, channel_name: str, room_name: str) -> tuple[Seat, Seat] | None:
    """`room_join` without a transaction; None where it does not apply as things stand."""
    with prepared.cursor() as cursor:
        if connection.vendor == "postgresql":
            _execute(cursor, "move_now", [channel_name, room_name, channel_name])
            rows = cursor.fetchall()
            if not rows:
                return None
            nick, old_room_id, old_room_name, room_id = rows[0]
        else:
            _execute(cursor, "where", [channel_name])
            rows = cursor.fetchall()
            if not rows:
                return None
            nick, _, old_room_id, old_room_name, _ = rows[0]
            guard = [channel_name, room_name, old_room_id, old_room_id, nick]
            _execute(cursor, "move_now", [*_entered(), *guard])
            rows = cursor.fetchall()
            if not rows:
                return None
            room_id = rows[0][0]
    old = Seat(nick=nick, room_id=old_room_id, room_name=old_room_name)
    return old, Seat(nick=nick, room_id=room_id, room_name=room_name)


@transaction.atomic
def _move(*, channel_name: str, room_name: str) -> tuple[Seat, Seat]:
    with prepared.cursor() as cursor:
        _relaxed_commit(cursor)
        presence = _locked(cursor, channel_name)
        if presence is None:
            raise NotConnected(channel_name)
        if presence.room_name == room_name:
            raise AlreadyInRoom(room_name)
        room_id = _room_id(room_name)
        # joined_at orders a room's users by when they entered it.
        _execute(cursor, "move", [room_id, *_entered(), channel_name])
    old = Seat(nick=presence.nick, room_id=presence.room_id, room_name=presence.room_name)
    return old, Seat(nick=presence.nick, room_id=room_id, room_name=room_name)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """What the chat needs of a message it has just stored: its id and its time.

    Not a model instance: building one per message cost more of a server process at the top
    of the fan-out than the INSERT that stored it.
    """

    pk: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Post:
    """A chat message a connection wants stored."""

    channel_name: str
    room_id: int
    room_name: str
    author: str
    text: str


def messages_create(
    *, posts: list[Post], check_presence: bool = True
) -> list[StoredMessage | None]:
    """Store the messages of connections that are still present, in one transaction.

    Returns, for each post, its stored message, or None if its connection was swept (its
    nick may belong to someone else by now). Several posts share one commit when they
    arrive together, which is what keeps the database off the hot path under load. A caller
    that knows its connections cannot have been swept may skip the check.
    """
    if check_presence or len(posts) > _rows_per_insert() or connection.in_atomic_block:
        # Inside a caller's transaction, the savepoint keeps a failed batch from breaking it.
        return _messages_create_checked(posts=posts, check_presence=check_presence)
    # The hot path: one INSERT is a transaction of its own, so it runs in autocommit, one
    # round trip on PostgreSQL where BEGIN, INSERT and COMMIT took three, and prepared once
    # rather than parsed and planned for every batch. Its commit is as durable as any.
    now = timezone.now()
    with prepared.cursor() as cursor:
        ids = _insert_messages(cursor, posts, now)
    return _stored_all(posts, ids, now, present=None)


@transaction.atomic
def _messages_create_checked(
    *, posts: list[Post], check_presence: bool
) -> list[StoredMessage | None]:
    senders = list({post.channel_name for post in posts})
    sql = _sql(connection.vendor)
    now = timezone.now()
    present: set[str] | None = None
    if check_presence:
        present = set()
        with connection.cursor() as cursor:
            for chunk in _batches(senders):
                cursor.execute(sql["present"] + ", ".join(["%s"] * len(chunk)) + ")", chunk)
                present.update(row[0] for row in cursor.fetchall())
    ids: list[int] = []
    with prepared.cursor() as cursor:
        for chunk in _batches(_kept(posts, present), _rows_per_insert()):
            ids.extend(_insert_messages(cursor, chunk, now))
    return _stored_all(posts, ids, now, present=present)


def _rows_per_insert() -> int:
    """How many messages one INSERT takes on this connection's database.

    A batch grows when the database falls behind (the hub makes them up to 500 posts), and
    past one statement it needs a transaction around its statements: BEGIN and COMMIT, two
    more round trips per batch just when the database is the bottleneck.
    """
    if "post_arrays" in _sql(connection.vendor):
        return _ROWS_PER_ARRAY_STATEMENT
    return _ROWS_PER_STATEMENT


def _insert_messages(cursor, posts: list[Post], now: datetime) -> list[int]:
    """Insert the messages of one statement (`_rows_per_insert`); their ids, in order."""
    # Plain SQL, as for presence: under load this runs for every batch, and building the
    # ORM's INSERT took twice as long as SQLite took to run it.
    sql = _sql(connection.vendor)
    stamp = connection.ops.adapt_datetimefield_value(now)
    if "post_arrays" in sql:
        # One statement text for every batch size, so it is prepared once: a text per size
        # would churn through psycopg's cache of prepared statements.
        cursor.execute(
            sql["post_arrays"],
            [
                stamp,
                [p.room_id for p in posts],
                [p.author for p in posts],
                [p.text for p in posts],
            ],
        )
    else:
        values = ", ".join(["(%s, %s, %s, %s)"] * len(posts))
        params = [v for p in posts for v in (p.room_id, p.author, p.text, stamp)]
        cursor.execute(f"{sql['post']} {values} RETURNING id", params)
    # The rows are inserted in the order given, so their ids rise in that order, whatever
    # order RETURNING hands them back in.
    return sorted(row[0] for row in cursor.fetchall())


def _kept(posts: list[Post], present: set[str] | None) -> list[Post]:
    """The posts whose senders are present (all of them, if presence was not checked)."""
    return posts if present is None else [p for p in posts if p.channel_name in present]


def _stored_all(
    posts: list[Post], ids: list[int], now: datetime, *, present: set[str] | None
) -> list[StoredMessage | None]:
    """Each post's stored message, or None for a post of a sender who was not present."""
    kept = _kept(posts, present)
    if len(ids) != len(kept):
        raise RuntimeError(f"the database returned {len(ids)} ids for {len(kept)} messages")
    pks = iter(ids)
    return [
        StoredMessage(next(pks), now) if present is None or post.channel_name in present else None
        for post in posts
    ]


def _batches(items: list[T], size: int = _ROWS_PER_STATEMENT) -> Iterator[list[T]]:
    """`items` in runs of at most `size`, one statement each."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def presence_heartbeat(*, process: str) -> int:
    """Mark every connection of a live process as alive; returns how many it has."""
    return Presence.objects.filter(process=process).update(last_heartbeat=Now())


def presence_channels(*, process: str) -> list[str]:
    """The connections the database still counts as this process's."""
    return list(Presence.objects.filter(process=process).values_list("channel_name", flat=True))


def presence_forget(*, process: str, channel_names: list[str]) -> int:
    """Remove rows of a process's connections that no longer exist; returns how many."""
    rows = Presence.objects.filter(process=process, channel_name__in=channel_names)
    return rows.delete()[0]


@transaction.atomic
def presence_clear_process(*, process: str) -> list[Departure]:
    """Remove every connection of a process that is shutting down."""
    return _remove(Presence.objects.filter(process=process))


@transaction.atomic
def presence_sweep(*, timeout_seconds: float) -> list[Departure]:
    """Remove presence whose process stopped heartbeating (killed, frozen, cut off)."""
    stale_before = timezone.now() - timedelta(seconds=timeout_seconds)
    return _remove(Presence.objects.filter(last_heartbeat__lt=stale_before))


@transaction.atomic
def presence_clear_worker(*, worker: str, keep_process: str) -> list[Departure]:
    """Remove what an earlier incarnation of this worker left behind when it died."""
    return _remove(Presence.objects.filter(worker=worker).exclude(process=keep_process))


def _remove(rows) -> list[Departure]:
    # skip_locked: two processes sweeping at once each take different rows, so every
    # departure is announced exactly once.
    doomed = list(rows.select_related("room").select_for_update(skip_locked=True, of=("self",)))
    if doomed:
        Presence.objects.filter(pk__in=[p.pk for p in doomed]).delete()
    return [_departure(p) for p in doomed]
