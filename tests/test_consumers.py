"""The /chat and /echo consumers, in process, through the full ASGI application."""

import asyncio
import json
import re
import threading

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from rooms import consumers, protocol, services
from rooms.models import Message, Room
from tests.conftest import asgi_application

pytestmark = pytest.mark.django_db(transaction=True)

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@database_sync_to_async
def stored_messages() -> list[tuple[str, str, str]]:
    return list(Message.objects.order_by("id").values_list("room__name", "author", "text"))


@database_sync_to_async
def seed_messages(room_name: str, count: int) -> list[int]:
    room, _ = Room.objects.get_or_create(name=room_name)
    posts = [
        services.Post(
            channel_name="seed", room_id=room.pk, room_name=room_name, author="seed", text=f"m{i}"
        )
        for i in range(count)
    ]
    return [message.pk for message in services.messages_create(posts=posts, check_presence=False)]


async def pair(connect_chat, room: str | None = None):
    """Two clients in one room (Default unless named), each having seen the other arrive."""
    a = await connect_chat()
    b = await connect_chat()
    assert await a.recv() == {"action": "joined", "room": "Default", "user": b.nick}
    if room is not None:
        await a.join(room)
        assert await b.recv() == {
            "action": "left",
            "room": "Default",
            "user": a.nick,
            "shame": False,
        }
        await b.join(room)
        assert await a.recv() == {"action": "joined", "room": room, "user": b.nick}
    return a, b


async def crowd(connect_chat, count: int):
    """`count` clients in Default, every earlier one having seen each later one arrive."""
    clients = []
    for _ in range(count):
        newcomer = await connect_chat()
        for earlier in clients:
            assert await earlier.recv() == {
                "action": "joined",
                "room": "Default",
                "user": newcomer.nick,
            }
        clients.append(newcomer)
    return clients


async def answer(client, body):
    """Send a request and return its reply, skipping room broadcasts queued before it
    (for tests about something else than those broadcasts)."""
    await client.send(body)
    for _ in range(50):
        frame = await client.recv()
        if "success" in frame:
            return frame
    raise AssertionError("no reply among 50 frames")


async def elsewhere(connect_chat, *others, room: str = "elsewhere"):
    """A client in another room; the `others` (in Default) have seen it come and go."""
    c = await connect_chat()
    for other in others:
        assert (await other.recv())["action"] == "joined"
    await c.join(room)
    for other in others:
        assert (await other.recv())["action"] == "left"
    return c


# --- connecting -----------------------------------------------------------------------------


async def test_connect_sends_connecting_with_default_room_and_a_random_nick(connect_chat):
    client = await connect_chat()
    assert client.greeting == {"action": "connecting", "room": "Default", "user": client.nick}
    assert re.fullmatch(r"User\d+", client.nick)


async def test_connect_sends_a_history_frame_of_the_default_room_after_connecting(connect_chat):
    client = await connect_chat()
    assert client.first_history == {
        "action": "history",
        "success": True,
        "room": "Default",
        "messages": [],
    }


async def test_connect_history_holds_earlier_messages_of_the_default_room(connect_chat):
    a = await connect_chat()
    reply = await a.request({"action": "chat_message", "message": "before you came"})
    b = await connect_chat()
    assert b.first_history["messages"] == [
        {"id": reply["id"], "user": a.nick, "message": "before you came", "ts": reply["ts"]}
    ]


async def test_connect_history_holds_at_most_the_default_limit_newest_messages(connect_chat):
    made = await seed_messages("Default", 55)
    client = await connect_chat()
    assert [m["id"] for m in client.first_history["messages"]] == made[-50:]


async def test_connect_broadcasts_joined_to_others_in_the_room_but_not_to_self(connect_chat):
    a = await connect_chat()
    b = await connect_chat()
    assert await a.recv() == {"action": "joined", "room": "Default", "user": b.nick}
    await b.assert_nothing()
    await a.assert_nothing()


async def test_connect_joined_is_not_sent_to_other_rooms(connect_chat):
    a = await connect_chat()
    await a.join("math")
    await connect_chat()
    await a.assert_nothing()


async def test_connect_gives_each_client_a_distinct_nick(connect_chat):
    clients = [await connect_chat() for _ in range(4)]
    assert len({c.nick.casefold() for c in clients}) == 4


# --- set_nick -------------------------------------------------------------------------------


async def test_set_nick_succeeds_with_the_exact_success_body(connect_chat):
    client = await connect_chat()
    reply = await client.request({"action": "set_nick", "nick": "alice"})
    assert reply == {"action": "set_nick", "success": True, "message": ""}
    users = await client.request({"action": "user_list"})
    assert users["users"] == ["alice"]


async def test_set_nick_broadcasts_nick_changed_to_the_room_but_not_the_actor(connect_chat):
    a, b = await pair(connect_chat)
    old = a.nick
    await a.set_nick("alice")
    assert await b.recv() == {
        "action": "nick_changed",
        "room": "Default",
        "from_user": old,
        "to_user": "alice",
    }
    await a.assert_nothing()


async def test_set_nick_nick_changed_is_not_sent_to_other_rooms(connect_chat):
    a = await connect_chat()
    c = await elsewhere(connect_chat, a)
    await a.set_nick("alice")
    await c.assert_nothing()


async def test_set_nick_nick_changed_names_the_actors_room(connect_chat):
    a, b = await pair(connect_chat, room="math")
    old = b.nick
    await b.set_nick("bobby")
    assert await a.recv() == {
        "action": "nick_changed",
        "room": "math",
        "from_user": old,
        "to_user": "bobby",
    }


