"""A minimal /chat bot: joins a room and repeats every message that starts with "!echo "."""

import asyncio
import json
import sys

import websockets

URL = sys.argv[1] if len(sys.argv) > 1 else "ws://localhost:8080/chat"
ROOM = sys.argv[2] if len(sys.argv) > 2 else "Lobby"
NICK = "echobot"
PREFIX = "!echo "


async def main() -> None:
    async with websockets.connect(URL) as ws:
        await ws.send(json.dumps({"action": "set_nick", "nick": NICK}))
        await ws.send(json.dumps({"action": "join_room", "room": ROOM}))
        async for frame in ws:
            body = json.loads(frame)
            action = body.get("action")
            refused = body.get("success") is False and action in ("set_nick", "join_room")
            # Asking to join the room we are already in is harmless; other refusals are not.
            if refused and body["message"] != "Name already in use in this room.":
                sys.exit(f"{action} failed: {body['message']}")
            # Someone else's message has no "success" key; the reply to our own has one.
            if action == "chat_message" and "success" not in body:
                text = body["message"]
                if text.startswith(PREFIX) and text[len(PREFIX) :].strip():
                    reply = {"action": "chat_message", "message": text[len(PREFIX) :]}
                    await ws.send(json.dumps(reply))
            # Every other frame (joined, left, history, unknown actions...) is ignored.


if __name__ == "__main__":
    asyncio.run(main())
