"""Load generator: runs the scenarios against running servers, in its own process.

    python bench/loadgen.py < spec.json > result.json

The spec (written by run.py) names the ports, the server pids (for CPU/RSS
sampling) and the scenario parameters; or, under "lockstep", several such
configurations whose fan-out ladders climb side by side (`run_lockstep`).
Progress lines go to stderr, the result JSON to stdout. Every wait is bounded,
so a dead or stuck server ends a scenario with an error instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
from probe import unit_ms
from wsclient import WSClient, connect

if TYPE_CHECKING:
    from receivers import Receivers

T = TypeVar("T")
HOST = "127.0.0.1"
PAD = "lorem ipsum dolor sit amet"
# Every delivery is counted, but only every 8th one's latency is kept (the 1st, 9th, 17th...
# of a step, in order of arrival, whatever their latency). When one process read every client
# (as `--receivers 0` still does), it was what fell behind first at the top of the ladder:
# parsing and keeping a timestamp for each of 400,000+ deliveries a second made its own
# queueing a large part of the p99 it reported (with two server processes, whose fewer and
# larger writes arrive as bursts, p99 at 2,000 msg/s went from 218-256 ms to 134-161 ms with
# the sampling alone). Over the hundreds of thousands of deliveries of a step, the percentiles
# of the sample are the step's.
LATENCY_SAMPLE_MASK = 7


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pct(sorted_values: list[int], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] / 1e6


def latency_summary(values_ns: list[int]) -> dict[str, float | None]:
    v = sorted(values_ns)
    return {
        "p50_ms": pct(v, 0.50),
        "p90_ms": pct(v, 0.90),
        "p99_ms": pct(v, 0.99),
        "max_ms": v[-1] / 1e6 if v else None,
    }


def host_clock() -> tuple[float, float]:
    """(CPU time the hypervisor took from this machine, all CPU time), in seconds, summed
    over its CPUs. On a virtual machine whose host is busy, "steal" is time the machine's
    processes were ready to run and were not: everything here then runs slower, whatever it
    is, and the figures measured meanwhile are the host's as much as the server's."""
    t = psutil.cpu_times()
    return getattr(t, "steal", 0.0), sum(t)


def steal_pct(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    total = after[1] - before[1]
    return round(100 * (after[0] - before[0]) / total, 1) if total > 0 else None


class StepStats:
    __slots__ = ("ack_lat", "acks", "errors", "last_ns", "lat", "marker", "received")

    def __init__(self, marker: bytes = b"") -> None:
        # What every message sent in this step starts with: the run's marker and the step.
        self.marker = marker
        self.received = 0
        self.lat: list[int] = []
        self.last_ns = 0
        self.acks = 0
        self.ack_lat: list[int] = []
        self.errors = 0


class Servers:
    """CPU and RSS of the server processes (and any children they spawn)."""

    def __init__(self, pids: list[int]) -> None:
        self.procs: list[psutil.Process] = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                self.procs.append(proc)
                self.procs.extend(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass

    def alive(self) -> bool:
        try:
            return bool(self.procs) and all(
                p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self.procs
            )
        except psutil.Error:
            return False

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total


class Bench:
    """State shared by all clients of one load generator run."""

    def __init__(
        self, ports: list[int], pids: list[int], nonce: str | None = None, *, readers: bool = False
    ) -> None:
        self.ports = ports
        # Whether this process's clients only read (a receiver process): none of them posts,
        # so every frame that carries a step's marker is another client's broadcast.
        self.readers = readers
        self.nonce = nonce or secrets.token_hex(3)
        # Unique per run, so history replayed from earlier runs is never counted.
        self.marker_s = f"~b{self.nonce}~"
        self.marker = self.marker_s.encode()
        self.mlen = len(self.marker)
        self.steps: list[StepStats] = []
        self.current: StepStats | None = None
        self.setup_errors = 0
        self.error_samples: Counter[str] = Counter()
        self.other_frames: Counter[str] = Counter()
        self.bad_frames = 0
        self.control_frames = 0
        self.next_cid = 0
        self.servers = Servers(pids)
        # Where bench/probe.py writes how fast the machine runs its fixed work, if it runs.
        self.probe_path: str | None = None
        # The fan-out's receiving clients, when they live in processes of their own.
        self.receivers: Receivers | None = None

    def new_step(self) -> tuple[int, StepStats]:
        st = StepStats(self.marker + b"%d~" % len(self.steps))
        self.steps.append(st)
        self.current = st
        return len(self.steps) - 1, st

    def parse_marker(self, text: Any) -> tuple[int, int, int] | None:
        if not isinstance(text, str):
            return None
        i = text.find(self.marker_s)
        if i < 0:
            return None
        try:
            f = text[i + self.mlen :].split("~", 4)
            return int(f[0]), int(f[1]), int(f[3])
        except (ValueError, IndexError):
            return None

    def error(self, action: Any, message: Any) -> None:
        if self.current is not None:
            self.current.errors += 1
        else:
            self.setup_errors += 1
        self.error_samples[f"{action}: {message}"] += 1

    def activity(self) -> int:
        """Grows with every frame this process receives, whatever its kind."""
        return self.control_frames + sum(st.received for st in self.steps)

    async def all_activity(self) -> int:
        """Grows with every frame any client receives, here or in a receiver process."""
        if self.receivers is None:
            return self.activity()
        return self.activity() + (await self.receivers.progress(None))[1]


class Client(WSClient):
    def __init__(self, host: str, port: int, path: str, bench: Bench, cid: int) -> None:
        super().__init__(host, port, path)
        self.bench = bench
        self.cid = cid
        self.cid_b = str(cid).encode()
        self.nick: str | None = None
        self.seq = 0
        loop = asyncio.get_running_loop()
        # Created up front: `connecting` may arrive in the same read as the 101.
        self.hello: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def data_received(self, data: bytes) -> None:
        st = self.bench.current
        if st is not None and self.bench.readers and not self._handshaking:
            if self._buf:
                data = self._buf + data
                self._buf = b""
            data = self._count_broadcasts(data, st)
        super().data_received(data)

    def _count_broadcasts(self, data: bytes, st: StepStats) -> bytes:
        """Count the whole frames at the start of `data` that are this step's broadcasts, and
        return the rest for the frame-by-frame path; `data` whole if any of them is not.

        A reader receives a few hundred thousand broadcasts a second at the top of the
        ladder, and parsing each one in Python made the readers, not the server, what
        fell behind first with two server processes on a 2-core machine. Here Python only
        steps over the frame headers, inline because a call per frame doubles the cost;
        the payloads are checked by bytes.count, and one split finds the sampled ones.
        """
        marker = self.bench.marker
        count = data.count
        pos, n, frames = 0, len(data), 0
        while pos + 4 <= n and data[pos] == 0x81:  # a final text frame
            length = data[pos + 1]
            if length == 126:
                start = pos + 4
                length = (data[pos + 2] << 8) | data[pos + 3]
            elif length < 126:
                start = pos + 2
            else:
                break  # masked, or too long to be a broadcast: the frame-by-frame path's
            end = start + length
            if end > n:
                break
            if count(marker, start, end) != 1:
                return data  # not a plain broadcast: a joined, a history page...
            pos = end
            frames += 1
        if not frames:
            return data
        # One piece after each of this step's markers; one per frame if each is this step's.
        pieces = (data[:pos] if pos < n else data).split(st.marker)
        if len(pieces) != frames + 1:
            return data
        now = time.monotonic_ns()
        before = st.received
        st.received = before + frames
        st.last_ns = now
        # The same deliveries are sampled as on the frame-by-frame path: the 1st, 9th...
        first = 1 + (-before % (LATENCY_SAMPLE_MASK + 1))
        st.lat.extend(
            now - int(piece.split(b"~", 3)[2]) for piece in pieces[first :: LATENCY_SAMPLE_MASK + 1]
        )
        return data[pos:]

    def on_text(self, payload: bytes, now_ns: int) -> None:
        # Hot path: a broadcast carrying exactly one marker from another client is
        # counted without JSON decoding. Everything else takes the slow path.
        b = self.bench
        i = payload.find(b.marker)
        if i >= 0:
            j = i + b.mlen
            if payload.find(b.marker, j) < 0:
                f = payload[j : j + 80].split(b"~", 4)
                if f[1] != self.cid_b:
                    st = b.steps[int(f[0])]
                    st.received += 1
                    if st.received & LATENCY_SAMPLE_MASK == 1:
                        st.lat.append(now_ns - int(f[3]))
                    st.last_ns = now_ns
                    return
        self.control(payload, now_ns)

    def control(self, payload: bytes, now_ns: int) -> None:
        b = self.bench
        b.control_frames += 1
        try:
            d = json.loads(payload)
        except ValueError:
            b.bad_frames += 1
            return
        if not isinstance(d, dict):
            b.bad_frames += 1
            return
        action = d.get("action")
        success = d.get("success")
        if success is False:
            b.error(action, d.get("message"))
        elif action == "chat_message":
            parsed = b.parse_marker(d.get("message"))
            if parsed is not None:
                step, sid, t = parsed
                st = b.steps[step]
                if "success" in d:
                    if sid == self.cid:
                        st.acks += 1
                        st.ack_lat.append(now_ns - t)
                elif sid != self.cid:
                    st.received += 1
                    if st.received & LATENCY_SAMPLE_MASK == 1:
                        st.lat.append(now_ns - t)
                    st.last_ns = now_ns
        else:
            b.other_frames[str(action)] += 1
        if action == "connecting" and not self.hello.done():
            self.nick = d.get("user")
            self.hello.set_result(d)
        waiter = self.waiters.pop(str(action), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(d)

    def on_closed(self) -> None:
        for waiter in (self.hello, *self.waiters.values()):
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("connection closed"))
                waiter.exception()  # mark retrieved: nobody may be awaiting it any more
        self.waiters.clear()

    async def request(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        action = str(payload["action"])
        fut = asyncio.get_running_loop().create_future()
        self.waiters[action] = fut
        self.send_text(json.dumps(payload))
        return await asyncio.wait_for(fut, timeout)

    def send_chat(self, step: int) -> None:
        self.seq += 1
        text = f"{self.bench.marker_s}{step}~{self.cid}~{self.seq}~{time.monotonic_ns()}~{PAD}"
        self.send_text('{"action":"chat_message","message":"' + text + '"}')


async def open_client(bench: Bench, room: str | None, timeout: float) -> Client:
    cid = bench.next_cid
    bench.next_cid += 1
    port = bench.ports[cid % len(bench.ports)]  # alternate between server processes
    client = await connect(Client, HOST, port, "/chat", timeout, bench=bench, cid=cid)
    try:
        await asyncio.wait_for(client.hello, timeout)
        if room is not None:
            reply = await client.request({"action": "join_room", "room": room}, timeout)
            if reply.get("success") is not True:
                raise RuntimeError(f"join_room refused: {reply.get('message')!r}")
    except BaseException:
        client.abort()
        raise
    return client


async def open_many(
    bench: Bench,
    count: int,
    room_of: Callable[[int], str | None],
    concurrency: int,
    timeout: float,
    deadline_s: float,
) -> tuple[list[Client], dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)
    times: list[int] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + deadline_s

    async def one(i: int) -> Client | None:
        async with sem:
            if time.monotonic() > deadline:
                failures["deadline"] += 1
                return None
            t0 = time.monotonic_ns()
            try:
                client = await open_client(bench, room_of(i), timeout)
            except Exception as exc:
                failures[f"{type(exc).__name__}: {exc}"[:160]] += 1
                return None
            times.append(time.monotonic_ns() - t0)
            return client

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.monotonic() - t0
    clients = [c for c in results if c is not None]
    stats = {
        "requested": count,
        "connected": len(clients),
        "failed": count - len(clients),
        "failure_samples": dict(failures.most_common(3)),
        "seconds": round(elapsed, 3),
        "connects_per_s": round(len(clients) / elapsed, 1) if elapsed > 0 else None,
        "connect_latency": latency_summary(times),
    }
    return clients, stats


async def reopen_closed(
    bench: Bench, clients: list[Client], room: str, timeout: float
) -> tuple[int, int]:
    """Put clients a server closed back in the room, in their places: (closed, reopened)."""
    closed = [i for i, c in enumerate(clients) if c.closed.done()]
    if not closed:
        return 0, 0
    fresh, _ = await open_many(bench, len(closed), lambda i: room, 50, timeout, 30)
    for i, c in zip(closed, fresh, strict=False):
        clients[i] = c
    return len(closed), len(fresh)


async def close_all(clients: list[Client], timeout: float = 5.0) -> None:
    for c in clients:
        c.close(1000)
    pending = [c.closed for c in clients if not c.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
        for c in clients:
            if not c.closed.done():
                c.abort()


async def settle(bench: Bench, quiet_s: float, cap_s: float) -> None:
    """Wait until no frame at all arrives for quiet_s (bounded by cap_s)."""
    end = time.monotonic() + cap_s
    last = await bench.all_activity()
    last_change = time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(0.02)
        now_count = await bench.all_activity()
        now = time.monotonic()
        if now_count != last:
            last, last_change = now_count, now
        elif now - last_change >= quiet_s:
            return


async def run_step(
    bench: Bench,
    senders: list[Client],
    rate: float,
    duration: float,
    fanout: int,
    drain_cap: float,
) -> dict[str, Any]:
    """Send `rate` msg/s for `duration` s round-robin over senders, then drain."""
    idx, st = bench.new_step()
    receivers = bench.receivers
    if receivers is not None:
        await receivers.begin_step(idx)
    total = max(1, round(rate * duration))
    cpu0, lg0, host0 = bench.servers.cpu_seconds(), time.process_time(), host_clock()
    rcpu0 = receivers.cpu_seconds() if receivers is not None else []
    t0 = time.monotonic()
    t0_ns = time.monotonic_ns()
    hard_end = t0 + duration * 1.5 + 1.0  # the pacer never runs much past its slot
    sent = 0
    n = len(senders)
    while sent < total:
        now = time.monotonic()
        if now > hard_end:
            break
        due = min(total, int((now - t0) * rate) + 1)
        while sent < due:
            senders[sent % n].send_chat(idx)
            sent += 1
        await asyncio.sleep(max(0.001, (due / rate) - (time.monotonic() - t0)))
    t_send = time.monotonic()
    t_send_ns = time.monotonic_ns()
    window = t_send - t0
    cpu1, lg1, host1 = bench.servers.cpu_seconds(), time.process_time(), host_clock()
    rcpu1 = receivers.cpu_seconds() if receivers is not None else []
    expected = sent * fanout

    async def received() -> int:
        if receivers is None:
            return st.received
        return st.received + (await receivers.progress(idx))[0]

    # Drain: until everything arrived, nothing arrived for a while once every post is
    # answered, or the cap. While posts wait for their answers the server still owes them, and
    # a lull is a stall (a host taking the CPU for a while), not the end of the step.
    last, last_change = await received(), time.monotonic()
    while time.monotonic() - t_send < drain_cap:
        if last >= expected and st.acks >= sent:
            break
        await asyncio.sleep(0.01)
        now = time.monotonic()
        count = await received()
        if count != last:
            last, last_change = count, now
        elif now - last_change > 0.5 and st.acks + st.errors >= sent:
            break
    bench.current = None
    count, last_ns, lat, errors = st.received, st.last_ns, st.lat, st.errors
    if receivers is not None:
        far = await receivers.end_step(idx)
        count += far["received"]
        last_ns = max(last_ns, far["last_ns"])
        lat = lat + far["lat"]
        errors += far["errors"]
    span_s = max(window, (last_ns - t0_ns) / 1e9) if last_ns else window
    # Per generator process: the busiest one is the one that may set the limit.
    spent = [lg1 - lg0] + [b - a for a, b in zip(rcpu0, rcpu1, strict=True)]
    lg_pct = [100 * v / window if window > 0 else 0.0 for v in spent]
    return {
        "offered_msgs_per_s": round(rate, 2),
        "offered_deliveries_per_s": round(rate * fanout, 1),
        "duration_s": round(window, 3),
        "sent": sent,
        "achieved_send_per_s": round(sent / window, 1) if window > 0 else None,
        "acked": st.acks,
        "errors": errors,
        "expected": expected,
        "received": count,
        "delivery_ratio": round(count / expected, 5) if expected else None,
        "delivered_per_s": round(count / span_s, 1) if span_s > 0 else 0.0,
        "latency": latency_summary(lat),
        "ack_latency": latency_summary(st.ack_lat),
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / window, 1) if window > 0 else None,
        "loadgen_cpu_pct": round(max(lg_pct), 1) if window > 0 else None,
        "loadgen_cpu_pct_all": [round(v, 1) for v in lg_pct],
        "host_steal_pct": steal_pct(host0, host1),
        "probe_ms": unit_ms(bench.probe_path, t0_ns, t_send_ns),
        "drain_s": round(time.monotonic() - t_send, 3),
    }


def fmt_step(label: str, name: str, r: dict[str, Any], ok: bool | None = None) -> str:
    p99 = r["latency"]["p99_ms"]
    p99_text = f"{p99:7.1f}" if p99 is not None else "      -"
    verdict = "" if ok is None else ("  ok" if ok else "  FAIL")
    return (
        f"  [{label}] {name:<10} offered {r['offered_msgs_per_s']:>8.1f} msg/s "
        f"({r['offered_deliveries_per_s']:>9,.0f} deliv/s) -> {r['delivered_per_s']:>9,.0f}/s "
        f"ratio {r['delivery_ratio'] or 0:.3f} p99 {p99_text} ms "
        f"err {r['errors']} | cpu server {r['server_cpu_pct']}% loadgen {r['loadgen_cpu_pct']}% "
        f"steal {r['host_steal_pct']}% probe {fmt_ms(r.get('probe_ms'))}{verdict}"
    )


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}ms"


async def user_count(client: Client, room: str, timeout: float) -> int | None:
    try:
        reply = await client.request({"action": "user_list", "room": room}, timeout)
    except (TimeoutError, ConnectionError):
        return None
    users = reply.get("users")
    return len(users) if isinstance(users, list) else None


class Ladder:
    """The fan-out's offered rates: doubling from the start until a rate fails (or the
    ceiling passes), then bisected geometrically between the highest that passed and the
    lowest that failed, until they are within `resolution` of each other.

    A rate fails only if a second step at it fails too. A single step of a few seconds can
    fail on one disturbance (measured: one process passing 4,903 msg/s at p99 82 ms, then
    failing 5,120 at 231 ms with a third of a core in use, where 8-second steps at 5,000
    had stayed at 67-117 ms all day), and the ladder never climbs back past a failed rate.
    Both steps are reported; losses in either count against the run.
    """

    def __init__(self, p: dict[str, Any]) -> None:
        self.rate = float(p["start_rate"])
        self.factor = p["factor"]
        self.max_rate = p["max_rate"]
        self.min_rate = p["min_rate"]
        self.resolution = p["resolution"]
        self.confirm = p.get("confirm_failures", True)
        self.passed: float | None = None
        self.failed: float | None = None
        self.retrying = False

    def record(self, ok: bool) -> bool:
        """Note how the step at `rate` went; False once the ladder is done."""
        rate = self.rate
        if not ok and self.confirm and not self.retrying:
            self.retrying = True
            return True
        self.retrying = False
        if ok:
            self.passed = rate if self.passed is None else max(self.passed, rate)
        else:
            self.failed = rate if self.failed is None else min(self.failed, rate)
        if self.failed is None:
            if rate >= self.max_rate:
                return False
            # The last step is the ceiling itself, so a run that never fails has tried it.
            self.rate = min(rate * self.factor, self.max_rate)
        elif self.passed is None:
            self.rate = rate / self.factor
            if self.rate < self.min_rate:
                return False
        else:
            if self.failed / self.passed <= 1 + self.resolution:
                return False
            self.rate = math.sqrt(self.passed * self.failed)
        return True


class FanoutLadder:
    """One configuration's fan-out: 200 clients in one room, climbing the offered rate one step
    at a time (`Ladder`). `scenario_fanout` climbs one alone; `run_lockstep` climbs several,
    one step of each in turn, so that the machine's slow and fast spells fall on all of them.

    A ladder's budget counts only the time of its own steps: side by side, every ladder's
    steps are spread over the time of all of them.
    """

    def __init__(self, bench: Bench, label: str, p: dict[str, Any]) -> None:
        self.bench = bench
        self.label = label
        self.p = p
        self.room = f"fan{bench.nonce}"
        self.result: dict[str, Any] = {"params": p, "room": self.room, "steps": []}
        self.clients: list[Client] = []
        self.receivers: Receivers | None = None
        self.ladder = Ladder(p)
        self.best: dict[str, Any] | None = None
        self.spent = 0.0
        self.steps_left = p["max_steps"]

    async def open(self) -> None:
        """Fill the room, let it settle, warm up."""
        bench, p = self.bench, self.p
        n, timeout, room = p["clients"], p["timeout_s"], self.room
        spread = p.get("receiver_processes", 0)
        if spread:
            from receivers import Receivers, merge_connect_stats

            bench.receivers = self.receivers = Receivers(bench, spread)
            # This process keeps the senders; the rest of the room reads elsewhere.
            await self.receivers.start()
            self.clients, here = await open_many(
                bench, p["senders"], lambda i: room, 50, timeout, 60
            )
            there = await self.receivers.open(n - p["senders"], room, 50, timeout, 60)
            conn = merge_connect_stats([here, there])
        else:
            self.clients, conn = await open_many(bench, n, lambda i: room, 50, timeout, 60)
        self.result["connect"] = conn
        if conn["failed"]:
            raise RuntimeError(f"{conn['failed']} of {n} clients failed to connect")
        await settle(bench, 0.5, 10)  # let the joined/left flurry of the setup finish
        self.result["user_list_count"] = await user_count(self.clients[0], room, timeout)
        self.result["reconnects"] = 0
        if p["warmup_s"]:
            r = await run_step(
                bench, self.senders, p["start_rate"], p["warmup_s"], n - 1, p["drain_s"]
            )
            r["warmup"] = True
            self.result["warmup"] = r
            log(fmt_step(self.label, "warm-up", r))
            await settle(bench, 0.3, p["drain_s"])

    @property
    def senders(self) -> list[Client]:
        return self.clients[: self.p["senders"]]

    async def step(self) -> bool:
        """Climb one step; False once the ladder is done (or out of budget, or its server
        is gone)."""
        bench, p = self.bench, self.p
        if self.steps_left <= 0 or self.spent > p["budget_s"] or not bench.servers.alive():
            return False
        self.steps_left -= 1
        t0 = time.monotonic()
        try:
            return await self._step()
        finally:
            self.spent += time.monotonic() - t0

    async def _step(self) -> bool:
        bench, p, room = self.bench, self.p, self.room
        # A server may drop clients it considers too slow; put them back in the room.
        lost, reopened = await reopen_closed(bench, self.clients, room, p["timeout_s"])
        if self.receivers is not None:
            lost_there, reopened_there = await self.receivers.restore()
            lost, reopened = lost + lost_there, reopened + reopened_there
        if lost:
            self.result["reconnects"] += reopened
            log(
                f"  [{self.label}] fanout     {lost} clients were disconnected, "
                f"{reopened} reconnected"
            )
            if reopened < lost:
                raise RuntimeError("could not restore the room after disconnects")
            await settle(bench, 0.3, 5)
        ladder = self.ladder
        rate = ladder.rate
        r = await run_step(bench, self.senders, rate, p["step_s"], p["clients"] - 1, p["drain_s"])
        r["clients_lost"] = sum(1 for c in self.clients if c.closed.done()) + (
            await self.receivers.lost() if self.receivers is not None else 0
        )
        p99 = r["latency"]["p99_ms"]
        ok = (r["delivery_ratio"] or 0) >= p["min_ratio"] and (
            p99 is not None and p99 <= p["p99_limit_ms"]
        )
        r["ok"] = ok
        r["retry"] = ladder.retrying
        self.result["steps"].append(r)
        log(fmt_step(self.label, "retry" if ladder.retrying else "fanout", r, ok))
        if ok and (self.best is None or r["delivered_per_s"] > self.best["delivered_per_s"]):
            self.best = r
        if not ok:
            await settle(bench, 0.3, p["drain_s"])  # let a backlog clear first
        return ladder.record(ok)

    async def close(self) -> dict[str, Any]:
        """Leave the room; the result."""
        self.result["max_sustained"] = max_sustained(self.best)
        self.result["saturated"] = self.ladder.failed is not None
        await close_all(self.clients)
        if self.receivers is not None:
            bench = self.bench
            bench.receivers = None
            far = await self.receivers.stop()
            bench.error_samples.update(far["error_samples"])
            bench.other_frames.update(far["other_frames"])
            bench.bad_frames += far["bad_frames"]
        return self.result


async def scenario_fanout(bench: Bench, label: str, p: dict[str, Any]) -> dict[str, Any]:
    climb = FanoutLadder(bench, label, p)
    try:
        await climb.open()
        while await climb.step():
            pass
    finally:
        result = await climb.close()
    return result


def max_sustained(best: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fan-out's figure: the passing step that delivered the most, None if none passed."""
    if best is None:
        return None
    return {
        "deliveries_per_s": best["delivered_per_s"],
        "offered_msgs_per_s": best["offered_msgs_per_s"],
        "offered_deliveries_per_s": best["offered_deliveries_per_s"],
        "latency": best["latency"],
        "server_cpu_pct": best["server_cpu_pct"],
        "loadgen_cpu_pct": best["loadgen_cpu_pct"],
        "host_steal_pct": best.get("host_steal_pct"),
        "probe_ms": best.get("probe_ms"),
    }