@pytest.mark.parametrize(
    "body",
    [
        {"action": "set_nick", "nick": "ab"},
        {"action": "set_nick", "nick": "a" * 21},
        {"action": "set_nick", "nick": "数"},
        {"action": "set_nick", "nick": "  ab  "},
        {"action": "set_nick", "nick": 12345},
        {"action": "set_nick", "nick": None},
        {"action": "set_nick"},
        {"action": "set_nick", "nick": "ali\x00ce"},
        {"action": "set_nick", "nick": "ali\nce"},
    ],
)
async def test_set_nick_refuses_invalid_names_with_the_exact_body(connect_chat, body):
    a, b = await pair(connect_chat)
    reply = await a.request(body)
    assert reply == {
        "action": "set_nick",
        "success": False,
        "message": "Name must be a string and between 3-20 chars.",
    }
    await b.assert_nothing()
    assert (await a.request({"action": "user_list"}))["users"] == [a.nick, b.nick]


async def test_set_nick_refuses_a_nick_in_use_with_the_exact_body(connect_chat):
    a, b = await pair(connect_chat)
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    reply = await b.request({"action": "set_nick", "nick": "alice"})
    assert reply == {
        "action": "set_nick",
        "success": False,
        "message": "Nickname is already in use",
    }
    await a.assert_nothing()
    assert (await b.request({"action": "user_list"}))["users"] == ["alice", b.nick]


async def test_set_nick_refuses_a_nick_in_use_in_another_room(connect_chat):
    a = await connect_chat()
    await a.set_nick("alice")
    await a.join("math")
    b = await connect_chat()
    reply = await b.request({"action": "set_nick", "nick": "alice"})
    assert reply == {"action": "set_nick", "success": False, "message": protocol.NICK_IN_USE}


@pytest.mark.parametrize("other", ["ALICE", "Alice", " aLiCe ", "\uff41\uff4c\uff49\uff43\uff45"])
async def test_set_nick_compares_nicks_case_insensitively(connect_chat, other):
    a, b = await pair(connect_chat)
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    reply = await b.request({"action": "set_nick", "nick": other})
    assert reply == {"action": "set_nick", "success": False, "message": protocol.NICK_IN_USE}


async def test_set_nick_can_reuse_a_nick_after_its_holder_disconnects(connect_chat):
    a, b = await pair(connect_chat)
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    await a.disconnect()
    assert (await b.recv())["action"] == "left"
    await b.set_nick("Alice")
    assert (await b.request({"action": "user_list"}))["users"] == ["Alice"]


async def test_set_nick_to_own_current_nick_succeeds_without_broadcast(connect_chat):
    a, b = await pair(connect_chat)
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    reply = await a.request({"action": "set_nick", "nick": "alice"})
    assert reply == {"action": "set_nick", "success": True, "message": ""}
    await b.assert_nothing()


async def test_set_nick_to_another_case_of_own_nick_succeeds_and_is_announced(connect_chat):
    a, b = await pair(connect_chat)
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    await a.set_nick("Alice")
    assert await b.recv() == {
        "action": "nick_changed",
        "room": "Default",
        "from_user": "alice",
        "to_user": "Alice",
    }


async def test_set_nick_trims_the_nick(connect_chat):
    a, b = await pair(connect_chat)
    await a.set_nick("  alice  ")
    assert (await b.recv())["to_user"] == "alice"


@pytest.mark.parametrize("nick", ["café", "math club", "数学", "n" * 20])
async def test_set_nick_accepts_unicode_and_boundary_names(connect_chat, nick):
    a, b = await pair(connect_chat)
    await a.set_nick(nick)
    assert (await b.recv())["to_user"] == nick
    assert (await b.request({"action": "user_list"}))["users"] == [nick, b.nick]


# --- join_room ------------------------------------------------------------------------------


async def test_join_room_succeeds_with_the_exact_body_and_nothing_else_to_the_actor(connect_chat):
    client = await connect_chat()
    reply = await client.request({"action": "join_room", "room": "math"})
    assert reply == {"action": "join_room", "success": True, "message": ""}
    await client.assert_nothing()
    assert (await client.request({"action": "user_list"})) == {
        "action": "user_list",
        "success": True,
        "room": "math",
        "users": [client.nick],
    }


async def test_join_room_sends_left_without_shame_to_the_old_room(connect_chat):
    a, b = await pair(connect_chat)
    await a.join("math")
    assert await b.recv() == {"action": "left", "room": "Default", "user": a.nick, "shame": False}


async def test_join_room_sends_joined_to_the_new_room_but_not_the_actor(connect_chat):
    a, b = await pair(connect_chat)
    await a.join("math")
    assert (await b.recv())["action"] == "left"
    await b.join("math")
    assert await a.recv() == {"action": "joined", "room": "math", "user": b.nick}
    await b.assert_nothing()


async def test_join_room_moves_broadcasts_to_the_new_room(connect_chat):
    a, b = await pair(connect_chat)
    await a.join("math")
    assert (await b.recv())["action"] == "left"
    await b.request({"action": "chat_message", "message": "anyone in Default?"})
    await a.assert_nothing()


async def test_join_room_refuses_the_current_room_with_the_exact_body(connect_chat):
    a, b = await pair(connect_chat)
    reply = await a.request({"action": "join_room", "room": "Default"})
    assert reply == {
        "action": "join_room",
        "success": False,
        "message": "Name already in use in this room.",
    }
    await b.assert_nothing()


async def test_join_room_refuses_the_current_room_after_trimming(connect_chat):
    client = await connect_chat()
    await client.join("math")
    reply = await client.request({"action": "join_room", "room": "  math "})
    assert reply == {"action": "join_room", "success": False, "message": protocol.ALREADY_IN_ROOM}


@pytest.mark.parametrize(
    "body",
    [
        {"action": "join_room", "room": "ab"},
        {"action": "join_room", "room": "r" * 21},
        {"action": "join_room", "room": "数"},
        {"action": "join_room", "room": 42},
        {"action": "join_room"},
        {"action": "join_room", "room": "ma\x07th"},
    ],
)
async def test_join_room_refuses_invalid_room_names_with_the_exact_body(connect_chat, body):
    a, b = await pair(connect_chat)
    reply = await a.request(body)
    assert reply == {
        "action": "join_room",
        "success": False,
        "message": "Room name must be a string and between 3-20 chars.",
    }
    await b.assert_nothing()
    assert (await a.request({"action": "user_list"}))["room"] == "Default"


