"""The fan-out's receiving clients, spread over processes of their own.

One process cannot read 200 sockets at the top of the fan-out ladder: parsing each of
several hundred thousand deliveries a second in Python fills its core, and then its own
queueing is what the latency figures show. So the load generator keeps the senders and
hands the other clients of the room to a few receiver processes. Each one runs this module:

    python bench/receivers.py    # requests on stdin, replies on stdout, one JSON per line

and counts what its own clients receive, per step, with the same client code and marker
as the load generator. The load generator asks for the counts and latency samples. Every
request is answered, with {"error": ...} if it failed, and every wait on an answer is
bounded, so a stuck receiver ends a scenario with an error rather than a hang.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import psutil
from loadgen import (
    Bench,
    Client,
    close_all,
    open_many,
    raise_nofile,
    reopen_closed,
    run_event_loop,
)

# Each receiver gets client ids from its own range, so that no two clients share one.
CID_RANGE = 1_000_000
REPLY_TIMEOUT_S = 30.0
SCRIPT = str(Path(__file__).resolve())


class Receivers:
    """The load generator's side: start, command and read the receiver processes."""

    def __init__(self, bench: Bench, count: int) -> None:
        self.bench = bench
        self.count = count
        self.procs: list[asyncio.subprocess.Process] = []
        self.ps: list[psutil.Process] = []
        self._locks: list[asyncio.Lock] = []

    async def start(self) -> None:
        for _ in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=2**26,  # a step's latency samples come back as one line
            )
            self.procs.append(proc)
            self.ps.append(psutil.Process(proc.pid))
            self._locks.append(asyncio.Lock())
        await self.each(
            lambda i: {
                "op": "init",
                "ports": self.bench.ports,
                "nonce": self.bench.nonce,
                "first_cid": CID_RANGE * (i + 1),
            }
        )

    async def call(self, i: int, request: dict[str, Any]) -> dict[str, Any]:
        proc = self.procs[i]
        assert proc.stdin is not None and proc.stdout is not None
        async with self._locks[i]:
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), REPLY_TIMEOUT_S)
            except ConnectionError:
                line = b""
        if not line:
            raise RuntimeError(f"receiver process {proc.pid} exited")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"receiver process {proc.pid}: {reply['error']}")
        return reply

    async def each(self, request: Any) -> list[dict[str, Any]]:
        """Send each receiver a request (a dict, or a function of its index) at once."""
        return await asyncio.gather(
            *(self.call(i, request(i) if callable(request) else request) for i in range(self.count))
        )

    async def open(
        self, count: int, room: str, concurrency: int, timeout: float, deadline_s: float
    ) -> dict[str, Any]:
        """Open `count` clients in `room`, shared out among the receivers."""
        shares = [count // self.count + (i < count % self.count) for i in range(self.count)]
        replies = await self.each(
            lambda i: {
                "op": "open",
                "count": shares[i],
                "room": room,
                "concurrency": max(1, concurrency // self.count),
                "timeout": timeout,
                "deadline_s": deadline_s,
            }
        )
        return merge_connect_stats([r["connect"] for r in replies])

    async def begin_step(self, idx: int) -> None:
        await self.each({"op": "step", "idx": idx})

    async def progress(self, idx: int | None) -> tuple[int, int]:
        """Deliveries counted for step `idx` so far, and all frames received so far."""
        replies = await self.each({"op": "progress", "idx": idx})
        return sum(r["received"] for r in replies), sum(r["activity"] for r in replies)

    async def end_step(self, idx: int) -> dict[str, Any]:
        """Stop the step: what the receivers counted, their latency samples and errors."""
        replies = await self.each({"op": "end_step", "idx": idx})
        return {
            "received": sum(r["received"] for r in replies),
            "last_ns": max(r["last_ns"] for r in replies),
            "lat": [v for r in replies for v in r["lat"]],
            "errors": sum(r["errors"] for r in replies),
        }

    async def lost(self) -> int:
        """How many of the receivers' clients a server has closed."""
        return sum(r["lost"] for r in await self.each({"op": "lost"}))

    async def restore(self) -> tuple[int, int]:
        """Reconnect the clients a server dropped: (lost, reconnected)."""
        replies = await self.each({"op": "restore"})
        return sum(r["lost"] for r in replies), sum(r["reopened"] for r in replies)

    def cpu_seconds(self) -> list[float]:
        out = []
        for p in self.ps:
            try:
                t = p.cpu_times()
                out.append(t.user + t.system)
            except psutil.Error:
                out.append(0.0)
        return out

    async def stop(self) -> dict[str, Any]:
        """Close every client, end the processes; their error samples and frame counts."""
        report: dict[str, Any] = {"error_samples": {}, "other_frames": {}, "bad_frames": 0}
        try:
            for r in await self.each({"op": "close"}):
                for key in ("error_samples", "other_frames"):
                    for k, v in r[key].items():
                        report[key][k] = report[key].get(k, 0) + v
                report["bad_frames"] += r["bad_frames"]
        except Exception as exc:
            # Already failing (a receiver died or stopped answering): end them regardless.
            report["error_samples"][f"receivers: {exc}"[:160]] = 1
        finally:
            for proc in self.procs:
                if proc.stdin is not None:
                    proc.stdin.close()
            for proc in self.procs:
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        return report


def merge_connect_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One `open_many` summary for clients opened in several places at once."""
    failures: dict[str, int] = {}
    for part in parts:
        for k, v in part["failure_samples"].items():
            failures[k] = failures.get(k, 0) + v
    connected = sum(p["connected"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    return {
        "requested": sum(p["requested"] for p in parts),
        "connected": connected,
        "failed": sum(p["failed"] for p in parts),
        "failure_samples": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:3]),
        "seconds": seconds,
        "connects_per_s": round(connected / seconds, 1) if seconds > 0 else None,
        # Percentiles cannot be merged; the slowest part's stand for all.
        "connect_latency": max(
            (p["connect_latency"] for p in parts),
            key=lambda lat: lat["p99_ms"] or 0,
        ),
    }


class Worker:
    """The receiver process's side: its clients and their counts."""

    def __init__(self) -> None:
        self.bench: Bench | None = None
        self.clients: list[Client] = []
        self.room = ""
        self.timeout = 10.0

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "init":
            self.bench = Bench(req["ports"], [], nonce=req["nonce"], readers=True)
            self.bench.next_cid = req["first_cid"]
            return {}
        bench = self.bench
        if bench is None:
            raise RuntimeError("not initialised")
        if op == "open":
            self.room, self.timeout = req["room"], req["timeout"]
            clients, stats = await open_many(
                bench,
                req["count"],
                lambda i: self.room,
                req["concurrency"],
                self.timeout,
                req["deadline_s"],
            )
            self.clients.extend(clients)
            return {"connect": stats}
        if op == "step":
            while len(bench.steps) <= req["idx"]:
                bench.new_step()
            bench.current = bench.steps[req["idx"]]
            return {}
        if op == "progress":
            idx = req["idx"]
            st = bench.steps[idx] if idx is not None and idx < len(bench.steps) else None
            return {"received": st.received if st else 0, "activity": bench.activity()}
        if op == "end_step":
            st = bench.steps[req["idx"]]
            bench.current = None
            return {
                "received": st.received,
                "last_ns": st.last_ns,
                "lat": st.lat,
                "errors": st.errors,
            }
        if op == "lost":
            return {"lost": sum(1 for c in self.clients if c.closed.done())}
        if op == "restore":
            lost, reopened = await reopen_closed(bench, self.clients, self.room, self.timeout)
            return {"lost": lost, "reopened": reopened}
        if op == "close":
            await close_all(self.clients)
            self.clients = []
            return {
                "error_samples": dict(bench.error_samples),
                "other_frames": dict(bench.other_frames),
                "bad_frames": bench.bad_frames,
            }
        raise ValueError(f"unknown op {op!r}")


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    worker = Worker()
    while line := await reader.readline():
        try:
            reply = await worker.handle(json.loads(line))
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()
    if worker.clients:
        await close_all(worker.clients)


def main() -> None:
    raise_nofile()
    run_event_loop(serve())


if __name__ == "__main__":
    main()
