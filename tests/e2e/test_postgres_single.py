"""One real server process on PostgreSQL (the session's fresh database).

The database is shared by the tests of a session, so every test here uses names of its own.
"""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.client import join_chat
from tests.e2e.harness import KINDS, ServerProcess
from tests.e2e.test_single_process import walkthrough

pytestmark = pytest.mark.e2e


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


@pytest.fixture(params=KINDS)
def pg_server(request, server_factory, postgres_url) -> ServerProcess:
    return server_factory(request.param, database_url=postgres_url)


async def test_walkthrough_on_postgres(pg_server, clients):
    await walkthrough(
        pg_server,
        clients,
        room=unique("数学"),
        fresh=False,
        names=(unique("alice"), unique("bob")),
    )


async def test_nick_whose_case_folded_key_is_long_is_accepted_on_postgres(pg_server, clients):
    # U+FDFA is one character, but its compatibility form (NFKC) is 18 characters: a valid
    # 20-character nick can have a 360-character comparison key.
    peer = await join_chat(pg_server.url("/chat"), clients)
    nick = "\ufdfa" * 14 + uuid.uuid4().hex[:6]  # 20 characters, a 258-character key
    assert await peer.request({"action": "set_nick", "nick": nick}) == {
        "action": "set_nick",
        "success": True,
        "message": "",
    }
    room = unique("room")
    assert (await peer.request({"action": "join_room", "room": room}))["success"] is True
    assert (await peer.request({"action": "user_list"}))["users"] == [nick]