@pytest.mark.parametrize("room", ["café", "math club", "数学", "r" * 20])
async def test_join_room_accepts_unicode_and_boundary_room_names(connect_chat, room):
    a, b = await pair(connect_chat, room=room)
    assert await a.request({"action": "user_list"}) == {
        "action": "user_list",
        "success": True,
        "room": room,
        "users": [a.nick, b.nick],
    }
    assert (await a.request({"action": "room_list"}))["rooms"] == [{"room": room, "users": 2}]


async def test_join_room_unicode_names_reach_the_wire_unescaped(connect_chat):
    a, b = await pair(connect_chat)
    await a.join("数学")
    raw = await b.recv_raw()
    assert json.loads(raw)["action"] == "left"
    await b.join("数学")
    raw = await a.recv_raw()
    assert '"room":"数学"' in raw


async def test_join_room_trims_the_room_name(connect_chat):
    client = await connect_chat()
    await client.join("  math  ")
    assert (await client.request({"action": "user_list"}))["room"] == "math"


# --- chat_message ---------------------------------------------------------------------------


async def test_chat_message_ack_carries_text_id_and_ts(connect_chat):
    client = await connect_chat()
    reply = await client.request({"action": "chat_message", "message": "hello"})
    assert reply == {
        "action": "chat_message",
        "success": True,
        "message": "hello",
        "id": reply["id"],
        "ts": reply["ts"],
    }
    assert isinstance(reply["id"], int)
    assert not isinstance(reply["id"], bool)
    assert TS.fullmatch(reply["ts"])


async def test_chat_message_is_stored_before_the_ack(connect_chat):
    client = await connect_chat()
    await client.join("math")
    reply = await client.request({"action": "chat_message", "message": "kept"})

    @database_sync_to_async
    def row():
        return list(
            Message.objects.filter(pk=reply["id"]).values_list("room__name", "author", "text")
        )

    assert await row() == [("math", client.nick, "kept")]


async def test_chat_message_broadcast_reaches_room_members_with_the_same_id_and_ts(connect_chat):
    a, b = await pair(connect_chat, room="math")
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    ack = await a.request({"action": "chat_message", "message": "hi all"})
    assert await b.recv() == {
        "action": "chat_message",
        "message": "hi all",
        "user": "alice",
        "id": ack["id"],
        "ts": ack["ts"],
        "room": "math",
    }
    await a.assert_nothing()


async def test_chat_message_is_not_broadcast_to_other_rooms(connect_chat):
    a, b = await pair(connect_chat)
    c = await elsewhere(connect_chat, a, b)
    await a.request({"action": "chat_message", "message": "Default only"})
    assert (await b.recv())["message"] == "Default only"
    await c.assert_nothing()


@pytest.mark.parametrize(
    "text", ["x", "a" * 2000, "two\nlines", "tab\tand\rreturn", "数学 café ☕", "  spaced  "]
)
async def test_chat_message_accepts_and_relays_text_verbatim(connect_chat, text):
    a, b = await pair(connect_chat)
    ack = await a.request({"action": "chat_message", "message": text})
    assert ack["message"] == text
    assert (await b.recv())["message"] == text
    assert await stored_messages() == [("Default", a.nick, text)]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("", "Message must be a non-empty string."),
        ("   \n ", "Message must be a non-empty string."),
        (None, "Message must be a non-empty string."),
        (42, "Message must be a non-empty string."),
        (["hi"], "Message must be a non-empty string."),
        ("a" * 2001, "Message is longer than 2000 characters."),
        ("bell\x07", "Message must not contain control characters."),
        ("nul\x00", "Message must not contain control characters."),
        ("esc\x1b[31m", "Message must not contain control characters."),
        ("del\x7f", "Message must not contain control characters."),
    ],
)
async def test_chat_message_refuses_bad_text_and_stores_and_broadcasts_nothing(
    connect_chat, message, reason
):
    a, b = await pair(connect_chat)
    reply = await a.request({"action": "chat_message", "message": message})
    assert reply == {"action": "chat_message", "success": False, "message": reason}
    await b.assert_nothing()
    assert await stored_messages() == []


async def test_chat_message_checks_length_before_control_characters(connect_chat):
    client = await connect_chat()
    reply = await client.request({"action": "chat_message", "message": "\x07" + "a" * 2000})
    assert reply["message"] == "Message is longer than 2000 characters."


async def test_chat_message_without_message_key_is_refused(connect_chat):
    client = await connect_chat()
    reply = await client.request({"action": "chat_message"})
    assert reply == {
        "action": "chat_message",
        "success": False,
        "message": "Message must be a non-empty string.",
    }
    assert await stored_messages() == []


