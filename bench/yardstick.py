"""Yardstick: a bare single-process aiohttp server speaking the core /chat protocol.

It keeps everything in memory and stores nothing. Its only purpose is to show how
fast a careful, plain aiohttp implementation of the same protocol runs on the
machine, so that the real server's figures can be read as a ratio to it.

It fans out the way the chat server does, so that the ratio compares frameworks rather
than techniques: a broadcast is encoded and framed once, and the frames that reach one
socket within one turn of the event loop go out in one write.

    python bench/yardstick.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import struct
from typing import Any

from aiohttp import WSMsgType, web

DEFAULT_ROOM = "Default"
NAME_MIN, NAME_MAX = 3, 20
CLEAN_CLOSE = (1000, 1001)
INVALID_JSON = {"action": None, "success": False, "message": "Invalid JSON"}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(obj: dict[str, Any]) -> bytes:
    return _dumps(obj).encode()


def text_frame(payload: bytes) -> bytes:
    """An unmasked text frame, as a server sends it: the same bytes suit every recipient."""
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", 0x81, length) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


class Member:
    __slots__ = ("nick", "room", "transport", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: Any, nick: str, room: str) -> None:
        self.ws = ws
        self.transport = transport
        self.nick = nick
        self.room = room


class Chat:
    def __init__(self) -> None:
        self.rooms: dict[str, dict[Member, None]] = {}
        self.nicks: dict[str, Member] = {}  # lower-cased nick -> member
        self.outbox: dict[Member, list[bytes]] = {}
        self.flushing = False

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

    def broadcast(self, room: str, payload: bytes, skip: Member | None) -> None:
        members = self.rooms.get(room)
        if not members:
            return
        frame = text_frame(payload)
        outbox = self.outbox
        for member in members:
            if member is skip:
                continue
            frames = outbox.get(member)
            if frames is None:
                outbox[member] = [frame]
            else:
                frames.append(frame)
        if outbox and not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        outbox, self.outbox = self.outbox, {}
        for member, frames in outbox.items():
            self.write(member, frames)

    def write(self, member: Member, frames: list[bytes]) -> None:
        transport = member.transport
        if transport is not None and not transport.is_closing() and not member.ws.closed:
            transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def send(self, member: Member, payload: bytes) -> None:
        """A reply to one member, after whatever already waits for it."""
        frames = self.outbox.pop(member, None)
        if frames is not None:
            self.write(member, frames)
        await member.ws.send_frame(payload, WSMsgType.TEXT)


def valid_name(value: Any) -> bool:
    return isinstance(value, str) and NAME_MIN <= len(value) <= NAME_MAX


async def reply(chat: Chat, me: Member, action: Any, ok: bool, message: str = "") -> None:
    await chat.send(me, encode({"action": action, "success": ok, "message": message}))


async def handle(chat: Chat, me: Member, data: Any) -> None:
    if not isinstance(data, dict):
        await reply(chat, me, None, False, "Not allowed.")
        return
    action = data.get("action")
    if action == "chat_message":
        text = data.get("message")
        if not isinstance(text, str) or not text:
            await reply(chat, me, action, False, "Invalid message.")
            return
        await chat.send(me, encode({"action": action, "success": True, "message": text}))
        out = encode({"action": action, "message": text, "user": me.nick})
        chat.broadcast(me.room, out, me)
    elif action == "join_room":
        room = data.get("room")
        if not valid_name(room):
            await reply(chat, me, action, False, "Room name must be 3-20 characters.")
            return
        old = me.room
        chat.leave(me)
        left = {"action": "left", "room": old, "user": me.nick, "shame": False}
        chat.broadcast(old, encode(left), None)
        chat.enter(me, room)
        await reply(chat, me, action, True)
        joined = {"action": "joined", "room": room, "user": me.nick}
        chat.broadcast(room, encode(joined), me)
    elif action == "set_nick":
        nick = data.get("nick")
        if not valid_name(nick):
            await reply(chat, me, action, False, "Nick must be 3-20 characters.")
            return
        key = nick.lower()
        holder = chat.nicks.get(key)
        if holder is not None and holder is not me:
            await reply(chat, me, action, False, "Nick already taken.")
            return
        old = me.nick
        chat.nicks.pop(old.lower(), None)
        chat.nicks[key] = me
        me.nick = nick
        await reply(chat, me, action, True)
        changed = {
            "action": "nick_changed",
            "room": me.room,
            "from_user": old,
            "to_user": nick,
        }
        chat.broadcast(me.room, encode(changed), me)
    elif action == "user_list":
        room = data.get("room", me.room)
        if not isinstance(room, str):
            await reply(chat, me, action, False, "Invalid room.")
            return
        users = [m.nick for m in chat.rooms.get(room, ())]
        out = {"action": action, "success": True, "room": room, "users": users}
        await chat.send(me, encode(out))
    else:
        await reply(chat, me, action, False, "Not allowed.")


async def chat_view(request: web.Request) -> web.WebSocketResponse:
    chat: Chat = request.app["chat"]
    ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=65536)
    await ws.prepare(request)
    me = Member(ws, request.transport, chat.new_nick(), DEFAULT_ROOM)
    chat.nicks[me.nick.lower()] = me
    chat.enter(me, DEFAULT_ROOM)
    try:
        hello = {"action": "connecting", "room": DEFAULT_ROOM, "user": me.nick}
        await chat.send(me, encode(hello))
        joined = {"action": "joined", "room": DEFAULT_ROOM, "user": me.nick}
        chat.broadcast(DEFAULT_ROOM, encode(joined), me)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
            except ValueError:
                await reply(chat, me, None, False, "Invalid JSON")
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
        chat.broadcast(me.room, encode(left), None)
    return ws


async def echo_view(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            try:
                value = json.loads(msg.data)
            except ValueError:
                await ws.send_str(
                    _dumps({"action": None, "success": False, "message": "Invalid JSON"})
                )
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
