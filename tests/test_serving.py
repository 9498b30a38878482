"""The adapters to the ASGI servers: shared frames, close classification, backlog gauges."""

import functools

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from rooms.serving import backlog_gauge, dropped_without_close, frame_writer, text_frame


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


def test_autobahn_formats_its_debug_arguments_only_when_they_are_written():
    from pprint import pformat

    import autobahn.websocket.protocol as autobahn_protocol

    from rooms.serving import patch_autobahn_debug_args

    patch_autobahn_debug_args()
    patch_autobahn_debug_args()  # idempotent: the app may be loaded twice
    settings = [("openHandshakeTimeout", 5, "Factory"), ("autoPingInterval", 0, "Factory")]
    deferred = autobahn_protocol.pformat(settings)
    assert not isinstance(deferred, str)
    assert str(deferred) == pformat(settings)
    assert f"{deferred}" == pformat(settings)
    timings = autobahn_protocol.Timings()
    timings.track("onOpen")
    assert isinstance(str(timings), str)
    assert "onOpen" in str(timings)
