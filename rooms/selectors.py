"""Everything that reads chat state for clients."""

from datetime import UTC, datetime
from typing import Any

from django.db import connection
from django.db.models import Count

from rooms import prepared
from rooms.models import Message, Presence, Room
from rooms.protocol import timestamp


def room_users(*, room_name: str) -> list[str]:
    """Nicks in a room, in the order they entered it."""
    return list(
        Presence.objects.filter(room__name=room_name)
        .order_by("joined_at", "id")
        .values_list("nick", flat=True)
    )


def room_list() -> list[dict[str, Any]]:
    """Rooms that have someone in them, busiest first."""
    rows = (
        Presence.objects.values("room__name")
        .annotate(users=Count("id"))
        .order_by("-users", "room__name")
    )
    return [{"room": row["room__name"], "users": row["users"]} for row in rows]


def message_history(
    *,
    room_name: str | None = None,
    room_id: int | None = None,
    before: int | None = None,
    after: int | None = None,
    limit: int,
) -> list[dict[str, Any]]:
    """Up to `limit` messages of a room (by name or id), oldest first.

    With only `after`, the page starts right after that id (a reconnecting client catching up);
    otherwise it is the newest page below `before` (or the newest overall).

    In SQL because every connect and every room switch reads a page: the ORM's cost of
    building the query was most of the cost of answering it.
    """
    message = connection.ops.quote_name(Message._meta.db_table)
    if room_id is not None:
        where, params = ["room_id = %s"], [room_id]
    else:
        room = connection.ops.quote_name(Room._meta.db_table)
        where, params = [f"room_id = (SELECT id FROM {room} WHERE name = %s)"], [room_name]
    if before is not None:
        where.append("id < %s")
        params.append(_clamp(before))
    if after is not None:
        where.append("id > %s")
        params.append(_clamp(after))
    newest_first = not (after is not None and before is None)
    sql = (
        f"SELECT id, author, text, created_at FROM {message} WHERE {' AND '.join(where)}"
        f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT %s"
    )
    with prepared.cursor() as cursor:
        cursor.execute(sql, [*params, limit])
        page = cursor.fetchall()
    if newest_first:
        page.reverse()
    return [
        {"id": pk, "user": author, "message": text, "ts": timestamp(_aware(created))}
        for pk, author, text, created in page
    ]


def _clamp(cursor: int) -> int:
    # Clients may send any integer; beyond 64 bits it compares the same as the bound does.
    return max(-(2**63), min(cursor, 2**63 - 1))


def _aware(value: datetime) -> datetime:
    # Stored in UTC; SQLite hands it back without a zone, PostgreSQL with one.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
