"""Fixtures for end-to-end tests: real server processes and the services they run on.

Redis and PostgreSQL are the machine's own (loopback only). When one is unreachable its tests
are skipped with the reason, or fail with it when CHAT_REQUIRE_SERVICES=1 (as in CI).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.e2e.harness import ServerProcess

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/test"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def service_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when the run requires every service."""
    if os.environ.get("CHAT_REQUIRE_SERVICES", "").strip() == "1":
        pytest.fail(f"{reason} (CHAT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _require_loopback(url: str, what: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        service_unavailable(f"{what} at {host!r} is not a loopback address; tests use 127.0.0.1")


# --- servers --------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A database URL for a fresh SQLite file of this test (created by the first migrate)."""
    return f"sqlite:///{tmp_path / 'chat.sqlite3'}"


class ServerFactory:
    """Starts servers for one test and guarantees each is killed at teardown."""

    def __init__(self, log_dir: Path, default_database_url: str) -> None:
        self.log_dir = log_dir
        self.default_database_url = default_database_url
        self.servers: list[ServerProcess] = []

    def __call__(
        self,
        kind: str = "daphne",
        *,
        database_url: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        migrate: bool = True,
    ) -> ServerProcess:
        """Start a server (migrating its database first) and return it once it answers."""
        server = self.create(
            kind,
            database_url=database_url,
            env=env,
            extra_args=extra_args,
            port=port,
            migrate=migrate,
        )
        return server.start()

    def create(
        self,
        kind: str = "daphne",
        *,
        database_url: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        migrate: bool = True,
    ) -> ServerProcess:
        """A server registered for cleanup but not started (call `.start()`)."""
        index = len(self.servers)
        server = ServerProcess(
            kind,
            database_url=database_url or self.default_database_url,
            env=env,
            extra_args=extra_args,
            port=port,
            migrate=migrate,
            log_path=self.log_dir / f"server-{index}-{kind}.log",
        )
        self.servers.append(server)
        return server

    def close_all(self) -> None:
        # All are asked to stop at once, so their grace periods overlap.
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            server.close()


@pytest.fixture
def server_factory(tmp_path: Path, sqlite_url: str) -> Iterator[ServerFactory]:
    """`server_factory(kind, database_url=..., env={...})` starts a real server.

    Servers use the test's `sqlite_url` unless given another database. Every server is killed
    at teardown; their logs stay in tmp_path and are printed (shown when a test fails).
    """
    log_dir = tmp_path / "server-logs"
    log_dir.mkdir()
    factory = ServerFactory(log_dir, sqlite_url)
    try:
        yield factory
    finally:
        factory.close_all()
        for server in factory.servers:
            print(f"===== {server!r} =====\n{server.output()}")


@pytest.fixture
async def clients() -> AsyncIterator[AsyncExitStack]:
    """An exit stack for WebSocket clients: whatever is pushed on it is closed at teardown."""
    async with AsyncExitStack() as stack:
        yield stack


# --- Redis ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisService:
    url: str
    prefix: str

    @property
    def env(self) -> dict[str, str]:
        """The server environment that puts its channel layer on this Redis and prefix."""
        return {"REDIS_URL": self.url, "CHAT_LAYER_PREFIX": self.prefix}


@pytest.fixture
def redis_url() -> Iterator[RedisService]:
    """The machine's Redis (REDIS_URL or redis://127.0.0.1:6379/0) with a prefix of this
    test's own; its keys are deleted afterwards."""
    import redis

    url = os.environ.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL
    _require_loopback(url, "Redis")
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        try:
            client.ping()
        except redis.RedisError as error:
            service_unavailable(f"Redis at {url} is unreachable: {error}")
        prefix = f"chat-e2e-{uuid.uuid4().hex[:12]}"
        yield RedisService(url=url, prefix=prefix)
        with contextlib.suppress(redis.RedisError):
            doomed = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if doomed:
                client.delete(*doomed)
    finally:
        client.close()


# --- PostgreSQL -----------------------------------------------------------------------------


def _postgres_server_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if urlsplit(url).scheme in {"postgres", "postgresql"}:
        return url
    return DEFAULT_POSTGRES_URL


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session on the PostgreSQL at DATABASE_URL (or
    postgres://postgres@127.0.0.1:5432/test), dropped at the end (WITH FORCE)."""
    import psycopg
    from psycopg import sql

    server_url = _postgres_server_url()
    _require_loopback(server_url, "PostgreSQL")
    try:
        admin = psycopg.connect(server_url, autocommit=True, connect_timeout=3)
    except psycopg.Error as error:
        service_unavailable(f"PostgreSQL at {server_url} is unreachable: {error}")
    name = f"chat_e2e_{uuid.uuid4().hex[:12]}"
    try:
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as error:
            service_unavailable(f"cannot create a database on {server_url}: {error}")
        try:
            yield _with_database(server_url, name)
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    finally:
        admin.close()
