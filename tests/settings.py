"""Settings for the test suite: the real settings, with a key and the in-memory layer.

End-to-end tests start real server processes with their own environment; the tests that run
in-process always use the in-memory layer so they never depend on Redis.
"""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-insecure-key")

from chatsite.settings import *  # noqa: F403

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Tests run hubs inside pytest's own process, whose signals are not the hub's to take.
CHAT_GRACEFUL_SHUTDOWN = False
# Each test starts the hub of its own event loop when it needs one.
CHAT_HUB_AT_STARTUP = False
