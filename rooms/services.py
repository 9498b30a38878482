"""Everything that changes chat state. One transaction each; called from async code through
`database_sync_to_async`, and from the admin and management commands directly."""

import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models.functions import Now
from django.utils import timezone

from rooms.models import Message, Nickname, Presence, Room, name_key

DEFAULT_ROOM = "Default"


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


def _seat(presence: Presence) -> Seat:
    return Seat(nick=presence.nick, room_id=presence.room_id, room_name=presence.room.name)


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


def _presence(channel_name: str, *, for_update: bool = False) -> Presence:
    rows = Presence.objects.select_related("room")
    if for_update:
        rows = rows.select_for_update(of=("self",))
    try:
        return rows.get(channel_name=channel_name)
    except Presence.DoesNotExist:
        raise NotConnected(channel_name) from None


def presence_connect(*, channel_name: str, process: str, worker: str) -> Seat:
    """Seat a new connection in the default room under a random free nick `User<n>`.

    Each attempt is its own small transaction (a savepoint inside a caller's): one that
    loses a nick to another connection simply tries another number.
    """
    room, _ = Room.objects.get_or_create(name=DEFAULT_ROOM)
    for _attempt in range(100):
        nick = f"User{secrets.randbelow(1_000_000)}"
        try:
            with transaction.atomic():
                Presence.objects.create(
                    channel_name=channel_name,
                    process=process,
                    worker=worker,
                    nick=nick,
                    nick_key=name_key(nick),
                    room=room,
                )
        except IntegrityError:
            continue
        return Seat(nick=nick, room_id=room.pk, room_name=room.name)
    raise RuntimeError("no free random nick after 100 attempts")


@transaction.atomic
def presence_disconnect(*, channel_name: str) -> Departure | None:
    """Remove a closed connection's presence, freeing its nick; None if already swept."""
    try:
        presence = _presence(channel_name, for_update=True)
    except NotConnected:
        return None
    Presence.objects.filter(pk=presence.pk).delete()
    Nickname.objects.filter(key=presence.nick_key).update(last_seen=Now())
    return _departure(presence)


@transaction.atomic
def nick_set(*, channel_name: str, nick: str) -> tuple[str, Seat]:
    """Rename a connection; returns its previous nick and its new seat."""
    presence = _presence(channel_name, for_update=True)
    previous = presence.nick
    key = name_key(nick)
    try:
        with transaction.atomic():
            Presence.objects.filter(pk=presence.pk).update(nick=nick, nick_key=key)
    except IntegrityError:
        raise NickInUse(nick) from None
    _nickname_seen(nick)
    presence.nick = nick
    return previous, _seat(presence)


@transaction.atomic
def room_join(*, channel_name: str, room_name: str) -> tuple[Seat, Seat]:
    """Move a connection to another room (created on first use); returns (old, new) seats."""
    presence = _presence(channel_name, for_update=True)
    old = _seat(presence)
    if presence.room.name == room_name:
        raise AlreadyInRoom(room_name)
    room, _ = Room.objects.get_or_create(name=room_name)
    # A fresh row gets a fresh id, and id order is the order users entered their room.
    Presence.objects.filter(pk=presence.pk).delete()
    Presence.objects.create(
        channel_name=presence.channel_name,
        process=presence.process,
        worker=presence.worker,
        nick=presence.nick,
        nick_key=presence.nick_key,
        room=room,
        connected_at=presence.connected_at,
    )
    return old, Seat(nick=presence.nick, room_id=room.pk, room_name=room.name)


@dataclass(frozen=True, slots=True)
class Post:
    """A chat message a connection wants stored."""

    channel_name: str
    room_id: int
    author: str
    text: str


def message_create(*, room_id: int, author: str, text: str) -> Message:
    """Store a chat message; it is committed when this returns."""
    return Message.objects.create(room_id=room_id, author=author, text=text)


@transaction.atomic
def messages_create(*, posts: list[Post], check_presence: bool = True) -> list[Message | None]:
    """Store the messages of connections that are still present, in one transaction.

    Returns, for each post, its stored message, or None if its connection was swept (its
    nick may belong to someone else by now). Several posts share one commit when they
    arrive together, which is what keeps the database off the hot path under load. A caller
    that knows its connections cannot have been swept may skip the check.
    """
    senders = {post.channel_name for post in posts}
    if check_presence:
        present = set(
            Presence.objects.filter(channel_name__in=senders).values_list("channel_name", flat=True)
        )
    else:
        present = senders
    now = timezone.now()
    stored: list[Message | None] = [
        Message(room_id=post.room_id, author=post.author, text=post.text, created_at=now)
        if post.channel_name in present
        else None
        for post in posts
    ]
    Message.objects.bulk_create([message for message in stored if message is not None])
    return stored


def presence_heartbeat(*, process: str) -> int:
    """Mark every connection of a live process as alive; returns how many it has."""
    return Presence.objects.filter(process=process).update(last_heartbeat=Now())


def presence_channels(*, process: str) -> list[str]:
    """The connections the database still counts as this process's."""
    return list(Presence.objects.filter(process=process).values_list("channel_name", flat=True))


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
