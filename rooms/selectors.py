"""Everything that reads chat state for clients."""

from typing import Any

from django.db.models import Count

from rooms.models import Message, Presence
from rooms.protocol import timestamp


def room_users(*, room_name: str) -> list[str]:
    """Nicks in a room, in the order they entered it."""
    return list(
        Presence.objects.filter(room__name=room_name).order_by("id").values_list("nick", flat=True)
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
    *, room_name: str, before: int | None, after: int | None, limit: int
) -> list[dict[str, Any]]:
    """Up to `limit` messages of a room, oldest first.

    With only `after`, the page starts right after that id (a reconnecting client catching up);
    otherwise it is the newest page below `before` (or the newest overall).
    """
    rows = Message.objects.filter(room__name=room_name)
    if before is not None:
        rows = rows.filter(id__lt=before)
    if after is not None:
        rows = rows.filter(id__gt=after)
    fields = ("id", "author", "text", "created_at")
    if after is not None and before is None:
        page = list(rows.order_by("id").values_list(*fields)[:limit])
    else:
        page = list(rows.order_by("-id").values_list(*fields)[:limit])
        page.reverse()
    return [
        {"id": pk, "user": author, "message": text, "ts": timestamp(created)}
        for pk, author, text, created in page
    ]
