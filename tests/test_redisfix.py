"""redis-py builds a debug line for every pub/sub message; the chat's correction drops that."""

import logging

from redis._parsers.hiredis import _AsyncHiredisParser
from redis._parsers.resp3 import _AsyncRESP3Parser

from rooms.redisfix import patch_redis_push_debug_log


class Printed:
    """A pushed message that counts how often it is turned into text."""

    def __init__(self) -> None:
        self.printed = 0

    def __repr__(self) -> str:
        self.printed += 1
        return "<a pushed message>"

    __str__ = __repr__


async def test_a_pushed_message_is_printed_only_when_the_debug_line_is_written(caplog):
    patch_redis_push_debug_log()
    assert patch_redis_push_debug_log() == []  # applied once, however often the app loads
    for parser in (_AsyncHiredisParser(65536), _AsyncRESP3Parser(65536)):
        message = Printed()

        with caplog.at_level(logging.INFO, logger="push_response"):
            assert await parser.pubsub_push_handler_func(message) is message
        assert message.printed == 0

        with caplog.at_level(logging.DEBUG, logger="push_response"):
            assert await parser.pubsub_push_handler_func(message) is message
        assert message.printed > 0
        assert caplog.records[-1].getMessage() == "Push response: <a pushed message>"
