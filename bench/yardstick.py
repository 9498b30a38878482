"""Yardstick: a bare single-process aiohttp server speaking the core /chat protocol.

It keeps everything in memory and stores nothing. Its only purpose is to show how
fast a careful, plain aiohttp implementation of the same protocol runs on the
machine, so that the real server's figures can be read as a ratio to it.

    python bench/yardstick.py --port 8765
"""

from __future__ import annotations

import argparse
import json
import random
import resource
from typing import Any

from aiohttp import WSMsgType, web

DEFAULT_ROOM = "Default"
NAME_MIN, NAME_MAX = 3, 20
CLEAN_CLOSE = (1000, 1001)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(obj: dict[str, Any]) -> bytes:
    return _dumps(obj).encode()


class Member:
    __slots__ = ("nick", "room", "ws")

    def __init__(self, ws: web.WebSocketResponse, nick: str, room: str) -> None:
        self.ws = ws
        self.nick = nick
        self.room = room


class Chat:
    def __init__(self) -> None:
        self.rooms: dict[str, dict[Member, None]] = {}
        self.nicks: dict[str, Member] = {}  # lower-cased nick -> member

    def new_nick(self) -> str:
        while True:
            nick = f"User{random.randrange(1_000_000)}"
            if nick.lower() not in self.nicks:
                return nick

    def enter(self, member: Member, room: str) -> None:
        member.room = room
        self.rooms.setdefault(room, {})[member] = None

    def leave(self, member: Member) -> None:
        members = self.rooms.get(member.room)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self.rooms[member.room]

    async def broadcast(self, room: str, payload: bytes, skip: Member | None) -> None:
        # The payload is encoded once; each recipient only costs one frame write.
        members = self.rooms.get(room)
        if not members:
            return
        for member in tuple(members):
            if member is skip:
                continue
            # try/except is free in the hot loop; contextlib.suppress is not.
            try:  # noqa: SIM105
                await member.ws.send_frame(payload, WSMsgType.TEXT)
            except (ConnectionError, RuntimeError):
                pass  # recipient is going away; its own handler cleans up


def valid_name(value: Any) -> bool:
    return isinstance(value, str) and NAME_MIN <= len(value) <= NAME_MAX


async def reply(ws: web.WebSocketResponse, action: Any, ok: bool, message: str = "") -> None:
    await ws.send_frame(
        encode({"action": action, "success": ok, "message": message}), WSMsgType.TEXT
    )


async def handle(chat: Chat, me: Member, data: Any) -> None:
    ws = me.ws
    if not isinstance(data, dict):
        await reply(ws, None, False, "Not allowed.")
        return
    action = data.get("action")
    if action == "chat_message":
        text = data.get("message")
        if not isinstance(text, str) or not text:
            await reply(ws, action, False, "Invalid message.")
            return
        await ws.send_frame(
            encode({"action": action, "success": True, "message": text}), WSMsgType.TEXT
        )
        out = encode({"action": action, "message": text, "user": me.nick})
        await chat.broadcast(me.room, out, me)
    elif action == "join_room":
        room = data.get("room")
        if not valid_name(room):
            await reply(ws, action, False, "Room name must be 3-20 characters.")
            return
        old = me.room
        chat.leave(me)
        left = {"action": "left", "room": old, "user": me.nick, "shame": False}
        await chat.broadcast(old, encode(left), None)
        chat.enter(me, room)
        await reply(ws, action, True)
        joined = {"action": "joined", "room": room, "user": me.nick}
        await chat.broadcast(room, encode(joined), me)
    elif action == "set_nick":
        nick = data.get("nick")
        if not valid_name(nick):
            await reply(ws, action, False, "Nick must be 3-20 characters.")
            return
        key = nick.lower()
        holder = chat.nicks.get(key)
        if holder is not None and holder is not me:
            await reply(ws, action, False, "Nick already taken.")
            return
        old = me.nick
        chat.nicks.pop(old.lower(), None)
        chat.nicks[key] = me
        me.nick = nick
        await reply(ws, action, True)
        changed = {
            "action": "nick_changed",
            "room": me.room,
            "from_user": old,
            "to_user": nick,
        }
        await chat.broadcast(me.room, encode(changed), me)
    elif action == "user_list":
        room = data.get("room", me.room)
        if not isinstance(room, str):
            await reply(ws, action, False, "Invalid room.")
            return
        users = [m.nick for m in chat.rooms.get(room, ())]
        out = {"action": action, "success": True, "room": room, "users": users}
        await ws.send_frame(encode(out), WSMsgType.TEXT)
    else:
        await reply(ws, action, False, "Not allowed.")


async def chat_view(request: web.Request) -> web.WebSocketResponse:
    chat: Chat = request.app["chat"]
    ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=65536)
    await ws.prepare(request)
    me = Member(ws, chat.new_nick(), DEFAULT_ROOM)
    chat.nicks[me.nick.lower()] = me
    chat.enter(me, DEFAULT_ROOM)
    try:
        hello = {"action": "connecting", "room": DEFAULT_ROOM, "user": me.nick}
        await ws.send_frame(encode(hello), WSMsgType.TEXT)
        joined = {"action": "joined", "room": DEFAULT_ROOM, "user": me.nick}
        await chat.broadcast(DEFAULT_ROOM, encode(joined), me)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
            except ValueError:
                await reply(ws, None, False, "Invalid JSON")
                continue
            await handle(chat, me, data)
    except (ConnectionError, RuntimeError):
        pass
    finally:
        chat.leave(me)
        if chat.nicks.get(me.nick.lower()) is me:
            del chat.nicks[me.nick.lower()]
        shame = ws.close_code not in CLEAN_CLOSE
        left = {"action": "left", "room": me.room, "user": me.nick, "shame": shame}
        await chat.broadcast(me.room, encode(left), None)
    return ws


async def echo_view(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            try:
                value = json.loads(msg.data)
            except ValueError:
                await reply(ws, None, False, "Invalid JSON")
                continue
            await ws.send_str(_dumps({"echo": value}))
    return ws


def make_app() -> web.Application:
    app = web.Application()
    app["chat"] = Chat()
    app.router.add_get("/chat", chat_view)
    app.router.add_get("/echo", echo_view)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = None
    if args.loop == "uvloop":
        try:
            import uvloop  # installed with uvicorn[standard]; same loop uvicorn picks

            loop = uvloop.new_event_loop()
        except ImportError:
            pass
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
