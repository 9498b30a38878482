"""Settings, read from the environment with safe defaults.

With no configuration the server runs as one process on SQLite and the in-memory channel layer.
Set REDIS_URL and DATABASE_URL to run many processes on Redis and PostgreSQL.
"""

import math
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_float(name: str, default: float) -> float:
    """A count, rate or duration: a finite number, zero or more."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    # float() also takes "nan" and "inf", which would stall or spin whatever they pace.
    if not (math.isfinite(number) and number >= 0):
        raise ImproperlyConfigured(f"{name} must be a number, 0 or more, got {value!r}")
    return number


DEBUG = env_bool("DJANGO_DEBUG", False)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off "
            "(`make run` creates one for you in .secret_key)."
        )
    SECRET_KEY = "insecure-debug-only-key"

ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rooms",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and the pages' static files from the ASGI process itself, so a plain
    # `daphne chatsite.asgi:application` needs no separate static server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "chatsite.asgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("CHAT_DB_CONN_MAX_AGE", 600),
        # Off: Django would run SELECT 1 before every hop to the database thread (every
        # connect, every batch of messages). A connection that broke while idle (a database
        # restart) instead fails one action with the "unavailable" reply and is replaced.
        conn_health_checks=False,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["OPTIONS"] = {
        # Fail fast when the database is unreachable, so clients get a failure reply in
        # seconds instead of a hung request.
        "connect_timeout": env_int("CHAT_DB_CONNECT_TIMEOUT", 3),
        "options": (
            f"-c statement_timeout={env_int('CHAT_DB_STATEMENT_TIMEOUT_MS', 5000)}"
            # on (the default): a message is acknowledged once it is on PostgreSQL's disk. off:
            # once PostgreSQL has it; a crash of PostgreSQL itself (not of the chat server)
            # can then lose the last fraction of a second of acknowledged messages.
            f" -c synchronous_commit={os.environ.get('CHAT_DB_SYNCHRONOUS_COMMIT', 'on')}"
        ),
    }
    if env_bool("CHAT_DB_PREPARE", True):
        # Lets rooms.prepared keep the hot statements prepared. The ORM's cursors bind on the
        # client and never prepare, whatever this says.
        DATABASES["default"]["OPTIONS"]["prepare_threshold"] = 5
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets the admin read while the chat writes; synchronous=NORMAL keeps every
        # committed message across a process crash (not across a power cut) at a fraction of
        # the cost of FULL. IMMEDIATE avoids "database is locked" on lock upgrades.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }

REDIS_URL = os.environ.get("REDIS_URL", "")
REDIS_HOST = {
    "address": REDIS_URL,
    # redis-py 8 times reads out after 5 s by default, exactly as long as channels-redis
    # blocks in BZPOPMIN waiting for a message, so an idle receive failed with TimeoutError.
    "socket_timeout": 10,
    "socket_connect_timeout": 3,
    "retry_on_timeout": False,
}
# pubsub (Redis PUBLISH/SUBSCRIBE) measured faster than core (lists polled with BZPOPMIN) for
# this fan-out: see the README's "Choosing the channel layer".
CHAT_LAYER = os.environ.get("CHAT_LAYER", "pubsub")
if REDIS_URL and CHAT_LAYER == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_HOST],
                "prefix": os.environ.get("CHAT_LAYER_PREFIX", "chat"),
            },
        }
    }
elif REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_HOST],
                "prefix": os.environ.get("CHAT_LAYER_PREFIX", "chat"),
                # Each process has one mailbox that carries every broadcast for its sockets;
                # the default capacity of 100 would drop messages silently under load.
                "capacity": env_int("CHAT_LAYER_CAPACITY", 10000),
                "expiry": 60,
                # Processes re-add themselves to their rooms' groups on every heartbeat, so a
                # dead process falls out of them within minutes rather than a day.
                "group_expiry": env_int("CHAT_LAYER_GROUP_EXPIRY", 300),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# WhiteNoise serves the apps' static files where they lie (WHITENOISE_USE_FINDERS below), so
# collectstatic is optional: set DJANGO_STATIC_ROOT to collect them (compressed, cached) there.
STATIC_ROOT = os.environ.get("DJANGO_STATIC_ROOT") or None
WHITENOISE_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "rooms": {
            "handlers": ["console"],
            "level": os.environ.get("CHAT_LOG_LEVEL", "INFO"),
            "propagate": False,
        },
    },
}

# Chat limits. Every one is a bound on something a client controls.
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 2000)
CHAT_MAX_FRAME_BYTES = env_int("CHAT_MAX_FRAME_BYTES", 64 * 1024)
CHAT_HISTORY_DEFAULT = 50
CHAT_HISTORY_MAX = 200
CHAT_RATE_PER_SEC = env_float("CHAT_RATE_PER_SEC", 10.0)
CHAT_RATE_BURST = env_float("CHAT_RATE_BURST", 20.0)
CHAT_RATE_STRIKES = env_int("CHAT_RATE_STRIKES", 10)
CHAT_HEARTBEAT_SECONDS = env_float("CHAT_HEARTBEAT_SECONDS", 2.0)
CHAT_PRESENCE_TIMEOUT_SECONDS = env_float("CHAT_PRESENCE_TIMEOUT_SECONDS", 6.0)
# A reader with more than this many bytes unsent is disconnected (1008) rather than buffered
# for without bound or allowed to slow its room down.
CHAT_SEND_BACKLOG_BYTES = env_int("CHAT_SEND_BACKLOG_BYTES", 1024 * 1024)
# Under sustained load a process commits a batch of messages at most once per interval:
# CHAT_BATCH_INTERVAL_MS while the messages it fans out come slowly, stretching with their rate
# to CHAT_BATCH_INTERVAL_MAX_MS at CHAT_BATCH_FULL_RATE messages per second; its writes to each
# socket wait for what the load adds, and what other processes send waits for its next batch
# (rooms/hub.py, Pace). A message after a quiet spell waits for none.
CHAT_BATCH_INTERVAL_MS = env_float("CHAT_BATCH_INTERVAL_MS", 10.0)
CHAT_BATCH_INTERVAL_MAX_MS = env_float("CHAT_BATCH_INTERVAL_MAX_MS", 40.0)
CHAT_BATCH_FULL_RATE = env_float("CHAT_BATCH_FULL_RATE", 2000.0)
# Under load the event loop naps this long at a time (rooms/nap.py), in proportion to how far
# the load has stretched the batch interval, and takes what arrived meanwhile in one go; at most
# a quarter of CHAT_BATCH_INTERVAL_MAX_MS. 0: never.
CHAT_NAP_MS = env_float("CHAT_NAP_MS", 3.0)
CHAT_WORKER_NAME = os.environ.get("CHAT_WORKER_NAME", "")
# Long-lived objects are frozen out of the garbage collector's way once this many accumulate
# (0: only what is loaded at startup), and everything is collected once every
# CHAT_GC_FULL_SECONDS if anything was frozen since (rooms/collector.py).
CHAT_GC_FREEZE_AT = env_int("CHAT_GC_FREEZE_AT", 10_000)
CHAT_GC_FULL_SECONDS = env_float("CHAT_GC_FULL_SECONDS", 3600.0)
# Start the process's hub (heartbeat, sweep, mailbox) when the server starts, not at the first
# chat connection.
CHAT_HUB_AT_STARTUP = True
# Close sockets with 1001 and remove their presence on SIGTERM/SIGINT before the server stops.
CHAT_GRACEFUL_SHUTDOWN = True
