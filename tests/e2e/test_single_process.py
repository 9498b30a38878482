"""One real server process (daphne or uvicorn) on SQLite, driven by a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
import signal
from contextlib import AsyncExitStack
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.e2e.client import FRAME_TIMEOUT, Peer, join_chat, open_ws
from tests.e2e.harness import KINDS, ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(params=KINDS)
def server(request, server_factory) -> ServerProcess:
    return server_factory(request.param)


async def chat(server: ServerProcess, clients: AsyncExitStack) -> Peer:
    return await join_chat(server.url("/chat"), clients)


async def test_walkthrough_nick_room_chat_list_history_and_clean_close(server, clients):
    await walkthrough(server, clients, room="数学", fresh=True)


async def walkthrough(
    server: ServerProcess,
    clients: AsyncExitStack,
    *,
    room: str,
    fresh: bool,
    names: tuple[str, str] = ("alice", "bob"),
):
    """connect -> set_nick -> join_room -> chat_message -> user_list -> history -> clean close
    -> nick reuse. `room` and `names` must be unused in the database; `fresh`: the whole
    database is new."""
    alice_nick, bob_nick = names
    alice = await chat(server, clients)
    assert alice.greeting == {"action": "connecting", "room": "Default", "user": alice.nick}
    assert set(alice.history) == {"action", "success", "room", "messages"}
    assert (alice.history["action"], alice.history["success"]) == ("history", True)
    assert alice.history["room"] == "Default"
    if fresh:
        assert alice.history["messages"] == []
    bob = await chat(server, clients)
    assert await alice.recv() == {"action": "joined", "room": "Default", "user": bob.nick}

    # set_nick
    old = alice.nick
    assert await alice.request({"action": "set_nick", "nick": alice_nick}) == {
        "action": "set_nick",
        "success": True,
        "message": "",
    }
    assert await bob.recv() == {
        "action": "nick_changed",
        "room": "Default",
        "from_user": old,
        "to_user": alice_nick,
    }
    reply = await bob.request({"action": "set_nick", "nick": alice_nick.upper()})
    assert reply == {
        "action": "set_nick",
        "success": False,
        "message": "Nickname is already in use",
    }
    old = bob.nick
    assert (await bob.request({"action": "set_nick", "nick": bob_nick}))["success"] is True
    assert (await alice.recv())["from_user"] == old

    # join_room
    assert await alice.request({"action": "join_room", "room": room}) == {
        "action": "join_room",
        "success": True,
        "message": "",
    }
    assert await bob.recv() == {
        "action": "left",
        "room": "Default",
        "user": alice_nick,
        "shame": False,
    }
    assert (await bob.request({"action": "join_room", "room": room}))["success"] is True
    assert await alice.recv() == {"action": "joined", "room": room, "user": bob_nick}

    # chat_message
    ack = await alice.request({"action": "chat_message", "message": "hello, 世界\nline 2"})
    assert ack == {
        "action": "chat_message",
        "success": True,
        "message": "hello, 世界\nline 2",
        "id": ack["id"],
        "ts": ack["ts"],
    }
    assert await bob.recv() == {
        "action": "chat_message",
        "message": "hello, 世界\nline 2",
        "user": alice_nick,
        "id": ack["id"],
        "ts": ack["ts"],
        "room": room,
    }
    await alice.assert_silent()

    # user_list and history
    assert await bob.request({"action": "user_list"}) == {
        "action": "user_list",
        "success": True,
        "room": room,
        "users": [alice_nick, bob_nick],
    }
    assert await bob.request({"action": "history"}) == {
        "action": "history",
        "success": True,
        "room": room,
        "messages": [
            {"id": ack["id"], "user": alice_nick, "message": "hello, 世界\nline 2", "ts": ack["ts"]}
        ],
    }

    # A clean close: left without shame.
    await bob.ws.close()
    assert await alice.recv() == {"action": "left", "room": room, "user": bob_nick, "shame": False}

    # The nick of a client that closed is free again.
    dave = await chat(server, clients)
    reply = await dave.request({"action": "set_nick", "nick": bob_nick.capitalize()})
    assert reply == {"action": "set_nick", "success": True, "message": ""}
    assert (await alice.request({"action": "user_list"}))["users"] == [alice_nick]


async def test_abrupt_drop_sends_left_with_shame_and_frees_the_nick(server, clients):
    alice = await chat(server, clients)
    carol = await chat(server, clients)
    assert (await alice.recv())["action"] == "joined"
    assert (await carol.request({"action": "set_nick", "nick": "carol"}))["success"] is True
    assert (await alice.recv())["to_user"] == "carol"
    # The TCP connection goes away without a close frame: a killed client, a lost network.
    carol.ws.transport.abort()
    assert await alice.recv() == {
        "action": "left",
        "room": "Default",
        "user": "carol",
        "shame": True,
    }
    dave = await chat(server, clients)
    assert await alice.recv() == {"action": "joined", "room": "Default", "user": dave.nick}
    assert (await dave.request({"action": "set_nick", "nick": "Carol"}))["success"] is True
    assert (await alice.recv())["to_user"] == "Carol"
    assert (await alice.request({"action": "user_list"}))["users"] == [alice.nick, "Carol"]


async def test_client_closing_during_the_greeting_leaves_no_ghost(server, clients):
    """A client that goes away before the server finished greeting it (history not yet
    sent) must still be removed: its nick freed, its room told."""
    watcher = await chat(server, clients)
    gone = []
    for _ in range(3):
        ws = await open_ws(server.url("/chat"))
        greeting = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
        await ws.close()
        gone.append(greeting["user"])
    # One user's joined comes before their left; different users' events may interleave
    # (one's disconnect and the next one's connect are handled concurrently).
    frames = [await watcher.recv() for _ in range(2 * len(gone))]
    for nick in gone:
        mine = [frame for frame in frames if frame.get("user") == nick]
        assert mine == [
            {"action": "joined", "room": "Default", "user": nick},
            {"action": "left", "room": "Default", "user": nick, "shame": False},
        ]
    assert (await watcher.request({"action": "user_list"}))["users"] == [watcher.nick]


async def test_client_closing_right_after_a_request_leaves_no_ghost(server, clients):
    """A client that sends a frame and closes at once (a one-shot bot) must be removed even
    when the reply can no longer be delivered."""
    watcher = await chat(server, clients)
    for number in range(3):
        peer = await chat(server, clients)
        assert await watcher.recv() == {"action": "joined", "room": "Default", "user": peer.nick}
        await peer.send({"action": "chat_message", "message": f"bye {number}"})
        await peer.ws.close()
        left = await watcher.recv_action("left", limit=2)
        assert left == {"action": "left", "room": "Default", "user": peer.nick, "shame": False}
    assert (await watcher.request({"action": "user_list"}))["users"] == [watcher.nick]


def compat(body: dict[str, Any], *additive: str) -> dict[str, Any]:
    """The body without the keys documented as additive to the original protocol."""
    return {key: value for key, value in body.items() if key not in additive}


async def test_compat_scenario_sends_the_exact_original_bodies(server, clients):
    one = await chat(server, clients)
    two = await chat(server, clients)
    assert one.greeting == {"action": "connecting", "room": "Default", "user": one.nick}
    assert two.greeting == {"action": "connecting", "room": "Default", "user": two.nick}
    assert await one.recv() == {"action": "joined", "room": "Default", "user": two.nick}

    assert await one.request({"action": "set_nick", "nick": "alice"}) == {
        "action": "set_nick",
        "success": True,
        "message": "",
    }
    assert await two.recv() == {
        "action": "nick_changed",
        "room": "Default",
        "from_user": one.nick,
        "to_user": "alice",
    }
    assert await two.request({"action": "set_nick", "nick": "bob"}) == {
        "action": "set_nick",
        "success": True,
        "message": "",
    }
    assert await one.recv() == {
        "action": "nick_changed",
        "room": "Default",
        "from_user": two.nick,
        "to_user": "bob",
    }

    assert await one.request({"action": "join_room", "room": "math"}) == {
        "action": "join_room",
        "success": True,
        "message": "",
    }
    assert await two.recv() == {
        "action": "left",
        "room": "Default",
        "user": "alice",
        "shame": False,
    }
    assert await two.request({"action": "join_room", "room": "math"}) == {
        "action": "join_room",
        "success": True,
        "message": "",
    }
    assert await one.recv() == {"action": "joined", "room": "math", "user": "bob"}

    ack = await one.request({"action": "chat_message", "message": "hi bob"})
    assert compat(ack, "id", "ts") == {
        "action": "chat_message",
        "success": True,
        "message": "hi bob",
    }
    assert set(ack) == {"action", "success", "message", "id", "ts"}
    relayed = await two.recv()
    assert compat(relayed, "id", "ts", "room") == {
        "action": "chat_message",
        "message": "hi bob",
        "user": "alice",
    }
    assert set(relayed) == {"action", "message", "user", "id", "ts", "room"}

    assert await two.request({"action": "user_list", "room": "math"}) == {
        "action": "user_list",
        "success": True,
        "room": "math",
        "users": ["alice", "bob"],
    }
    assert await one.request({"action": "join_room", "room": "math"}) == {
        "action": "join_room",
        "success": False,
        "message": "Name already in use in this room.",
    }
    assert await one.request({"action": "kick", "user": "bob"}) == {
        "action": "kick",
        "success": False,
        "message": "Not allowed.",
    }

    await two.ws.close()
    assert await one.recv() == {"action": "left", "room": "math", "user": "bob", "shame": False}
    await one.ws.close()
    assert one.ws.close_code == 1000


async def test_foreign_origin_gets_http_403_and_allowed_origin_connects(server, clients):
    for path in ("/chat", "/echo"):
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(server.url(path), origin="http://evil.example")
        assert refused.value.response.status_code == 403
    ws = await open_ws(server.url("/chat"), origin=f"http://127.0.0.1:{server.port}")
    clients.push_async_callback(ws.close)
    assert json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))["action"] == "connecting"


async def test_binary_frame_closes_with_1003_and_the_room_hears_left_without_shame(server, clients):
    watcher = await chat(server, clients)
    peer = await chat(server, clients)
    assert (await watcher.recv())["action"] == "joined"
    await peer.ws.send(b'{"action": "user_list"}')
    assert await peer.close_code() == 1003
    assert await watcher.recv() == {
        "action": "left",
        "room": "Default",
        "user": peer.nick,
        "shame": False,
    }


async def test_closing_properly_with_any_close_code_sends_left_without_shame(server, clients):
    watcher = await chat(server, clients)
    for code in (1000, 1001, 4000, None):  # None: a close frame without a status code
        peer = await chat(server, clients)
        assert (await watcher.recv())["action"] == "joined"
        await peer.ws.close(code=code)
        assert await watcher.recv() == {
            "action": "left",
            "room": "Default",
            "user": peer.nick,
            "shame": False,
        }, f"closed with {code}"


async def test_sigterm_closes_sockets_with_1001_and_the_server_exits_0(server, clients):
    peer = await chat(server, clients)
    server.signal(signal.SIGTERM)
    assert await peer.close_code() == 1001
    assert await asyncio.to_thread(server.wait, 15.0) == 0


async def test_pipelined_frames_get_one_reply_each_in_order(server, clients):
    peer = await chat(server, clients)
    requests = [
        {"action": "chat_message", "message": "one"},
        {"action": "set_nick", "nick": "piper"},
        {"action": "chat_message", "message": "two"},
        {"action": "nope"},
        {"action": "chat_message", "message": "three"},
        {"action": "user_list"},
        {"action": "history", "limit": 3},
    ]
    for body in requests:
        await peer.send(body)
    replies = [await peer.recv() for _ in requests]
    assert [(r["action"], r["success"]) for r in replies] == [
        ("chat_message", True),
        ("set_nick", True),
        ("chat_message", True),
        ("nope", False),
        ("chat_message", True),
        ("user_list", True),
        ("history", True),
    ]
    ids = [replies[0]["id"], replies[2]["id"], replies[4]["id"]]
    assert ids == sorted(ids)
    assert replies[5]["users"] == ["piper"]
    assert [(m["id"], m["user"], m["message"]) for m in replies[6]["messages"]] == [
        (ids[0], peer.nick, "one"),
        (ids[1], "piper", "two"),
        (ids[2], "piper", "three"),
    ]


async def test_oversized_frame_closes_with_1009_and_a_frame_at_the_limit_does_not(server, clients):
    peer = await chat(server, clients)
    # The default limit is 64 KiB; a frame of exactly that size is answered (the message is
    # too long for a chat message, which is a reply, not a close).
    head, tail = '{"action":"chat_message","message":"', '"}'
    at_limit = head + "x" * (65536 - len(head) - len(tail)) + tail
    assert len(at_limit.encode()) == 65536
    await peer.ws.send(at_limit)
    assert await peer.recv() == {
        "action": "chat_message",
        "success": False,
        "message": "Message is longer than 2000 characters.",
    }
    await peer.ws.send(at_limit[:-2] + "x" + tail)
    assert await peer.close_code() == 1009


async def test_echo_round_trip_on_the_real_server(server, clients):
    ws = await open_ws(server.url("/echo"))
    clients.push_async_callback(ws.close)
    await ws.send(json.dumps({"数学": [1, None]}))
    assert json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT)) == {
        "echo": {"数学": [1, None]}
    }


async def test_posts_in_flight_when_their_sender_leaves_are_heard_and_log_no_error(server, clients):
    """A bot that fires posts and closes at once: every post is stored and heard before its
    sender's left, and the answers it is no longer there to read are not server errors."""
    alice = await chat(server, clients)
    bob = await chat(server, clients)
    await alice.recv()  # bob joined
    texts = [f"parting shot {i}" for i in range(10)]
    for text in texts:
        await bob.ws.send(json.dumps({"action": "chat_message", "message": text}))
    await bob.ws.close()

    heard = [await alice.recv() for _ in range(len(texts) + 1)]
    assert [(f["action"], f.get("message")) for f in heard] == [
        *(("chat_message", text) for text in texts),
        ("left", None),
    ]
    history = await alice.request({"action": "history", "limit": 50})
    assert [m["message"] for m in history["messages"]] == texts
    assert " ERROR " not in server.output()
    assert "Traceback" not in server.output()
