"""ASGI entry point: `daphne chatsite.asgi:application` (or uvicorn)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Django must be set up before anything imports models.
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from rooms.hub import lifespan, start_with_server  # noqa: E402
from rooms.redisfix import patch_redis_push_debug_log  # noqa: E402
from rooms.routing import websocket_urlpatterns  # noqa: E402
from rooms.security import BrowserOriginValidator  # noqa: E402
from rooms.serving import patch_autobahn_debug_args, patch_daphne_close_codes  # noqa: E402

patch_daphne_close_codes()
patch_autobahn_debug_args()
patch_redis_push_debug_log()

# No AuthMiddlewareStack around the sockets: the chat identifies people by nick, not by Django
# account, and the session wrapper would add a database hop per connection and a wrapper
# around every frame sent. Moderators work in the admin, over plain HTTP, with full auth.
application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": BrowserOriginValidator(URLRouter(websocket_urlpatterns)),
        "lifespan": lifespan,
    }
)
start_with_server()
