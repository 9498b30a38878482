import contextlib

from django.http import HttpRequest, JsonResponse

from rooms.health import database_status, layer_status
from rooms.hub import get_hub


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and the channel layer answer, 503 when one does not."""
    # A worker that has had no chat client yet still joins in: it heartbeats and sweeps dead
    # workers' users from the first health check on.
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
