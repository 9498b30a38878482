"""Readiness of what the chat depends on: the database and the channel layer."""

import asyncio
import logging
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.db import connection

from rooms import dbthread

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 3.0


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def database_status() -> dict[str, Any]:
    try:
        await asyncio.wait_for(dbthread.run(_ping_database), CHECK_TIMEOUT)
    except Exception as error:
        log.warning("database check failed: %r", error)
        return {"ok": False, "error": type(error).__name__}
    return {"ok": True, "vendor": connection.vendor}


async def layer_status() -> dict[str, Any]:
    layer = get_channel_layer()
    if layer is None or isinstance(layer, InMemoryChannelLayer):
        return {"ok": True, "backend": "in-memory"}
    import redis.asyncio as redis

    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT, socket_connect_timeout=CHECK_TIMEOUT
    )
    try:
        await client.ping()
    except Exception as error:
        log.warning("channel layer check failed: %r", error)
        return {"ok": False, "backend": "redis", "error": type(error).__name__}
    finally:
        await client.aclose()
    return {"ok": True, "backend": "redis"}