async def test_chat_message_limit_follows_the_setting(connect_chat, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 5
    client = await connect_chat()
    assert (await client.request({"action": "chat_message", "message": "12345"}))["success"]
    reply = await client.request({"action": "chat_message", "message": "123456"})
    assert reply == {
        "action": "chat_message",
        "success": False,
        "message": "Message is longer than 5 characters.",
    }


async def test_chat_message_is_attributed_to_the_current_nick(connect_chat):
    a, b = await pair(connect_chat)
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    await a.request({"action": "chat_message", "message": "one"})
    assert (await b.recv())["user"] == "alice"
    assert await stored_messages() == [("Default", "alice", "one")]


# --- user_list ------------------------------------------------------------------------------


async def test_user_list_lists_the_own_room_in_order_of_entry(connect_chat):
    a, b, c = await crowd(connect_chat, 3)
    assert await a.request({"action": "user_list"}) == {
        "action": "user_list",
        "success": True,
        "room": "Default",
        "users": [a.nick, b.nick, c.nick],
    }


async def test_user_list_order_is_entry_order_not_connection_order(connect_chat):
    a, b, c = await crowd(connect_chat, 3)
    for client in (c, a, b):
        assert (await answer(client, {"action": "join_room", "room": "math"}))["success"]
    assert (await answer(a, {"action": "user_list", "room": "math"}))["users"] == [
        c.nick,
        a.nick,
        b.nick,
    ]
    assert (await answer(c, {"action": "join_room", "room": "other"}))["success"]
    assert (await answer(c, {"action": "join_room", "room": "math"}))["success"]
    assert (await answer(b, {"action": "user_list", "room": "math"}))["users"] == [
        a.nick,
        b.nick,
        c.nick,
    ]


async def test_user_list_of_another_room(connect_chat):
    a, b = await pair(connect_chat)
    await b.join("math")
    assert (await a.recv())["action"] == "left"
    assert await a.request({"action": "user_list", "room": "math"}) == {
        "action": "user_list",
        "success": True,
        "room": "math",
        "users": [b.nick],
    }


async def test_user_list_of_an_unknown_room_is_empty(connect_chat):
    client = await connect_chat()
    assert await client.request({"action": "user_list", "room": "nowhere"}) == {
        "action": "user_list",
        "success": True,
        "room": "nowhere",
        "users": [],
    }


async def test_user_list_without_room_means_own_room(connect_chat):
    client = await connect_chat()
    await client.join("数学")
    reply = await client.request({"action": "user_list"})
    assert (reply["room"], reply["users"]) == ("数学", [client.nick])


@pytest.mark.parametrize("room", [7, None, ["math"]])
async def test_user_list_refuses_a_non_string_room(connect_chat, room):
    client = await connect_chat()
    assert await client.request({"action": "user_list", "room": room}) == {
        "action": "user_list",
        "success": False,
        "message": "Room name must be a string and between 3-20 chars.",
    }


async def test_user_list_trims_the_room_but_does_not_apply_the_name_rules(connect_chat):
    client = await connect_chat()
    await client.join("math")
    assert (await client.request({"action": "user_list", "room": " math "}))["users"] == [
        client.nick
    ]
    assert await client.request({"action": "user_list", "room": " ab "}) == {
        "action": "user_list",
        "success": True,
        "room": "ab",
        "users": [],
    }


async def test_user_list_drops_disconnected_users(connect_chat):
    a, b = await pair(connect_chat)
    await b.disconnect()
    assert (await a.recv())["action"] == "left"
    assert (await a.request({"action": "user_list"}))["users"] == [a.nick]


# --- history --------------------------------------------------------------------------------


async def test_history_default_is_the_newest_fifty_of_the_own_room_oldest_first(connect_chat):
    client = await connect_chat()
    await client.join("math")
    made = await seed_messages("math", 60)
    await seed_messages("other", 3)
    reply = await client.request({"action": "history"})
    assert (reply["action"], reply["success"], reply["room"]) == ("history", True, "math")
    assert [m["id"] for m in reply["messages"]] == made[-50:]
    first = reply["messages"][0]
    assert set(first) == {"id", "user", "message", "ts"}
    assert (first["user"], first["message"]) == ("seed", "m10")
    assert TS.fullmatch(first["ts"])


async def test_history_before_returns_the_page_below_an_id(connect_chat):
    client = await connect_chat()
    made = await seed_messages("Default", 10)
    reply = await client.request({"action": "history", "before": made[5], "limit": 3})
    assert [m["id"] for m in reply["messages"]] == made[2:5]


async def test_history_after_returns_the_page_after_an_id(connect_chat):
    client = await connect_chat()
    made = await seed_messages("Default", 10)
    reply = await client.request({"action": "history", "after": made[5], "limit": 3})
    assert [m["id"] for m in reply["messages"]] == made[6:9]


async def test_history_of_another_named_room(connect_chat):
    client = await connect_chat()
    made = await seed_messages("math", 2)
    reply = await client.request({"action": "history", "room": "math"})
    assert reply["room"] == "math"
    assert [m["id"] for m in reply["messages"]] == made


async def test_history_trims_the_room_but_does_not_apply_the_name_rules(connect_chat):
    client = await connect_chat()
    made = await seed_messages("math", 1)
    reply = await client.request({"action": "history", "room": " math "})
    assert (reply["room"], [m["id"] for m in reply["messages"]]) == ("math", made)
    assert await client.request({"action": "history", "room": " ab "}) == {
        "action": "history",
        "success": True,
        "room": "ab",
        "messages": [],
    }


async def test_history_of_an_unknown_room_is_empty(connect_chat):
    client = await connect_chat()
    assert await client.request({"action": "history", "room": "nowhere"}) == {
        "action": "history",
        "success": True,
        "room": "nowhere",
        "messages": [],
    }


async def test_history_treats_null_cursors_as_absent(connect_chat):
    client = await connect_chat()
    made = await seed_messages("Default", 3)
    reply = await client.request({"action": "history", "before": None, "after": None})
    assert [m["id"] for m in reply["messages"]] == made


async def test_history_accepts_cursors_beyond_any_stored_id(connect_chat):
    client = await connect_chat()
    made = await seed_messages("Default", 2)
    reply = await client.request({"action": "history", "before": 10**30})
    assert [m["id"] for m in reply["messages"]] == made
    reply = await client.request({"action": "history", "after": 2**63})
    assert reply == {"action": "history", "success": True, "room": "Default", "messages": []}


async def test_history_before_and_after_give_the_newest_page_between(connect_chat):
    client = await connect_chat()
    made = await seed_messages("Default", 10)
    reply = await client.request(
        {"action": "history", "after": made[1], "before": made[8], "limit": 2}
    )
    assert [m["id"] for m in reply["messages"]] == made[6:8]


@pytest.mark.parametrize("limit", [1, 200])
async def test_history_accepts_limit_bounds(connect_chat, limit):
    client = await connect_chat()
    made = await seed_messages("Default", 205)
    reply = await client.request({"action": "history", "limit": limit})
    assert [m["id"] for m in reply["messages"]] == made[-limit:]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"limit": 0}, '"limit" must be an integer from 1 to 200.'),
        ({"limit": 201}, '"limit" must be an integer from 1 to 200.'),
        ({"limit": "10"}, '"limit" must be an integer from 1 to 200.'),
        ({"limit": 2.5}, '"limit" must be an integer from 1 to 200.'),
        ({"limit": 5.0}, '"limit" must be an integer from 1 to 200.'),
        ({"limit": True}, '"limit" must be an integer from 1 to 200.'),
        ({"before": "5"}, '"before" must be a message id (a non-negative integer).'),
        ({"before": -1}, '"before" must be a message id (a non-negative integer).'),
        ({"after": 1.5}, '"after" must be a message id (a non-negative integer).'),
        ({"after": False}, '"after" must be a message id (a non-negative integer).'),
        ({"room": 3}, "Room name must be a string and between 3-20 chars."),
        ({"room": None}, "Room name must be a string and between 3-20 chars."),
        # The checks run in the documented order: room, limit, before, after.
        ({"room": 3, "limit": 0, "before": -1}, protocol.ROOM_MESSAGE),
        ({"limit": 0, "before": -1, "after": -1}, '"limit" must be an integer from 1 to 200.'),
        ({"before": -1, "after": -1}, '"before" must be a message id (a non-negative integer).'),
    ],
)
async def test_history_refuses_bad_parameters_with_the_exact_body(connect_chat, extra, message):
    client = await connect_chat()
    reply = await client.request({"action": "history", **extra})
    assert reply == {"action": "history", "success": False, "message": message}


