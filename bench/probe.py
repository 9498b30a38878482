"""How fast this machine runs the same work, sampled all through a run.

On a virtual machine the CPU a process gets is not always equally fast, and the
hypervisor's "steal" does not show it: on the 2-core machine the figures in the
README come from, a fixed piece of Python work took about 10 ms in some spells and
about 17 ms in others, with nothing else running and no steal, in spells from a few
seconds to many minutes. A fan-out step run in a slow spell can fail where the same
step passes in a fast one, so each step records how long the probe's work took
meanwhile.

The probe runs in a process of its own, started once per run:

    python bench/probe.py PATH    # appends "<monotonic ns> <work ns>" lines to PATH

It does one fixed unit of work (about 1.5-2.5 ms of CPU) every quarter of a second,
under 1% of one core, and measures it in its own thread's CPU time, so time spent
waiting for a busy CPU does not count, only how fast the CPU ran it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

UNIT_ITERATIONS = 30_000
INTERVAL_S = 0.25
SCRIPT = str(Path(__file__).resolve())


def unit() -> int:
    """The fixed work: the interpreter's plain arithmetic loop, like most of the chat's."""
    total = 0
    for i in range(UNIT_ITERATIONS):
        total += i * i % 7
    return total


def measure() -> int:
    """CPU nanoseconds one unit of work took."""
    start = time.thread_time_ns()
    unit()
    return time.thread_time_ns() - start


def run(path: Path, interval_s: float, units: int | None) -> None:
    parent = os.getppid()
    done = 0
    with path.open("a") as out:
        while units is None or done < units:
            # Stop with the run that started it, however that ended.
            if os.getppid() != parent:
                return
            ns = measure()
            out.write(f"{time.monotonic_ns()} {ns}\n")
            out.flush()
            done += 1
            if units is None or done < units:
                time.sleep(interval_s)


def unit_ms(path: str | Path | None, start_ns: int, end_ns: int) -> float | None:
    """The median time, in ms, one unit of the probe's work took between two instants of
    the monotonic clock (shared by every process of the machine); None without samples."""
    if not path:
        return None
    samples = []
    try:
        with open(path) as lines:
            for line in lines:
                fields = line.split()
                if len(fields) == 2 and start_ns <= int(fields[0]) <= end_ns:
                    samples.append(int(fields[1]))
    except (OSError, ValueError):
        return None
    return round(statistics.median(samples) / 1e6, 3) if samples else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--interval", type=float, default=INTERVAL_S)
    parser.add_argument("--units", type=int, help="stop after this many (default: never)")
    args = parser.parse_args()
    try:
        run(args.path, args.interval, args.units)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
