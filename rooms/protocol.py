"""The /chat wire protocol: validation of incoming frames and the bodies the server sends.

Pure functions, no I/O: the consumer decodes a frame here, calls a service, and sends what these
builders return. The bodies the original aiohttp chat server sent (docs/protocol.md lists them)
must keep their exact keys and strings: clients written for it compare them. Keys may be added,
never removed or renamed.
"""

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

NAME_MESSAGE = "Name must be a string and between 3-20 chars."
ROOM_MESSAGE = "Room name must be a string and between 3-20 chars."
NICK_IN_USE = "Nickname is already in use"
ALREADY_IN_ROOM = "Name already in use in this room."
NOT_ALLOWED = "Not allowed."
SLOW_DOWN = "Rate limit exceeded: slow down."
UNAVAILABLE = "Service temporarily unavailable, nothing was changed. Try again."
INTERNAL_ERROR = "Internal error, nothing was changed."

# Close codes (RFC 6455 section 7.4.1) the server sends, or reads from a client's close.
CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_UNSUPPORTED_DATA = 1003  # a binary frame
CLOSE_NO_STATUS = 1005  # a close frame without a code (uvicorn also reports drops so)
CLOSE_ABNORMAL = 1006  # the connection dropped without a close frame
CLOSE_POLICY_VIOLATION = 1008  # flooding, or a reader that stopped reading
CLOSE_TOO_BIG = 1009  # a frame over CHAT_MAX_FRAME_BYTES
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013  # database unreachable at connect, or the connection was swept

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A message may span lines; every other control character is refused.
_MESSAGE_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
encode = _encoder.encode


class ProtocolError(Exception):
    """A frame that breaks the protocol; `message` is the reply the client gets."""

    def __init__(self, action: Any, message: str) -> None:
        super().__init__(message)
        self.action = action
        self.message = message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


# One decoder for every frame: json.loads with these arguments builds a new one each call.
_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def decode_value(text: str) -> Any:
    """Parse one text frame as strict JSON (no NaN or Infinity, which JSON does not have)."""
    try:
        return _decoder.decode(text)
    except ValueError:
        raise ProtocolError(None, "Invalid JSON.") from None


def decode(text: str) -> tuple[str, dict[str, Any]]:
    """Parse one text frame into (action, body), or raise ProtocolError."""
    body = decode_value(text)
    if not isinstance(body, dict):
        raise ProtocolError(None, "A frame must be a JSON object.")
    action = body.get("action")
    if not isinstance(action, str):
        raise ProtocolError(None, 'A frame needs an "action" string.')
    return action, body


def _columns(name: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in name)


def peek_action(text: str) -> str | None:
    """The action a frame names, if it is a valid request; for error replies."""
    try:
        return decode(text)[0]
    except ProtocolError:
        return None


def clean_name(value: Any) -> str | None:
    """A nick or room name trimmed of outer whitespace, or None if it is not valid.

    At most 20 characters, at least 3 columns wide: a wide (CJK) character counts twice toward
    the minimum, so a two-character name such as 数学 is as valid as "abc". Every name the
    original server accepted (3-20 characters) is still accepted.
    """
    if not isinstance(value, str):
        return None
    name = value.strip()
    if len(name) > 20 or _CONTROL.search(name) or _columns(name) < 3:
        return None
    return name


def nick_from(body: dict[str, Any]) -> str:
    nick = clean_name(body.get("nick"))
    if nick is None:
        raise ProtocolError("set_nick", NAME_MESSAGE)
    return nick


def room_from(body: dict[str, Any]) -> str:
    room = clean_name(body.get("room"))
    if room is None:
        raise ProtocolError("join_room", ROOM_MESSAGE)
    return room


def message_text_from(body: dict[str, Any], max_chars: int) -> str:
    text = body.get("message")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("chat_message", "Message must be a non-empty string.")
    if len(text) > max_chars:
        raise ProtocolError("chat_message", f"Message is longer than {max_chars} characters.")
    if _MESSAGE_CONTROL.search(text):
        raise ProtocolError("chat_message", "Message must not contain control characters.")
    return text


def user_list_room_from(body: dict[str, Any], current: str) -> str:
    """The room a user_list asks about; an absent room means the asker's own."""
    if "room" not in body:
        return current
    room = body["room"]
    if not isinstance(room, str):
        raise ProtocolError("user_list", ROOM_MESSAGE)
    return room.strip()


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    room: str
    before: int | None
    after: int | None
    limit: int


def _message_id(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError("history", f'"{key}" must be a message id (a non-negative integer).')
    return value


def history_query_from(
    body: dict[str, Any], *, current: str, default_limit: int, max_limit: int
) -> HistoryQuery:
    room = body.get("room", current)
    if not isinstance(room, str):
        raise ProtocolError("history", ROOM_MESSAGE)
    limit = body.get("limit")
    if limit is None:
        limit = default_limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_limit:
        raise ProtocolError("history", f'"limit" must be an integer from 1 to {max_limit}.')
    return HistoryQuery(
        room=room.strip(),
        before=_message_id(body, "before"),
        after=_message_id(body, "after"),
        limit=limit,
    )


# The last time formatted, by identity: the messages of one batch share one created_at object,
# formatted for each broadcast and each acknowledgement, which was a few percent of a server
# process at the top of the fan-out. (By identity, not equality: equal datetimes may differ in
# zone or fold, and so in what they format to.)
_last_formatted: tuple[datetime | None, str] = (None, "")


def timestamp(value: datetime) -> str:
    """ISO 8601 in UTC with a Z, as `ts` is sent everywhere."""
    global _last_formatted
    last, text = _last_formatted
    if value is not last:
        text = value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        _last_formatted = (value, text)
    return text


def ok(action: str, message: str = "") -> dict[str, Any]:
    return {"action": action, "success": True, "message": message}


def fail(action: Any, message: str) -> dict[str, Any]:
    return {"action": action, "success": False, "message": message}


def connecting(room: str, user: str) -> dict[str, Any]:
    return {"action": "connecting", "room": room, "user": user}


def joined(room: str, user: str) -> dict[str, Any]:
    return {"action": "joined", "room": room, "user": user}


def left(room: str, user: str, *, shame: bool) -> dict[str, Any]:
    return {"action": "left", "room": room, "user": user, "shame": shame}


def nick_changed(room: str, old: str, new: str) -> dict[str, Any]:
    return {"action": "nick_changed", "room": room, "from_user": old, "to_user": new}


def chat_ack(text: str, message_id: int, ts: str) -> dict[str, Any]:
    return {"action": "chat_message", "success": True, "message": text, "id": message_id, "ts": ts}


def chat_broadcast(room: str, user: str, text: str, message_id: int, ts: str) -> dict[str, Any]:
    return {
        "action": "chat_message",
        "message": text,
        "user": user,
        "id": message_id,
        "ts": ts,
        "room": room,
    }


def user_list(room: str, users: list[str]) -> dict[str, Any]:
    return {"action": "user_list", "success": True, "room": room, "users": users}


def history(room: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"action": "history", "success": True, "room": room, "messages": messages}


def room_list(rooms: list[dict[str, Any]]) -> dict[str, Any]:
    return {"action": "room_list", "success": True, "rooms": rooms}


def echo(value: Any) -> dict[str, Any]:
    return {"echo": value}
