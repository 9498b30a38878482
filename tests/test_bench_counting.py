"""The receivers' quick count of broadcasts agrees with the frame-by-frame path, frame for frame.

A receiver process counts whole runs of broadcast frames with bytes.count rather than parsing
each one (bench/loadgen.py, `Client._count_broadcasts`). Fed the same bytes, split the same
ways, it must count, sample and answer exactly as the frame-by-frame path does.
"""

import asyncio
import json
import struct
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import loadgen  # noqa: E402  (bench/ is a folder of scripts, importable once on the path)
import wsclient  # noqa: E402

NOW_NS = 10**18
NONCE = "c0ffee"


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def frame(payload: bytes, first: int = 0x81) -> bytes:
    if len(payload) < 126:
        return struct.pack("!BB", first, len(payload)) + payload
    return struct.pack("!BBH", first, 126, len(payload)) + payload


def broadcast(step: int, cid: int, seq: int, sent_ns: int, pad: str = loadgen.PAD) -> bytes:
    text = f"~b{NONCE}~{step}~{cid}~{seq}~{sent_ns}~{pad}"
    body = {"action": "chat_message", "room": "fan", "user": f"User{cid}", "message": text}
    return frame(json.dumps(body).encode())


def stream() -> bytes:
    parts = [broadcast(1, 3 + i % 4, i, NOW_NS - 1000 * (i + 1)) for i in range(30)]
    # A short one (one length byte) among the long ones (two length bytes).
    parts.insert(5, broadcast(1, 2, 99, NOW_NS - 7, pad=""))
    parts.insert(9, frame(b"ping!", first=0x89))
    parts.insert(14, broadcast(0, 4, 1, NOW_NS - 5_000_000))  # late, from the step before
    parts.insert(20, frame(json.dumps({"action": "joined", "user": "x"}).encode()))
    parts.insert(25, frame(b'{"action": "chat_message", "success": false, "message": "no"}'))
    # A broadcast whose text holds a second marker: one delivery, not two.
    two = json.dumps(
        {"action": "chat_message", "message": f"~b{NONCE}~1~5~1~{NOW_NS}~ ~b{NONCE}~1"}
    )
    parts.insert(28, frame(two.encode()))
    return b"".join(parts + [broadcast(1, 6, i, NOW_NS - 3 * i) for i in range(40)])


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Client(loadgen.Client):
    parsed = 0

    def on_text(self, payload: bytes, now_ns: int) -> None:
        self.parsed += 1
        super().on_text(payload, now_ns)


def feed(readers: bool, pieces: list[bytes], steps: int = 2) -> tuple[dict[str, object], int]:
    """What a client fed `pieces` counted, and how many frames it parsed one by one."""

    async def scenario() -> tuple[dict[str, object], int]:
        bench = loadgen.Bench([1], [], nonce=NONCE, readers=readers)
        for _ in range(steps):
            _, step = bench.new_step()
        client = Client("127.0.0.1", 1, "/chat", bench, 1)
        client._handshaking = False
        transport = Transport()
        client.transport = transport  # type: ignore[assignment]
        for piece in pieces:
            client.data_received(piece)
        counted = {
            "received": [st.received for st in bench.steps],
            "lat": [st.lat for st in bench.steps],
            "last_ns": step.last_ns,
            "errors": step.errors,
            "other_frames": dict(bench.other_frames),
            "bad_frames": bench.bad_frames,
            "answered": [(w[0], len(w)) for w in transport.written],
            "left_over": client._buf,
        }
        return counted, client.parsed

    return asyncio.run(scenario())


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen.time, "monotonic_ns", lambda: NOW_NS)
    monkeypatch.setattr(wsclient, "monotonic_ns", lambda: NOW_NS)


@pytest.mark.parametrize("size", [1, 7, 37, 128, 1000, 1 << 20])
def test_the_quick_count_agrees_with_the_frame_by_frame_path(size: int) -> None:
    pieces = chunks(stream(), size)
    (quick, parsed_quick), (exact, parsed_exact) = feed(True, pieces), feed(False, pieces)
    assert quick == exact
    if size >= 128:  # reads that hold whole frames
        assert parsed_quick < parsed_exact
    # And what they agree on is right: 30 + 1 + 1 + 40 of step 1, one late one of step 0.
    assert exact["received"] == [1, 72]
    assert exact["answered"] == [(0x8A, 11)]  # the ping's pong, masked
    assert exact["errors"] == 1
    assert len(exact["lat"][1]) == 9  # the 1st, 9th, ... 65th of 72


def test_the_quick_count_samples_the_same_deliveries_across_reads() -> None:
    data = b"".join(broadcast(1, 2, i, NOW_NS - i) for i in range(100))
    pieces = chunks(data, 3 * len(broadcast(1, 2, 0, NOW_NS)) + 5)
    (quick, parsed_quick), (exact, _) = feed(True, pieces), feed(False, pieces)
    assert quick == exact
    assert parsed_quick == 0
    assert quick["lat"][1] == [i for i in range(100) if i % 8 == 0]


def test_a_frame_without_a_marker_and_one_with_two_are_not_taken_for_two_broadcasts() -> None:
    joined = frame(json.dumps({"action": "joined", "user": "x"}).encode())
    two = json.dumps(
        {"action": "chat_message", "message": f"~b{NONCE}~1~5~1~{NOW_NS}~~b{NONCE}~1~"}
    )
    pieces = [joined + frame(two.encode()) + broadcast(1, 3, 1, NOW_NS - 5)]
    (quick, _), (exact, _) = feed(True, pieces), feed(False, pieces)
    assert quick == exact
    assert exact["received"] == [0, 2]
    assert exact["other_frames"] == {"joined": 1}


def test_long_frames_and_two_digit_steps_are_counted_alike() -> None:
    # Step 11 follows step 1's marker with a digit; frames of 300+ bytes have a length's high
    # byte set.
    data = b"".join(
        broadcast(step, 2, i, NOW_NS - i, pad="x" * (200 + 37 * i))
        for i, step in enumerate([11, 11, 1, 11, 11, 11])
    )
    for size in (5, 333, len(data)):
        pieces = chunks(data, size)
        (quick, _), (exact, _) = feed(True, pieces, steps=12), feed(False, pieces, steps=12)
        assert quick == exact
        assert exact["received"][1] == 1 and exact["received"][11] == 5


class SilentSender:
    """A sender whose posts the server answers only when the test says so."""

    def send_chat(self, step: int) -> None:
        pass


async def test_a_step_waits_out_a_stall_while_its_posts_are_unanswered():
    bench = loadgen.Bench([], [])

    async def answer_after_a_stall() -> None:
        # Longer than the lull after which a step whose posts are all answered is over.
        await asyncio.sleep(0.8)
        step = bench.steps[-1]
        step.acks += 2
        step.received += 2

    answering = asyncio.create_task(answer_after_a_stall())
    result = await loadgen.run_step(
        bench, [SilentSender()], rate=20, duration=0.1, fanout=1, drain_cap=5
    )
    await answering

    assert (result["sent"], result["acked"], result["received"]) == (2, 2, 2)
    assert result["delivery_ratio"] == 1.0
