import contextlib

from django.http import HttpRequest, JsonResponse

from rooms.health import database_status, layer_status
from rooms.hub import get_hub


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and the channel layer answer, 503 when one does not."""
    # The hub starts with daphne and uvicorn (rooms.hub.start_with_server, lifespan); under
    # another server a worker with no chat client yet joins in from its first health check.
    hub = get_hub()
    with contextlib.suppress(Exception):
        await hub.start(request.scope)
    database = await database_status()
    layer = await layer_status()
    healthy = database["ok"] and layer["ok"]
    body = {
        "status": "ok" if healthy else "unavailable",
        "database": database,
        "channel_layer": layer,
        "worker": {
            "name": hub.worker,
            "sockets": len(hub.sockets),
            "slow_readers_dropped": hub.slow_dropped,
            "held_broadcasts_dropped": hub.undelivered_dropped,
        },
    }
    return JsonResponse(body, status=200 if healthy else 503)
