"""Unit tests of the wire protocol (rooms/protocol.py) and the flood limiter (rooms/limits.py)."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from rooms import limits, protocol
from rooms.protocol import ProtocolError

# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "abc",
        "café",
        "math club",
        "数学",
        "a" * 20,
        "x" * 19 + "数",
        "Zoë-42",
        "ab数",
    ],
)
def test_clean_name_accepts_valid_names_unchanged(name):
    assert protocol.clean_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ab",
        "数",
        "a" * 21,
        "数" * 21,
        "   ",
        "ab\x00c",
        "ab\ncd",
        "ab\tcd",
        "ab\x1bcd",
        "ab\x7fcd",
        "ab\x85cd",
        "ab\x9fcd",
    ],
)
def test_clean_name_rejects_too_short_too_long_or_control_characters(name):
    assert protocol.clean_name(name) is None


@pytest.mark.parametrize("value", [None, 123, 1.5, True, ["abc"], {"nick": "abc"}, b"abc"])
def test_clean_name_rejects_non_strings(value):
    assert protocol.clean_name(value) is None


def test_clean_name_trims_outer_whitespace():
    assert protocol.clean_name("  alice \t") == "alice"
    assert protocol.clean_name(" math club ") == "math club"


def test_clean_name_measures_length_after_trimming():
    # Too short once trimmed, although long enough with its spaces.
    assert protocol.clean_name("  ab  ") is None
    # Too long with its spaces, but 20 characters once trimmed.
    assert protocol.clean_name("   " + "a" * 20 + "   ") == "a" * 20


def test_clean_name_counts_a_wide_character_twice_only_toward_the_minimum():
    assert protocol.clean_name("数学") == "数学"
    assert protocol.clean_name("数") is None
    # The maximum counts characters, not columns: 20 wide characters are fine, 21 are not.
    assert protocol.clean_name("数" * 20) == "数" * 20
    assert protocol.clean_name("数" * 21) is None


def test_clean_name_counts_fullwidth_latin_as_wide():
    fullwidth_ab = "\uff21\uff22"
    assert protocol.clean_name(fullwidth_ab) == fullwidth_ab


def test_nick_from_returns_the_cleaned_nick():
    assert protocol.nick_from({"action": "set_nick", "nick": " bob "}) == "bob"


@pytest.mark.parametrize("body", [{}, {"nick": "ab"}, {"nick": 5}, {"nick": "a" * 21}])
def test_nick_from_refuses_with_the_set_nick_name_message(body):
    with pytest.raises(ProtocolError) as caught:
        protocol.nick_from(body)
    assert caught.value.action == "set_nick"
    assert caught.value.message == "Name must be a string and between 3-20 chars."


def test_room_from_returns_the_cleaned_room():
    assert protocol.room_from({"room": " 数学 "}) == "数学"


@pytest.mark.parametrize("body", [{}, {"room": "ab"}, {"room": None}, {"room": "a\x00bc"}])
def test_room_from_refuses_with_the_join_room_message(body):
    with pytest.raises(ProtocolError) as caught:
        protocol.room_from(body)
    assert caught.value.action == "join_room"
    assert caught.value.message == "Room name must be a string and between 3-20 chars."


# --- chat messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["hi", "x", "a" * 2000, "line one\nline two", "tab\there", "crlf\r\n", "数学 ☕ 🎉"]
)
def test_message_text_from_accepts_text_and_keeps_it_verbatim(text):
    assert protocol.message_text_from({"message": text}, 2000) == text


def test_message_text_from_does_not_trim_the_text():
    assert protocol.message_text_from({"message": "  padded  "}, 2000) == "  padded  "


@pytest.mark.parametrize("body", [{}, {"message": ""}, {"message": "  \n\t "}, {"message": 5}])
def test_message_text_from_refuses_empty_or_non_string(body):
    with pytest.raises(ProtocolError) as caught:
        protocol.message_text_from(body, 2000)
    assert caught.value.action == "chat_message"
    assert caught.value.message == "Message must be a non-empty string."


def test_message_text_from_refuses_text_over_the_limit():
    with pytest.raises(ProtocolError) as caught:
        protocol.message_text_from({"message": "a" * 2001}, 2000)
    assert caught.value.action == "chat_message"
    assert caught.value.message == "Message is longer than 2000 characters."


def test_message_text_from_counts_characters_not_bytes():
    assert protocol.message_text_from({"message": "数" * 10}, 10) == "数" * 10


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\x9f"])
def test_message_text_from_refuses_control_characters_other_than_newline_tab_return(char):
    with pytest.raises(ProtocolError) as caught:
        protocol.message_text_from({"message": f"a{char}b"}, 2000)
    assert caught.value.action == "chat_message"
    assert caught.value.message == "Message must not contain control characters."


# --- user_list and history queries ----------------------------------------------------------


def test_user_list_room_from_defaults_to_the_current_room():
    assert protocol.user_list_room_from({"action": "user_list"}, "Default") == "Default"


def test_user_list_room_from_trims_the_named_room():
    assert protocol.user_list_room_from({"room": " math "}, "Default") == "math"


def test_user_list_room_from_passes_unknown_or_short_rooms_through():
    # An unknown room is answered with an empty list, so any string is a fair question.
    assert protocol.user_list_room_from({"room": "zz"}, "Default") == "zz"


@pytest.mark.parametrize("room", [None, 5, ["math"]])
def test_user_list_room_from_refuses_non_string_rooms(room):
    with pytest.raises(ProtocolError) as caught:
        protocol.user_list_room_from({"room": room}, "Default")
    assert caught.value.action == "user_list"
    assert caught.value.message == protocol.ROOM_MESSAGE


def _history(body):
    return protocol.history_query_from(body, current="Default", default_limit=50, max_limit=200)


def test_history_query_defaults_to_current_room_newest_page():
    assert _history({}) == protocol.HistoryQuery(room="Default", before=None, after=None, limit=50)


def test_history_query_reads_room_before_after_and_limit():
    query = _history({"room": " math ", "before": 10, "after": 0, "limit": 200})
    assert query == protocol.HistoryQuery(room="math", before=10, after=0, limit=200)


def test_history_query_treats_null_cursors_as_absent():
    assert _history({"before": None, "after": None}).before is None


def test_history_query_treats_a_null_limit_as_the_default():
    assert _history({"limit": None}).limit == 50


@pytest.mark.parametrize("limit", [0, 201, -1, "5", 1.5, True, [5]])
def test_history_query_refuses_bad_limits(limit):
    with pytest.raises(ProtocolError) as caught:
        _history({"limit": limit})
    assert caught.value.action == "history"
    assert caught.value.message == '"limit" must be an integer from 1 to 200.'


@pytest.mark.parametrize("limit", [1, 200])
def test_history_query_accepts_limit_bounds(limit):
    assert _history({"limit": limit}).limit == limit


@pytest.mark.parametrize("key", ["before", "after"])
@pytest.mark.parametrize("value", [-1, "3", 2.0, True, False, {"id": 1}])
def test_history_query_refuses_bad_cursors(key, value):
    with pytest.raises(ProtocolError) as caught:
        _history({key: value})
    assert caught.value.action == "history"
    assert caught.value.message == f'"{key}" must be a message id (a non-negative integer).'


@pytest.mark.parametrize("room", [5, None, ["math"]])
def test_history_query_refuses_non_string_rooms(room):
    with pytest.raises(ProtocolError) as caught:
        _history({"room": room})
    assert caught.value.action == "history"
    assert caught.value.message == protocol.ROOM_MESSAGE


# --- decoding -------------------------------------------------------------------------------


def test_decode_returns_action_and_body():
    assert protocol.decode('{"action": "user_list", "room": "x"}') == (
        "user_list",
        {"action": "user_list", "room": "x"},
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "Invalid JSON."),
        ("", "Invalid JSON."),
        ("[1, 2]", "A frame must be a JSON object."),
        ('"set_nick"', "A frame must be a JSON object."),
        ("null", "A frame must be a JSON object."),
        ("{}", 'A frame needs an "action" string.'),
        ('{"action": 5}', 'A frame needs an "action" string.'),
        ('{"action": null}', 'A frame needs an "action" string.'),
    ],
)
def test_decode_errors_carry_a_null_action_and_the_reason(text, message):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode(text)
    assert caught.value.action is None
    assert caught.value.message == message


# --- bodies ---------------------------------------------------------------------------------


def test_compat_bodies_have_exact_keys():
    assert protocol.connecting("Default", "User1") == {
        "action": "connecting",
        "room": "Default",
        "user": "User1",
    }
    assert protocol.joined("math", "bob") == {"action": "joined", "room": "math", "user": "bob"}
    assert protocol.left("math", "bob", shame=True) == {
        "action": "left",
        "room": "math",
        "user": "bob",
        "shame": True,
    }
    assert protocol.nick_changed("math", "a1", "b2") == {
        "action": "nick_changed",
        "room": "math",
        "from_user": "a1",
        "to_user": "b2",
    }
    assert protocol.ok("set_nick") == {"action": "set_nick", "success": True, "message": ""}
    assert protocol.fail(None, "Invalid JSON.") == {
        "action": None,
        "success": False,
        "message": "Invalid JSON.",
    }
    assert protocol.user_list("math", ["a", "b"]) == {
        "action": "user_list",
        "success": True,
        "room": "math",
        "users": ["a", "b"],
    }


def test_chat_bodies_carry_id_and_ts_and_the_broadcast_carries_room():
    ts = "2024-01-02T03:04:05.678Z"
    assert protocol.chat_ack("hi", 7, ts) == {
        "action": "chat_message",
        "success": True,
        "message": "hi",
        "id": 7,
        "ts": ts,
    }
    assert protocol.chat_broadcast("math", "bob", "hi", 7, ts) == {
        "action": "chat_message",
        "message": "hi",
        "user": "bob",
        "id": 7,
        "ts": ts,
        "room": "math",
    }


def test_timestamp_is_utc_iso_with_milliseconds_and_z():
    moment = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert protocol.timestamp(moment) == "2024-05-06T07:08:09.123Z"


def test_timestamp_converts_other_zones_to_utc():
    moment = datetime(2024, 5, 6, 9, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    assert protocol.timestamp(moment) == "2024-05-06T07:08:09.000Z"


def test_encode_is_compact_and_keeps_unicode_unescaped():
    text = protocol.encode({"room": "数学", "n": 1})
    assert text == '{"room":"数学","n":1}'
    assert json.loads(text) == {"room": "数学", "n": 1}


# --- the rate limiter -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(limits.time, "monotonic", fake)
    return fake


def test_rate_limiter_allows_a_full_burst_then_refuses(clock):
    limiter = limits.RateLimiter(rate=1.0, burst=3, max_strikes=5)
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    assert limiter.strikes == 1


def test_rate_limiter_refills_at_its_rate(clock):
    limiter = limits.RateLimiter(rate=2.0, burst=2, max_strikes=5)
    assert limiter.allow() and limiter.allow()
    assert not limiter.allow()
    clock.now += 0.5  # one token at 2 per second
    assert limiter.allow()
    assert not limiter.allow()


def test_rate_limiter_never_holds_more_than_its_burst(clock):
    limiter = limits.RateLimiter(rate=100.0, burst=2, max_strikes=5)
    clock.now += 60
    assert [limiter.allow() for _ in range(3)] == [True, True, False]


def test_rate_limiter_is_exhausted_after_max_strikes_refusals_in_a_row(clock):
    limiter = limits.RateLimiter(rate=1.0, burst=1, max_strikes=3)
    assert limiter.allow()
    assert not limiter.allow()
    assert not limiter.allow()
    assert not limiter.exhausted  # two refusals: still tolerated
    assert not limiter.allow()
    assert limiter.exhausted  # the third refusal in a row


def test_rate_limiter_forgives_strikes_after_an_allowed_frame(clock):
    limiter = limits.RateLimiter(rate=1.0, burst=1, max_strikes=3)
    limiter.allow()
    limiter.allow()
    limiter.allow()
    assert limiter.strikes == 2
    clock.now += 1.0
    assert limiter.allow()
    assert limiter.strikes == 0
    assert not limiter.exhausted
