"""Start, check and stop the server configurations under test (all on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Not resolved: a venv's python is a symlink, and its bin/ is the one we want.
VENV_BIN = Path(sys.executable).parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class ConfigDef:
    name: str
    kind: str  # "yardstick" | "daphne" | "uvicorn"
    processes: int


CONFIGS = {
    c.name: c
    for c in (
        ConfigDef("yardstick", "yardstick", 1),
        ConfigDef("daphne-1", "daphne", 1),
        ConfigDef("uvicorn-1", "uvicorn", 1),
        ConfigDef("daphne-2", "daphne", 2),
        ConfigDef("uvicorn-2", "uvicorn", 2),
    )
}


class StartError(Exception):
    pass


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing non-loopback target {url!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tail(path: Path, limit: int = 2500) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def probe(port: int, timeout: float = 1.0) -> str | None:
    """One WebSocket upgrade attempt on /echo: the HTTP status line, or None if no answer."""
    request = (
        f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: YmVuY2gtcmVhZHktcHJvYmU=\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(request)
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError:
        return None
    line = head.split(b"\r\n", 1)[0].decode("latin1", "replace")
    return line or None


@dataclass
class Deployment:
    """One configuration: its processes, ports, scratch space and external resources."""

    config: ConfigDef
    pg_admin_url: str
    redis_url: str
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chatbench-")))
    db_name: str | None = None
    layer_prefix: str | None = None
    startup_s: float | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in (
            "REDIS_URL",
            "DATABASE_URL",
            "DJANGO_SETTINGS_MODULE",
            "CHAT_LAYER_PREFIX",
        ):
            env.pop(name, None)
        env.update(
            PYTHONUNBUFFERED="1",
            DJANGO_SECRET_KEY="bench-" + secrets.token_hex(16),
            DJANGO_DEBUG="0",
            DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
            # The per-connection rate limit must never be what the bench measures.
            CHAT_RATE_PER_SEC="1000000",
            CHAT_RATE_BURST="1000000",
        )
        if self.config.processes == 1:
            env["DATABASE_URL"] = f"sqlite:///{self.workdir / 'bench.sqlite3'}"
        else:
            assert self.db_name and self.layer_prefix
            admin = urlsplit(self.pg_admin_url)
            env["DATABASE_URL"] = admin._replace(path="/" + self.db_name).geturl()
            env["REDIS_URL"] = self.redis_url
            env["CHAT_LAYER_PREFIX"] = self.layer_prefix
        return env

    def _command(self, port: int) -> list[str]:
        if self.config.kind == "yardstick":
            return [
                sys.executable,
                str(BENCH_DIR / "yardstick.py"),
                "--port",
                str(port),
            ]
        app = "chatsite.asgi:application"
        if self.config.kind == "daphne":
            return [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), app]
        return [
            str(VENV_BIN / "uvicorn"),
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ws",
            "websockets-sansio",
            "--ws-per-message-deflate",
            "false",
            "--lifespan",
            "on",
            "--no-access-log",
            "--log-level",
            "warning",
        ]

    def _create_database(self) -> None:
        import psycopg

        self.db_name = "chat_bench_" + secrets.token_hex(4)
        with psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')

    def _drop_database(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        except psycopg.Error as exc:
            self.notes.append(f"could not drop database {self.db_name}: {exc}")

    def _clear_redis(self) -> None:
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{self.layer_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except Exception as exc:
            self.notes.append(f"could not clear redis keys {self.layer_prefix}*: {exc}")

    def start(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        if self.config.kind != "yardstick":
            if not (REPO_ROOT / "chatsite" / "asgi.py").exists():
                raise StartError("chatsite/asgi.py not found")
            if self.config.processes > 1:
                self.layer_prefix = "bench" + secrets.token_hex(4)
                try:
                    self._create_database()
                except Exception as exc:
                    raise StartError(f"cannot create PostgreSQL database: {exc}") from exc
            try:
                done = subprocess.run(
                    [sys.executable, "manage.py", "migrate", "--noinput"],
                    cwd=REPO_ROOT,
                    env=self._env(),
                    capture_output=True,
                    timeout=300,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise StartError("manage.py migrate timed out") from exc
            if done.returncode != 0:
                out = (done.stdout + done.stderr).decode("utf-8", "replace")[-2500:]
                raise StartError(f"manage.py migrate failed (exit {done.returncode}):\n{out}")
        env = self._env()
        for i in range(self.config.processes):
            port = free_port()
            log_path = self.workdir / f"server-{i}.log"
            env["CHAT_WORKER_NAME"] = f"{self.config.name}-{i}"
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(
                    self._command(port),
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: stop() reaches children
                )
            # Inherited from the runner already; set again (prlimit) in case it was not.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            with contextlib.suppress(psutil.Error):
                psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE, (hard, hard))
            self.ports.append(port)
            self.procs.append(proc)
            self.logs.append(log_path)
        deadline = time.monotonic() + timeout
        for port, proc, log_path in zip(self.ports, self.procs, self.logs, strict=True):
            while True:
                if proc.poll() is not None:
                    raise StartError(
                        f"server on port {port} exited with {proc.returncode} during startup:\n"
                        + tail(log_path)
                    )
                status = probe(port)
                if status is not None:
                    if " 101 " not in status + " ":
                        self.notes.append(f"/echo answered {status!r}; using TCP readiness")
                    break
                if time.monotonic() > deadline:
                    raise StartError(
                        f"server on port {port} not ready after {timeout:.0f}s:\n" + tail(log_path)
                    )
                time.sleep(0.2)
        self.startup_s = round(time.monotonic() - t0, 2)

    def dead(self) -> list[str]:
        """Descriptions of server processes that have exited."""
        return [
            f"pid {p.pid} (port {port}) exited with {p.returncode}"
            for p, port in zip(self.procs, self.ports, strict=True)
            if p.poll() is not None
        ]

    def log_tails(self) -> list[str]:
        return [tail(path) for path in self.logs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
                self.notes.append(f"pid {proc.pid} needed SIGKILL")

    def cleanup(self) -> None:
        if self.db_name:
            self._drop_database()
        if self.layer_prefix:
            self._clear_redis()
        shutil.rmtree(self.workdir, ignore_errors=True)
