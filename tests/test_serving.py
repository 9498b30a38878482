"""The adapters to the ASGI servers: shared frames, close classification, backlog gauges."""

import functools
import socket
from pprint import pformat

import autobahn.websocket.protocol as autobahn_protocol
import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from rooms.serving import (
    _send_now,
    backlog_gauge,
    dropped_without_close,
    frame_writer,
    patch_autobahn_debug_args,
    text_frame,
)


def parse(frame: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(frame)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        return done.value
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frame_is_a_valid_unmasked_text_frame_at_every_length_boundary(size):
    payload = ("é" * size).encode()[:size]
    frame = parse(text_frame(payload))
    assert frame.opcode == Opcode.TEXT
    assert frame.fin is True
    assert frame.data == payload


def test_text_frame_matches_what_websockets_itself_sends():
    payload = '{"action":"chat_message","message":"数学"}'.encode()
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def test_dropped_without_close_for_1006():
    assert dropped_without_close(object(), 1006) is True


@pytest.mark.parametrize("code", [1000, 1001, 4000, None])
def test_a_close_frame_is_not_a_drop(code):
    assert dropped_without_close(object(), code) is False


class FakeUvicornConnection:
    def __init__(self, close_rcvd):
        self.close_rcvd = close_rcvd


class FakeUvicornProtocol:
    def __init__(self, close_rcvd):
        self.conn = FakeUvicornConnection(close_rcvd)

    async def send(self, message):
        """Stands in for uvicorn's bound ASGI send."""


def test_1005_without_a_received_close_frame_is_a_drop():
    assert dropped_without_close(FakeUvicornProtocol(None).send, 1005) is True


def test_1005_with_a_received_close_frame_is_not_a_drop():
    assert dropped_without_close(FakeUvicornProtocol(object()).send, 1005) is False


async def unknown_send(message):
    """An ASGI send of a server the adapters do not know."""


def test_unknown_servers_get_the_plain_asgi_path():
    assert frame_writer(unknown_send) is None
    assert backlog_gauge(unknown_send, 1024) is None
    assert frame_writer(functools.partial(unknown_send)) is None


class WebSocketsSansIOProtocol:
    """Stands in for uvicorn's websockets-sansio protocol, with `extensions` negotiated."""

    def __init__(self, extensions):
        self.conn = type("Connection", (), {"extensions": extensions})()
        self.transport = None

    async def send(self, message):
        """uvicorn's bound ASGI send."""


class PerMessageDeflate:
    name = "permessage-deflate"


def test_a_compressing_uvicorn_connection_gets_the_plain_path_and_operators_are_told_once(
    caplog, monkeypatch
):
    monkeypatch.setattr("rooms.serving._compression_reported", False)
    with caplog.at_level("WARNING", logger="rooms.serving"):
        assert frame_writer(WebSocketsSansIOProtocol([PerMessageDeflate()]).send) is None
        assert frame_writer(WebSocketsSansIOProtocol([PerMessageDeflate()]).send) is None
    [record] = caplog.records
    assert "negotiated permessage-deflate" in record.getMessage()
    assert "--ws-per-message-deflate false" in record.getMessage()


def test_autobahn_formats_its_debug_arguments_only_when_they_are_written():
    patch_autobahn_debug_args()
    patch_autobahn_debug_args()  # idempotent: the app may be loaded twice
    settings = [("openHandshakeTimeout", 5, "Factory"), ("autoPingInterval", 0, "Factory")]
    deferred = autobahn_protocol.pformat(settings)
    assert not isinstance(deferred, str)
    assert str(deferred) == pformat(settings)
    assert f"{deferred}" == pformat(settings)
    timings = autobahn_protocol.Timings()
    timings.track("onOpen")
    assert "onOpen" in str(timings)


class FakeTwistedTransport:
    """The parts of a Twisted TCP connection `_send_now` reads, over a real socket."""

    TLS = False
    connected = True
    disconnecting = False
    _writeDisconnecting = False

    def __init__(self, sock, buffered: bytes = b""):
        self.socket = sock
        self.dataBuffer = buffered
        self.offset = 0
        self._tempDataLen = 0
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


@pytest.fixture
def socket_pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_send_now_writes_to_the_socket_when_twisted_holds_nothing(socket_pair):
    ours, peer = socket_pair
    transport = FakeTwistedTransport(ours)
    _send_now(transport, b"frame")
    assert peer.recv(100) == b"frame"
    assert transport.written == []


def test_send_now_queues_behind_what_twisted_has_not_sent_yet(socket_pair):
    ours, peer = socket_pair
    transport = FakeTwistedTransport(ours, buffered=b"earlier")
    _send_now(transport, b"later")
    assert transport.written == [b"later"]
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_send_now_hands_twisted_exactly_what_a_full_socket_did_not_take(socket_pair):
    ours, peer = socket_pair
    transport = FakeTwistedTransport(ours)
    frame = bytes(range(256)) * 40_000  # far more than a socket buffer holds
    _send_now(transport, frame)
    received = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            break
        received += chunk
    assert len(transport.written) == 1
    assert 0 < len(received) < len(frame)
    assert received + transport.written[0] == frame


@pytest.mark.parametrize(
    "state",
    [
        {"TLS": True},
        {"connected": False},
        {"disconnecting": True},
        {"_writeDisconnecting": True},
        {"_tempDataLen": 7},  # written this turn, not yet moved to dataBuffer
    ],
)
def test_send_now_leaves_tls_closing_and_busy_connections_to_twisted(socket_pair, state):
    ours, peer = socket_pair
    transport = FakeTwistedTransport(ours)
    for name, value in state.items():
        setattr(transport, name, value)
    _send_now(transport, b"frame")
    assert transport.written == [b"frame"]
    with pytest.raises(BlockingIOError):
        peer.recv(100)
