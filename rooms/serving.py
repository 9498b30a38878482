"""Adjustments to the ASGI servers the chat runs under, applied when the app is loaded."""

import sys


def patch_daphne_close_codes() -> None:
    """Let the application close sockets with the codes RFC 6455 reserves for servers.

    daphne closes through autobahn's public `sendClose`, which accepts only 1000 and 3000-4999,
    so `websocket.close` with 1001 (shutdown), 1003 (binary frame), 1008 (flooding), 1009
    (too big) or 1013 (try again later) raises inside daphne and the client sees 1011 instead.
    `sendCloseFrame` is the same close handshake without that client-side rule.
    """
    ws_protocol = sys.modules.get("daphne.ws_protocol")
    if ws_protocol is None or getattr(ws_protocol, "_chat_close_codes", False):
        return

    def server_close(self, code=None):
        self.sendCloseFrame(code=1000 if code is None else code, isReply=False)

    ws_protocol.WebSocketProtocol.serverClose = server_close
    ws_protocol._chat_close_codes = True