async def scenario_many_rooms(bench: Bench, label: str, p: dict[str, Any]) -> dict[str, Any]:
    rooms, per_room, spr = p["rooms"], p["per_room"], p["senders_per_room"]
    names = [f"mr{bench.nonce}{i}" for i in range(rooms)]
    clients, conn = await open_many(
        bench, rooms * per_room, lambda i: names[i // per_room], 50, p["timeout_s"], 60
    )
    result: dict[str, Any] = {"params": p, "connect": conn}
    try:
        if conn["failed"]:
            raise RuntimeError(f"{conn['failed']} clients failed to connect")
        await settle(bench, 0.5, 10)
        # open_many keeps order, so client k sits in room k // per_room.
        senders = [clients[r * per_room + s] for r in range(rooms) for s in range(spr)]
        rate = p["rate_per_sender"] * len(senders)
        r = await run_step(bench, senders, rate, p["duration_s"], per_room - 1, p["drain_s"])
        log(fmt_step(label, "many-rooms", r))
        result.update(r)
    finally:
        await close_all(clients)
    return result


async def scenario_idle(bench: Bench, label: str, p: dict[str, Any]) -> dict[str, Any]:
    n, size = p["connections"], p["room_size"]
    # Each client leaves Default for a small room at once: otherwise every connect
    # broadcasts `joined` to all earlier clients and the test becomes O(n^2) fan-out.
    rss0 = bench.servers.rss()
    cpu0, host0 = bench.servers.cpu_seconds(), host_clock()
    clients, conn = await open_many(
        bench,
        n,
        lambda i: f"id{bench.nonce}{i // size}",
        p["concurrency"],
        p["timeout_s"],
        p["deadline_s"],
    )
    cpu1, host1 = bench.servers.cpu_seconds(), host_clock()
    try:
        await asyncio.sleep(p["hold_s"])
        rss1 = bench.servers.rss()
        alive = sum(1 for c in clients if not c.closed.done())
    finally:
        await close_all(clients, timeout=10)
    await asyncio.sleep(0.5)
    rss2 = bench.servers.rss()
    connected = conn["connected"]
    result = {
        "params": p,
        "connect": conn,
        "connects_per_s": conn["connects_per_s"],
        "still_open_after_hold": alive,
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "rss_after_close_bytes": rss2,
        "kb_per_connection": round((rss1 - rss0) / connected / 1024, 2) if connected else None,
        "server_cpu_s_connecting": round(cpu1 - cpu0, 3),
        "host_steal_pct": steal_pct(host0, host1),
    }
    log(
        f"  [{label}] idle       {connected}/{n} connections, "
        f"{conn['connects_per_s']} connects/s, {result['kb_per_connection']} KB/conn"
    )
    return result


SCENARIOS = {
    "fanout": scenario_fanout,
    "many_rooms": scenario_many_rooms,
    "idle": scenario_idle,
}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    bench = Bench(spec["ports"], spec["server_pids"])
    bench.probe_path = spec.get("probe_path")
    label = spec["label"]
    out: dict[str, Any] = {"label": label, "nonce": bench.nonce, "scenarios": {}}
    out["server_rss_start_bytes"] = bench.servers.rss()
    t0 = time.monotonic()
    lg0 = time.process_time()
    for name, params in spec["scenarios"].items():
        if not bench.servers.alive():
            out["scenarios"][name] = {"error": "server process is gone"}
            continue
        try:
            out["scenarios"][name] = await SCENARIOS[name](bench, label, params)
        except Exception as exc:
            out["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  [{label}] {name}: ERROR {type(exc).__name__}: {exc}")
        await settle(bench, 0.2, 3.0)
    elapsed = time.monotonic() - t0
    out["loadgen"] = {
        "pid": os.getpid(),
        "seconds": round(elapsed, 2),
        "cpu_s": round(time.process_time() - lg0, 2),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "event_loop": type(asyncio.get_running_loop()).__module__,
    }
    out["setup_errors"] = bench.setup_errors
    out["error_samples"] = dict(bench.error_samples.most_common(5))
    out["other_frames"] = dict(bench.other_frames)
    out["bad_frames"] = bench.bad_frames
    out["server_alive_at_end"] = bench.servers.alive()
    return out


async def run_lockstep(spec: dict[str, Any]) -> dict[str, Any]:
    """The fan-out of several configurations, side by side: every one's room is filled, then
    their ladders climb together, one step of each in turn, until all are done. Each
    configuration's result is shaped as `run`'s, with the fan-out alone."""
    probe_path = spec.get("probe_path")
    climbs: dict[str, FanoutLadder] = {}
    out: dict[str, Any] = {}
    for target in spec["lockstep"]:
        label = target["label"]
        bench = Bench(target["ports"], target["server_pids"])
        bench.probe_path = probe_path
        out[label] = {"label": label, "nonce": bench.nonce, "scenarios": {}}
        climb = FanoutLadder(bench, label, target["fanout"])
        try:
            await climb.open()
        except Exception as exc:
            await failed(out[label], climb, exc)
            continue
        climbs[label] = climb
    while climbs:
        for label, climb in list(climbs.items()):
            try:
                going = await climb.step()
            except Exception as exc:
                del climbs[label]
                await failed(out[label], climb, exc)
                continue
            if not going:
                del climbs[label]
                out[label]["scenarios"]["fanout"] = await climb.close()
    for target in spec["lockstep"]:
        out[target["label"]]["server_alive_at_end"] = Servers(target["server_pids"]).alive()
    return out


async def failed(out: dict[str, Any], climb: FanoutLadder, exc: Exception) -> None:
    """A ladder that broke off: what it measured, and why it stopped."""
    log(f"  [{climb.label}] fanout: ERROR {type(exc).__name__}: {exc}")
    with contextlib.suppress(Exception):
        await climb.close()
    out["scenarios"]["fanout"] = {**climb.result, "error": f"{type(exc).__name__}: {exc}"}


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # optional: noticeably cheaper per read on the receiving side

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(main)


def main() -> None:
    raise_nofile()
    spec = json.load(sys.stdin)
    json.dump(run_event_loop(run_lockstep(spec) if "lockstep" in spec else run(spec)), sys.stdout)


if __name__ == "__main__":
    main()
