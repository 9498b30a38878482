"""Faults for end-to-end tests: a Redis of the test's own that can be stopped and started again,
and a TCP proxy in front of PostgreSQL that can cut the database off and let it back.

The machine's own Redis and PostgreSQL are never stopped: a test that restarts Redis starts its
own redis-server on a free loopback port, and a test that cuts the database points the servers
at a `TcpProxy` and cuts the proxy. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from tests.e2e.harness import HOST, free_port

T = TypeVar("T")

REDIS_SERVER = "/usr/bin/redis-server"


def service_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when the run requires every service (CHAT_REQUIRE_SERVICES=1),
    as the fixtures of conftest.py do."""
    if os.environ.get("CHAT_REQUIRE_SERVICES", "").strip() == "1":
        pytest.fail(f"{reason} (CHAT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


class FaultError(RuntimeError):
    """A helper service did not start or stop as expected; the message carries its log."""


# --- deadlines ------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
) -> T:
    """Call `check` until it returns something other than None (returned) or `timeout` passes
    (AssertionError naming `what` and the last value or error). For conditions outside the
    test process - a server's health, a process's exit - that nothing can be awaited for."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = await check()
        except AssertionError:
            raise
        except Exception as error:
            last = error
        else:
            if result is not None:
                return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


# --- HTTP -----------------------------------------------------------------------------------


async def http_get(port: int, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path over a plain socket (never through a proxy from the
    environment); returns the status code and the body."""

    async def fetch() -> bytes:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    raw = await asyncio.wait_for(fetch(), timeout)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {raw[:200]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return int(parts[1]), body


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


# --- Redis ----------------------------------------------------------------------------------


def redis_server_binary() -> str:
    """The redis-server to run; skips (or fails under CHAT_REQUIRE_SERVICES=1) without one."""
    path = REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else shutil.which("redis-server")
    if not path:
        service_unavailable(f"{REDIS_SERVER} is missing: cannot run a Redis of the test's own")
    return path


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    """True if a Redis on 127.0.0.1:port answers PING."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server of the test's own on 127.0.0.1, without persistence, that can be stopped
    and started again on the same port (what a Redis restart looks like to its clients)."""

    def __init__(self, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = port if port is not None else free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"chat-redis-{self.port}-"))
        self.log_path = log_path if log_path is not None else self._workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "stopped" if not self.running else f"pid {self.process.pid}"  # type: ignore[union-attr]
        return f"<RedisServer :{self.port} {state}>"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _error(self, what: str) -> FaultError:
        return FaultError(f"redis-server on port {self.port}: {what}\n--- log ---\n{self.output()}")

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or start again) and return once it answers PING."""
        if self.running:
            raise self._error("already running")
        command = [
            self.binary,
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self._workdir),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"--- {' '.join(repr(part) for part in command)} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._error(f"exited with {self.process.returncode} while starting")
            if redis_ping(self.port, timeout=0.5):
                return self
            time.sleep(0.05)
        self.kill()
        raise self._error(f"did not answer PING within {timeout}s")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (with no save points it saves nothing) and wait for the exit."""
        if self.process is None:
            raise self._error("never started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise self._error(f"did not exit within {timeout}s of SIGTERM") from None
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._workdir, ignore_errors=True)


# --- TCP proxy ------------------------------------------------------------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP RST, as a crashed host or a broken network would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target, in a thread of its own (so that blocking calls of
    the test, such as starting a server, never stall the traffic).

    `cut()` resets every proxied connection and then, depending on `mode`, resets each new one
    as soon as it is accepted ("reset": the database looks down) or accepts it and never answers
    ("blackhole": the network drops packets). `restore()` lets connections through again.
    """

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = "open"
        self.accepted = 0
        self.refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<TcpProxy :{self.port} -> {self.target[0]}:{self.target[1]} {self.mode}>"

    def url_for(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by this proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{HOST}:{self.port}" if userinfo else f"{HOST}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # --- control, from the test's thread ---

    def start(self) -> TcpProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._accept, HOST, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as error:
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise FaultError(f"proxy did not start: {failure!r}")
        self.mode = "open"
        return self

    def _call(self, factory: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
        assert self._loop is not None, "proxy not started"
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(timeout)

    def cut(self, mode: str = "reset") -> None:
        """Reset every proxied connection; new ones are reset ("reset") or held ("blackhole")."""
        if mode not in {"reset", "blackhole"}:
            raise ValueError(f"unknown mode {mode!r}")
        self._call(lambda: self._cut(mode))

    def restore(self) -> None:
        """Let new connections through again (held ones are reset: their clients gave up)."""
        self._call(self._restore)

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start() if self._loop is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the proxy's own loop ---

    async def _cut(self, mode: str) -> None:
        self.mode = mode
        for writer in list(self._links):
            _reset(writer)
        self._links.clear()

    async def _restore(self) -> None:
        self.mode = "open"
        for writer in list(self._held):
            _reset(writer)
        self._held.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._links) + list(self._held):
            _reset(writer)
        self._links.clear()
        self._held.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            self.refused += 1
            _reset(writer)
            return
        if self.mode == "blackhole":
            self.refused += 1
            self._held.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            _reset(writer)
            return
        if self.mode != "open":  # cut while connecting
            _reset(writer)
            _reset(up_writer)
            return
        self.accepted += 1
        self._links.add(writer)
        self._links.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink, (writer, up_writer)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side is gone: so is the other, as with a real connection.
            for writer in pair:
                if writer in self._links:
                    self._links.discard(writer)
                    writer.close()
