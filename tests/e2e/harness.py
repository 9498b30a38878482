"""Real server processes for end-to-end tests: migrate, start, wait until ready, signal, stop.

Everything listens on 127.0.0.1 only. Each server runs in its own process group with an
environment built from scratch for the chat (nothing chat-related leaks in from the test
process, in particular not DJANGO_SETTINGS_MODULE=tests.settings), and writes its output to a
log file that `output()` reads back and every error message quotes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from websockets.sync.client import connect as ws_connect

REPO_ROOT = Path(__file__).resolve().parents[2]
# Not resolved: the venv's python is a symlink, and its directory is the venv's bin/.
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
KINDS = ("daphne", "uvicorn")

# Variables of the test process that would change how the server is configured.
_STRIPPED_PREFIXES = ("DJANGO_", "CHAT_")
_STRIPPED = {"DATABASE_URL", "REDIS_URL"}


class ServerError(RuntimeError):
    """A server did not start, answer or stop as expected; the message carries its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def server_command(kind: str, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    if kind == "daphne":
        return [
            str(VENV_BIN / "daphne"),
            "-b",
            HOST,
            "-p",
            str(port),
            *extra_args,
            "chatsite.asgi:application",
        ]
    if kind == "uvicorn":
        return [
            str(VENV_BIN / "uvicorn"),
            "chatsite.asgi:application",
            "--host",
            HOST,
            "--port",
            str(port),
            "--ws",
            "websockets-sansio",
            # As bin/serve runs it; a test that wants compression passes `true` after this.
            "--ws-per-message-deflate",
            "false",
            "--lifespan",
            "on",
            *extra_args,
        ]
    raise ValueError(f"unknown server kind {kind!r}; expected one of {KINDS}")


def server_env(database_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_STRIPPED_PREFIXES) and key not in _STRIPPED
    }
    env.update(
        DJANGO_SECRET_KEY=secrets.token_urlsafe(32),
        DJANGO_DEBUG="0",
        DATABASE_URL=database_url,
        PYTHONUNBUFFERED="1",
    )
    if extra:
        env.update(extra)
    return env


def _default_interrupt() -> None:
    signals.signal(signals.SIGINT, signals.SIG_DFL)


class ServerProcess:
    """One daphne or uvicorn process serving chatsite.asgi:application on 127.0.0.1.

    `start()` migrates the database, starts the server and returns once /echo answers a
    WebSocket round trip. Always call `close()` (the e2e `server_factory` fixture does).
    """

    def __init__(
        self,
        kind: str,
        *,
        database_url: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        migrate: bool = True,
        ready_timeout: float = 30.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown server kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.port = port if port is not None else free_port()
        self.env = server_env(database_url, env)
        self.command = server_command(kind, self.port, extra_args)
        self.migrate = migrate
        self.ready_timeout = ready_timeout
        self._own_log = log_path is None
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix=f"chat-{kind}-{self.port}-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "not started" if self.process is None else f"pid {self.process.pid}"
        return f"<ServerProcess {self.kind} :{self.port} {state}>"

    # --- addresses and logs ---

    def url(self, path: str = "/chat") -> str:
        return f"ws://{HOST}:{self.port}/{path.lstrip('/')}"

    def http_url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}/{path.lstrip('/')}"

    def output(self) -> str:
        """Everything the migration and the server wrote so far."""
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _error(self, what: str) -> ServerError:
        return ServerError(
            f"{self.kind} on port {self.port}: {what}\n"
            f"command: {' '.join(self.command)}\n--- server output ---\n{self.output()}"
        )

    # --- life cycle ---

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerError(f"{self!r} was never started")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def start(self) -> ServerProcess:
        if self.process is not None:
            raise ServerError(f"{self!r} already started")
        with self.log_path.open("ab") as log:
            if self.migrate:
                log.write(b"--- manage.py migrate ---\n")
                log.flush()
                try:
                    done = subprocess.run(
                        [sys.executable, "manage.py", "migrate", "--noinput"],
                        cwd=REPO_ROOT,
                        env=self.env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        timeout=120,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    raise self._error("migrate did not finish within 120s") from None
                if done.returncode != 0:
                    raise self._error(f"migrate exited with {done.returncode}")
            log.write(f"--- {' '.join(self.command)} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches everything
                # As in a terminal, whatever this test run inherited (a run started in the
                # background has SIGINT ignored, and so would every server it starts).
                preexec_fn=_default_interrupt,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self) -> None:
        """Poll until /echo completes a WebSocket round trip, the process dies, or time runs
        out. Polling: a separate process offers nothing to await."""
        deadline = time.monotonic() + self.ready_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise self._error(f"exited with {self.returncode} before it was ready")
            try:
                with ws_connect(
                    self.url("/echo"), open_timeout=2, close_timeout=2, proxy=None
                ) as probe:
                    probe.send("1")
                    answer = probe.recv(timeout=2)
                if answer == '{"echo":1}':
                    return
                last_error = ServerError(f"unexpected /echo answer {answer!r}")
            except Exception as error:  # refused, reset, timed out: not ready yet
                last_error = error
            time.sleep(0.1)
        raise self._error(f"not ready within {self.ready_timeout}s (last error: {last_error!r})")

    def signal(self, sig: int) -> None:
        """Send a signal to the server process (not its whole group)."""
        os.kill(self.pid, sig)

    def _killpg(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL the server's process group and reap it; returns the exit code."""
        if self.process is None:
            return None
        self._killpg(signals.SIGKILL)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"still running {timeout}s after SIGKILL") from None

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the server to exit by itself; its exit code. One that does not exit in
        time is killed, and ServerError is raised."""
        if self.process is None:
            raise ServerError(f"{self!r} was never started")
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._error(f"did not exit within {timeout}s") from None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for the exit and return its code (negative: killed by a signal).

        A server that does not exit in time is killed, and ServerError is raised.
        """
        if self.process is None:
            raise ServerError(f"{self!r} was never started")
        if self.process.poll() is None:
            self.signal(signals.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise self._error(f"did not exit within {timeout}s of SIGTERM") from None
        # Nothing it started may outlive it.
        self._killpg(signals.SIGKILL)
        return self.process.returncode

    def terminate(self) -> None:
        """Ask a running server to stop (SIGTERM), without waiting; resumes it first if it
        was paused (SIGSTOP), since a paused process cannot act on SIGTERM."""
        if self.running:
            self._killpg(signals.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                self.signal(signals.SIGTERM)

    def close(self, grace: float = 5.0) -> None:
        """Stop the server if it still runs (SIGTERM, so it can clear its presence rows from a
        database other tests share; SIGKILL after `grace` seconds), kill anything left in its
        process group, and drop a log file this object created itself."""
        if self.process is not None:
            if self.process.poll() is None and grace > 0:
                self.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(grace)
            self._killpg(signals.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        if self._own_log:
            with contextlib.suppress(FileNotFoundError):
                self.log_path.unlink()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