# --- room_list ------------------------------------------------------------------------------


async def test_room_list_lists_occupied_rooms_busiest_first(connect_chat):
    a, b, c = await crowd(connect_chat, 3)
    assert (await answer(b, {"action": "join_room", "room": "math"}))["success"]
    assert (await answer(c, {"action": "join_room", "room": "math"}))["success"]
    assert await answer(a, {"action": "room_list"}) == {
        "action": "room_list",
        "success": True,
        "rooms": [{"room": "math", "users": 2}, {"room": "Default", "users": 1}],
    }


async def test_room_list_omits_rooms_everyone_left(connect_chat):
    client = await connect_chat()
    await client.join("math")
    assert (await client.request({"action": "room_list"}))["rooms"] == [
        {"room": "math", "users": 1}
    ]


# --- unknown actions and bad frames ---------------------------------------------------------


@pytest.mark.parametrize(
    "action",
    ["dance", "connecting", "joined", "left", "SET_NICK", "", "websocket_disconnect", "send_body"],
)
async def test_unknown_action_is_not_allowed_with_the_exact_body(connect_chat, action):
    client = await connect_chat()
    reply = await client.request({"action": action})
    assert reply == {"action": action, "success": False, "message": "Not allowed."}
    assert (await client.request({"action": "user_list"}))["success"] is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{oops", "Invalid JSON."),
        ("", "Invalid JSON."),
        ("[1, 2, 3]", "A frame must be a JSON object."),
        ('"user_list"', "A frame must be a JSON object."),
        ("{}", 'A frame needs an "action" string.'),
        ('{"room": "math"}', 'A frame needs an "action" string.'),
        ('{"action": 7}', 'A frame needs an "action" string.'),
    ],
)
async def test_bad_frame_gets_a_null_action_error_and_the_socket_stays_open(
    connect_chat, text, message
):
    client = await connect_chat()
    await client.comm.send_input({"type": "websocket.receive", "text": text})
    assert await client.recv() == {"action": None, "success": False, "message": message}
    assert (await client.request({"action": "user_list"}))["users"] == [client.nick]


async def test_binary_frame_closes_the_socket_with_1003(connect_chat):
    a, b = await pair(connect_chat)
    await b.comm.send_to(bytes_data=b'{"action": "user_list"}')
    assert await b.recv_close() == 1003
    await b.disconnect(1003)
    assert await a.recv() == {"action": "left", "room": "Default", "user": b.nick, "shame": False}


async def test_oversized_frame_closes_the_socket_with_1009(connect_chat, settings):
    settings.CHAT_MAX_FRAME_BYTES = 100
    client = await connect_chat()
    await client.send_text(json.dumps({"action": "chat_message", "message": "x" * 100}))
    assert await client.recv_close() == 1009
    await client.disconnect(1009)
    assert await stored_messages() == []


async def test_frame_size_is_measured_in_utf8_bytes(connect_chat, settings):
    settings.CHAT_MAX_FRAME_BYTES = 100
    client = await connect_chat()
    frame = '{"action":"chat_message","message":"' + "数" * 20 + '"}'  # 98 bytes, 58 chars
    assert len(frame.encode()) == 98
    await client.send_text(frame)
    assert (await client.recv())["success"] is True
    frame = '{"action":"chat_message","message":"' + "数" * 22 + '"}'  # 104 bytes, 60 chars
    await client.send_text(frame)
    assert await client.recv_close() == 1009
    await client.disconnect(1009)


async def test_frame_of_exactly_the_limit_is_accepted(connect_chat, settings):
    settings.CHAT_MAX_FRAME_BYTES = 64
    client = await connect_chat()
    frame = '{"action":"chat_message","message":"' + "y" * 26 + '"}'
    assert len(frame.encode()) == 64
    await client.send_text(frame)
    assert (await client.recv())["success"] is True


@pytest.fixture
def strict_rate(settings):
    """Three frames of burst, no meaningful refill, the third refusal in a row closes."""
    settings.CHAT_RATE_PER_SEC = 0.001
    settings.CHAT_RATE_BURST = 3
    settings.CHAT_RATE_STRIKES = 3


async def test_flooding_gets_slow_down_replies_then_close_1008(connect_chat, strict_rate):
    client = await connect_chat()
    for _ in range(3):
        assert (await client.request({"action": "user_list"}))["success"] is True
    # Refusals short of CHAT_RATE_STRIKES in a row leave the socket open...
    for _ in range(2):
        assert await client.request({"action": "user_list"}) == {
            "action": "user_list",
            "success": False,
            "message": "Rate limit exceeded: slow down.",
        }
    # ...the CHAT_RATE_STRIKES-th is refused too, and ends the connection.
    assert await client.request({"action": "chat_message", "message": "more"}) == {
        "action": "chat_message",
        "success": False,
        "message": "Rate limit exceeded: slow down.",
    }
    assert await client.recv_close() == 1008
    await client.disconnect(1008)
    assert await stored_messages() == []


