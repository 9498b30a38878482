"""Cross-site WebSocket hijacking protection that still lets scripts and bots in."""

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


class BrowserOriginValidator(OriginValidator):
    """Refuse a handshake whose Origin names a host outside DJANGO_ALLOWED_HOSTS (HTTP 403).

    Browsers always send Origin, so a page on another site cannot open a socket here. Bots,
    scripts and the original Python clients send none and are let in, which channels'
    AllowedHostsOriginValidator would refuse.
    """

    def __init__(self, application: Any) -> None:
        super().__init__(application, settings.ALLOWED_HOSTS)

    def valid_origin(self, parsed_origin: Any) -> bool:
        return parsed_origin is None or super().valid_origin(parsed_origin)
