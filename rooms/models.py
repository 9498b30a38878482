"""What the chat persists: rooms, nicknames, messages and who is connected where."""

import unicodedata

from django.db import models
from django.db.models.functions import Now


def name_key(name: str) -> str:
    """The form under which two names count as the same (case- and width-insensitive)."""
    return unicodedata.normalize("NFKC", name).casefold()


class Room(models.Model):
    name = models.CharField(max_length=20, unique=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def group_name(self) -> str:
        """Channel-layer group of the room, from its id: any room name stays a valid group."""
        return group_name(self.pk)


def group_name(room_id: int) -> str:
    return f"room-{room_id}"


class Nickname(models.Model):
    """Every nick someone chose (set_nick), for moderators: when it was first and last seen."""

    name = models.CharField(max_length=20)
    # NFKC can turn one character into up to 18 (U+FDFA), so 20 characters may need 360.
    key = models.CharField(max_length=400, unique=True)
    first_seen = models.DateTimeField(db_default=Now())
    last_seen = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["-last_seen"]

    def __str__(self) -> str:
        return self.name


class Message(models.Model):
    # Indexed by the (room, id) index below, which serves every lookup by room: a second
    # index on room alone would be one more to update for every message stored.
    room = models.ForeignKey(
        Room, on_delete=models.CASCADE, related_name="messages", db_index=False
    )
    author = models.CharField(max_length=20)
    text = models.TextField()
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["-id"]
        # History pages walk one room's messages by id in both directions.
        indexes = [models.Index(fields=["room", "id"], name="message_room_id")]

    def __str__(self) -> str:
        return f"{self.author}: {self.text[:40]}"


class Presence(models.Model):
    """One open connection: where it is, under which nick, and whether its process lives.

    The unique `nick_key` is what makes a nick unique among all connected clients of every
    process: two claims of one nick race in the database and exactly one insert or update wins.
    """

    channel_name = models.CharField(
        max_length=200, unique=True, help_text="Address of the connection on its process."
    )
    process = models.CharField(
        max_length=200, db_index=True, help_text="Channel-layer mailbox of the owning process."
    )
    worker = models.CharField(
        max_length=200, db_index=True, help_text="Stable name of the owning server process."
    )
    nick = models.CharField(max_length=20)
    nick_key = models.CharField(max_length=400, unique=True)
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="presences")
    connected_at = models.DateTimeField(db_default=Now())
    joined_at = models.DateTimeField(db_default=Now(), help_text="When it entered its room.")
    last_heartbeat = models.DateTimeField(db_default=Now(), db_index=True)

    class Meta:
        verbose_name_plural = "presence"
        # The order users entered their room; ids break ties within one clock tick.
        ordering = ["room", "joined_at", "id"]

    def __str__(self) -> str:
        return f"{self.nick} in {self.room_id}"