async def test_flooding_counts_bad_frames_too(connect_chat, strict_rate):
    client = await connect_chat()
    for _ in range(3):
        await client.send_text("not json")
        assert (await client.recv())["message"] == "Invalid JSON."
    await client.send_text("not json")
    assert await client.recv() == {
        "action": None,
        "success": False,
        "message": "Rate limit exceeded: slow down.",
    }


async def test_rate_limited_frames_are_not_executed(connect_chat, strict_rate):
    a, b = await pair(connect_chat)
    for _ in range(3):
        await a.request({"action": "user_list"})
    reply = await a.request({"action": "set_nick", "nick": "alice"})
    assert reply == {"action": "set_nick", "success": False, "message": protocol.SLOW_DOWN}
    await b.assert_nothing()
    assert (await b.request({"action": "user_list"}))["users"] == [a.nick, b.nick]


# --- ordering and server-side failures ----------------------------------------------------


async def test_pipelined_frames_get_one_reply_each_in_order(connect_chat):
    client = await connect_chat()
    requests = [
        {"action": "chat_message", "message": "one"},
        {"action": "set_nick", "nick": "piper"},
        {"action": "chat_message", "message": "two"},
        {"action": "dance"},
        {"action": "user_list"},
        {"action": "history"},
    ]
    for body in requests:
        await client.send(body)
    replies = [await client.recv() for _ in requests]
    assert [(r["action"], r["success"]) for r in replies] == [
        ("chat_message", True),
        ("set_nick", True),
        ("chat_message", True),
        ("dance", False),
        ("user_list", True),
        ("history", True),
    ]
    assert replies[4]["users"] == ["piper"]
    assert [(m["user"], m["message"]) for m in replies[5]["messages"]] == [
        (client.nick, "one"),
        ("piper", "two"),
    ]
    await client.assert_nothing()


async def test_back_to_back_posts_are_stored_acknowledged_and_heard_in_the_order_sent(
    connect_chat,
):
    a, b = await pair(connect_chat)
    texts = [f"m{i}" for i in range(15)]  # within the rate limit's burst
    for text in texts:
        await a.send({"action": "chat_message", "message": text})
    acks = [await a.recv() for _ in texts]
    assert [ack["message"] for ack in acks] == texts
    ids = [ack["id"] for ack in acks]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    heard = [await b.recv() for _ in texts]
    assert [(m["id"], m["message"]) for m in heard] == list(zip(ids, texts, strict=True))
    assert [text for _, _, text in await stored_messages()] == texts


async def test_a_refused_post_is_answered_after_the_posts_before_it(connect_chat):
    client = await connect_chat()
    await client.send({"action": "chat_message", "message": "fine"})
    await client.send({"action": "chat_message", "message": ""})
    await client.send({"action": "chat_message", "message": "also fine"})
    replies = [await client.recv() for _ in range(3)]
    assert [(r["success"], r["message"]) for r in replies] == [
        (True, "fine"),
        (False, "Message must be a non-empty string."),
        (True, "also fine"),
    ]


