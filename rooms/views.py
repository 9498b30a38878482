from django.http import HttpRequest, JsonResponse

from rooms.health import database_status, layer_status


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and the channel layer answer, 503 when one does not."""
    database = await database_status()
    layer = await layer_status()
    healthy = database["ok"] and layer["ok"]
    body = {
        "status": "ok" if healthy else "unavailable",
        "database": database,
        "channel_layer": layer,
    }
    return JsonResponse(body, status=200 if healthy else 503)