async def test_posts_after_a_batch_the_database_refused_are_answered_in_order(
    connect_chat, monkeypatch
):
    from django.db import OperationalError

    store = services.messages_create
    calls = 0

    def first_batch_fails(**kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("database is down")
        return store(**kwargs)

    monkeypatch.setattr(services, "messages_create", first_batch_fails)
    client = await connect_chat()
    texts = [f"m{i}" for i in range(6)]
    for text in texts:
        await client.send({"action": "chat_message", "message": text})
    replies = [await client.recv() for _ in texts]

    # However many posts the refused batch held, they are answered first, in order, and
    # every later post is acknowledged after them, in order.
    refused = [r for r in replies if not r["success"]]
    assert refused and replies[: len(refused)] == refused
    assert {r["message"] for r in refused} == {protocol.UNAVAILABLE}
    assert [r["message"] for r in replies[len(refused) :]] == texts[len(refused) :]
    assert [text for _, _, text in await stored_messages()] == texts[len(refused) :]
    await client.assert_nothing()


async def test_a_sender_is_not_read_while_a_window_of_its_posts_waits_for_its_commit(
    connect_chat, monkeypatch, settings
):
    settings.CHAT_RATE_PER_SEC = 1_000_000
    settings.CHAT_RATE_BURST = 1_000_000
    store = services.messages_create
    release = threading.Event()

    def held_commit(**kwargs):
        release.wait(timeout=10)
        return store(**kwargs)

    monkeypatch.setattr(services, "messages_create", held_commit)
    waiting = consumers.ChatConsumer._post_answered
    window_full = asyncio.Event()
    in_flight: list[int] = []

    async def noting_the_wait(self):
        in_flight.append(len(self._posts))
        window_full.set()
        await waiting(self)

    monkeypatch.setattr(consumers.ChatConsumer, "_post_answered", noting_the_wait)
    client = await connect_chat()
    texts = [f"m{i}" for i in range(consumers.MAX_POSTS_IN_FLIGHT + 3)]
    try:
        for text in texts:
            await client.send({"action": "chat_message", "message": text})
        await asyncio.wait_for(window_full.wait(), timeout=5)
        # One frame past the window is read and waits for room in it; the rest stay unread.
        assert in_flight == [consumers.MAX_POSTS_IN_FLIGHT]
        assert client.comm.input_queue.qsize() == 2
    finally:
        release.set()
    acks = [await client.recv() for _ in texts]
    assert [(ack["success"], ack["message"]) for ack in acks] == [(True, t) for t in texts]
    assert [text for _, _, text in await stored_messages()] == texts


async def test_posts_sent_just_before_closing_are_heard_before_the_sender_leaves(connect_chat):
    a, b = await pair(connect_chat)
    for text in ("last", "words"):
        await a.send({"action": "chat_message", "message": text})
    await a.disconnect()
    frames = [await b.recv() for _ in range(3)]
    assert [(f["action"], f.get("message")) for f in frames] == [
        ("chat_message", "last"),
        ("chat_message", "words"),
        ("left", None),
    ]
    assert [text for _, _, text in await stored_messages()] == ["last", "words"]


async def test_connect_that_cannot_be_seated_gets_unavailable_then_close_1013(monkeypatch):
    from django.db import OperationalError

    def database_down(**_kwargs):
        raise OperationalError("database is down")

    monkeypatch.setattr(services, "presence_connect", database_down)
    comm = WebsocketCommunicator(asgi_application(), "/chat")
    try:
        connected, _ = await comm.connect()
        assert connected
        assert await comm.receive_json_from() == {
            "action": "connecting",
            "success": False,
            "message": "Service temporarily unavailable, nothing was changed. Try again.",
        }
        assert await comm.receive_output() == {"type": "websocket.close", "code": 1013}
    finally:
        await comm.disconnect(1013)


@database_sync_to_async
def sweep_presence_of(nick: str) -> None:
    from rooms.models import Presence

    assert Presence.objects.filter(nick=nick).delete()[0] == 1


@pytest.mark.parametrize(
    "body",
    [{"action": "set_nick", "nick": "alice"}, {"action": "join_room", "room": "math"}],
)
async def test_action_of_a_swept_connection_gets_unavailable_then_close_1013(connect_chat, body):
    client = await connect_chat()
    await sweep_presence_of(client.nick)
    assert await client.request(body) == {
        "action": body["action"],
        "success": False,
        "message": protocol.UNAVAILABLE,
    }
    assert await client.recv_close() == 1013


async def test_post_of_a_connection_swept_while_its_heartbeat_lapsed_is_refused(connect_chat):
    from rooms.hub import get_hub

    client = await connect_chat()
    await sweep_presence_of(client.nick)
    # Only a process whose heartbeat lapsed can have been swept; make this one look so.
    get_hub()._heartbeat_ok_at = None
    assert await client.request({"action": "chat_message", "message": "still me?"}) == {
        "action": "chat_message",
        "success": False,
        "message": protocol.UNAVAILABLE,
    }
    assert await client.recv_close() == 1013
    assert await stored_messages() == []


@database_sync_to_async
def insert_presence(channel_name: str, process: str, nick: str) -> None:
    from rooms.models import Presence, name_key

    Presence.objects.create(
        channel_name=channel_name,
        process=process,
        worker="w",
        nick=nick,
        nick_key=name_key(nick),
        room=Room.objects.get(name="Default"),
    )


@database_sync_to_async
def present_nicks() -> set[str]:
    from rooms.models import Presence

    return set(Presence.objects.values_list("nick", flat=True))


async def test_heartbeat_removes_rows_of_this_process_with_no_connection_silently(connect_chat):
    """A disconnect whose removal was lost (a database crash after a relaxed commit) must not
    keep a ghost in the room, heartbeated forever, holding its nick."""
    from rooms.hub import get_hub

    a, b = await pair(connect_chat)
    hub = get_hub()
    await insert_presence(f"{hub.process}|999999", hub.process, "ghost")
    await hub.heartbeat()
    assert await present_nicks() == {a.nick, b.nick}
    # Its room heard `left` when it closed: nothing more is sent (the replies come next).
    assert (await a.request({"action": "user_list"}))["users"] == [a.nick, b.nick]
    assert (await b.request({"action": "user_list"}))["users"] == [a.nick, b.nick]


async def test_a_consumer_the_server_gives_up_on_leaves_its_seat_to_the_heartbeat(connect_chat):
    """daphne cancels an application some seconds after its socket closed; if that lands
    before the disconnect is handled, the seat must not be held until the process restarts."""
    from rooms.hub import get_hub

    a, b = await pair(connect_chat)
    a.comm.future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a.comm.future
    a.closed = True
    hub = get_hub()
    assert [member.seat.nick for member in hub.members.values()] == [b.nick]

    await hub.heartbeat()

    assert await present_nicks() == {b.nick}
    assert await b.recv() == {"action": "left", "room": "Default", "user": a.nick, "shame": False}


async def test_heartbeat_keeps_the_row_of_a_connection_being_seated(connect_chat):
    from rooms.hub import get_hub

    a = await connect_chat()
    hub = get_hub()
    # Seated in the database, not yet attached to the hub: the heartbeat can run in between.
    address = hub.address()
    await insert_presence(address, hub.process, "arriving")
    await hub.heartbeat()
    assert await present_nicks() == {a.nick, "arriving"}


async def test_database_error_in_an_action_gets_unavailable_and_the_socket_stays_open(
    connect_chat, monkeypatch
):
    from django.db import OperationalError

    from rooms import selectors

    client = await connect_chat()

    def database_down(**_kwargs):
        raise OperationalError("database is down")

    monkeypatch.setattr(selectors, "room_users", database_down)
    assert await client.request({"action": "user_list"}) == {
        "action": "user_list",
        "success": False,
        "message": "Service temporarily unavailable, nothing was changed. Try again.",
    }
    monkeypatch.undo()
    assert (await client.request({"action": "user_list"}))["users"] == [client.nick]


async def test_unexpected_error_in_an_action_gets_internal_error_and_the_socket_stays_open(
    connect_chat, monkeypatch
):
    from rooms import selectors

    client = await connect_chat()

    def broken():
        raise RuntimeError("bug")

    monkeypatch.setattr(selectors, "room_list", broken)
    assert await client.request({"action": "room_list"}) == {
        "action": "room_list",
        "success": False,
        "message": "Internal error, nothing was changed.",
    }
    monkeypatch.undo()
    assert (await client.request({"action": "room_list"}))["success"] is True


@pytest.mark.parametrize("path", ["/chat", "/echo"])
async def test_connect_while_shutting_down_completes_the_handshake_then_closes_1001(path):
    from rooms.hub import get_hub

    get_hub().shutting_down = True
    comm = WebsocketCommunicator(asgi_application(), path)
    try:
        assert await comm.connect() == (True, None)
        assert await comm.receive_output() == {"type": "websocket.close", "code": 1001}
    finally:
        await comm.disconnect(1001)


# --- leaving: the shame rule ----------------------------------------------------------------


async def test_disconnect_with_1006_sends_left_with_shame(connect_chat):
    a, b = await pair(connect_chat)
    await b.disconnect(1006)
    assert await a.recv() == {"action": "left", "room": "Default", "user": b.nick, "shame": True}


@pytest.mark.parametrize("code", [1000, 1001])
async def test_clean_disconnect_sends_left_without_shame(connect_chat, code):
    a, b = await pair(connect_chat, room="math")
    await b.disconnect(code)
    assert await a.recv() == {"action": "left", "room": "math", "user": b.nick, "shame": False}


async def test_disconnect_left_is_not_sent_to_other_rooms(connect_chat):
    a = await connect_chat()
    c = await elsewhere(connect_chat, a)
    await a.disconnect()
    await c.assert_nothing()


async def test_disconnect_frees_the_nick_and_removes_the_user(connect_chat):
    a, b = await pair(connect_chat)
    await a.set_nick("alice")
    assert (await b.recv())["action"] == "nick_changed"
    await a.disconnect(1006)
    assert (await b.recv())["shame"] is True
    assert (await b.request({"action": "room_list"}))["rooms"] == [{"room": "Default", "users": 1}]
    await b.set_nick("alice")


# --- /echo ----------------------------------------------------------------------------------


async def echo_comm():
    comm = WebsocketCommunicator(asgi_application(), "/echo")
    connected, _ = await comm.connect()
    assert connected
    return comm


@pytest.mark.parametrize(
    "value", [{"hello": ["world", 1, None]}, [1, 2], "text", 5, 2.5, True, None, "数学"]
)
async def test_echo_returns_any_json_value_wrapped(value):
    comm = await echo_comm()
    try:
        await comm.send_to(text_data=json.dumps(value))
        assert await comm.receive_json_from() == {"echo": value}
    finally:
        await comm.disconnect()


async def test_echo_answers_invalid_json_with_the_null_action_error_and_stays_open():
    comm = await echo_comm()
    try:
        await comm.send_to(text_data="{nope")
        assert await comm.receive_json_from() == {
            "action": None,
            "success": False,
            "message": "Invalid JSON.",
        }
        await comm.send_json_to({"again": 1})
        assert await comm.receive_json_from() == {"echo": {"again": 1}}
    finally:
        await comm.disconnect()


async def test_echo_closes_on_binary_with_1003():
    comm = await echo_comm()
    try:
        await comm.send_to(bytes_data=b"\x00\x01")
        assert await comm.receive_output() == {"type": "websocket.close", "code": 1003}
    finally:
        await comm.disconnect(1003)


async def test_echo_closes_on_an_oversized_frame_with_1009(settings):
    settings.CHAT_MAX_FRAME_BYTES = 50
    comm = await echo_comm()
    try:
        await comm.send_to(text_data=json.dumps("x" * 48))
        assert await comm.receive_json_from() == {"echo": "x" * 48}
        await comm.send_to(text_data=json.dumps("x" * 49))
        assert await comm.receive_output() == {"type": "websocket.close", "code": 1009}
    finally:
        await comm.disconnect(1009)


async def test_echo_is_rate_limited_like_chat(strict_rate):
    comm = await echo_comm()
    try:
        for number in range(3):
            await comm.send_to(text_data=str(number))
            assert await comm.receive_json_from() == {"echo": number}
        for _ in range(3):
            await comm.send_to(text_data="7")
            assert await comm.receive_json_from() == {
                "action": None,
                "success": False,
                "message": "Rate limit exceeded: slow down.",
            }
        assert (await comm.receive_output())["code"] == 1008
    finally:
        await comm.disconnect()


# --- origin policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        b"http://evil.example",
        b"https://evil.example:443",
        b"http://localhost.evil.example",
        b"http://sub.localhost",
        b"null",
    ],
)
@pytest.mark.parametrize("path", ["/chat", "/echo"])
async def test_foreign_origin_is_refused_before_the_handshake(origin, path):
    comm = WebsocketCommunicator(asgi_application(), path, headers=[(b"origin", origin)])
    connected, code = await comm.connect()
    # Closing before accepting is what ASGI servers turn into HTTP 403.
    assert (connected, code) == (False, 1000)
    await comm.wait()


async def test_foreign_origin_does_not_seat_a_presence(connect_chat):
    a = await connect_chat()
    comm = WebsocketCommunicator(
        asgi_application(), "/chat", headers=[(b"origin", b"http://x.test")]
    )
    assert (await comm.connect())[0] is False
    await comm.wait()
    await a.assert_nothing()
    assert (await a.request({"action": "user_list"}))["users"] == [a.nick]


async def test_no_origin_is_accepted(connect_chat):
    client = await connect_chat(headers=[])
    assert client.greeting["action"] == "connecting"


@pytest.mark.parametrize(
    "origin", [b"http://localhost:8080", b"https://127.0.0.1", b"http://[::1]:9000"]
)
async def test_origin_on_an_allowed_host_is_accepted(connect_chat, origin):
    client = await connect_chat(headers=[(b"origin", origin)])
    assert client.greeting["room"] == "Default"


async def test_a_consumer_that_asks_for_a_layer_mailbox_gets_one():
    from channels.layers import get_channel_layer

    from rooms.consumers import EchoConsumer

    class WithMailbox(EchoConsumer):
        channel_layer_alias = "default"

        async def opened(self) -> None:
            await self.channel_layer.group_add("mailbox-test", self.channel_name)

        async def relay(self, event) -> None:
            await self.send_body({"relayed": event["n"]})

    comm = WebsocketCommunicator(WithMailbox.as_asgi(), "/echo")
    try:
        connected, _ = await comm.connect()
        assert connected
        await get_channel_layer().group_send("mailbox-test", {"type": "relay", "n": 7})
        assert await comm.receive_json_from() == {"relayed": 7}
        await comm.send_json_to([1])
        assert await comm.receive_json_from() == {"echo": [1]}
    finally:
        await comm.disconnect()
