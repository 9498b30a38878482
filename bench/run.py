"""Benchmark runner: starts each configuration fresh, drives it with the load generator
(a separate process) and writes a table, a JSON file and a latency chart.

    python bench/run.py            # full run, three rounds of the fan-out (bounded, < 20 min)
    python bench/run.py --quick    # < 2 min: yardstick, daphne-1, uvicorn-1
    python bench/run.py --smoke    # a few seconds, tiny loads (CI)
    python bench/run.py --configs yardstick uvicorn-1 --out bench/results

Run it with the project's virtualenv python, from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from probe import SCRIPT as PROBE_SCRIPT
from servers import BENCH_DIR, CONFIGS, REPO_ROOT, Deployment, StartError, raise_nofile

FANOUT_BASE = {
    # The room's readers, apart from its senders, are spread over this many processes.
    "receiver_processes": 2,
    "min_ratio": 0.99,
    "p99_limit_ms": 200,
    "min_rate": 1,
    "timeout_s": 10,
}
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "configs": list(CONFIGS),
        "deadline_s": 20 * 60,
        # Fan-out ladders per configuration, the configurations taking turns (see below).
        "rounds": 3,
        # A later round's ladder has less to find: it starts at half the earlier figure.
        "later_budget_s": 75,
        "fanout": {
            "clients": 200,
            "senders": 5,
            "start_rate": 20,
            "factor": 2,
            "max_rate": 16000,
            # Each figure lies within this fraction below the rate it stands for, so a ratio
            # of two figures is uncertain by up to twice as much: at 0.1 a ratio near its
            # target turned on where the ladder's steps fell.
            "resolution": 0.05,
            # Room for a confirming step after each failure (`Ladder` in loadgen.py).
            "max_steps": 22,
            "step_s": 3,
            "warmup_s": 2,
            "drain_s": 5,
            "budget_s": 120,
        },
        "many_rooms": {"duration_s": 10},
        "idle": {"connections": 2000, "hold_s": 2},
    },
    "quick": {
        "configs": ["yardstick", "daphne-1", "uvicorn-1"],
        "deadline_s": 115,
        "fanout": {
            "clients": 200,
            "senders": 5,
            # Higher than the full run's start: the low steps say little, and the budget is
            # better spent between the last pass and the first failure.
            "start_rate": 80,
            "factor": 2,
            "max_rate": 16000,
            "resolution": 0.3,
            # No confirming step: the budget goes to the ladder, and the quick run is a check.
            "confirm_failures": False,
            "max_steps": 12,
            "step_s": 1.5,
            "warmup_s": 1,
            "drain_s": 3,
            "budget_s": 26,
        },
        "many_rooms": {"duration_s": 2},
        "idle": {"connections": 1000, "hold_s": 1},
    },
    "smoke": {
        "configs": ["yardstick", "daphne-1"],
        "deadline_s": 60,
        "fanout": {
            "clients": 20,
            "senders": 2,
            "start_rate": 10,
            "factor": 2,
            "max_rate": 20,
            "resolution": 0.5,
            "confirm_failures": False,
            "max_steps": 2,
            "step_s": 0.5,
            "warmup_s": 0,
            "drain_s": 2,
            "budget_s": 5,
        },
        # Two, so that the smoke run goes through the rounds too.
        "rounds": 2,
        "later_budget_s": 5,
        "many_rooms": {
            "rooms": 3,
            "per_room": 4,
            "rate_per_sender": 5,
            "duration_s": 1,
        },
        "idle": {"connections": 50, "hold_s": 0.3},
    },
}
MANY_ROOMS_BASE = {
    "rooms": 20,
    "per_room": 10,
    "senders_per_room": 2,
    "rate_per_sender": 10,
    "drain_s": 3,
    "timeout_s": 10,
}
LG_BUSY_PCT = 85
# Above this share of the machine's CPU taken by its host (steal), a configuration's figures
# describe the host's load as much as the server.
STEAL_WARN_PCT = 10
# Below this share of its fastest speed in the run, a configuration's best step ran on a machine
# too slow to compare it with one measured at full speed (bench/probe.py).
SLOW_SPEED = 0.8
IDLE_BASE = {"room_size": 10, "concurrency": 64, "timeout_s": 10, "deadline_s": 60}


def log(line: str) -> None:
    print(line, flush=True)


# Why the fan-out runs side by side, in rounds:
# On a 2-core machine the servers, the load generator's processes, PostgreSQL and Redis share the
# CPU, and at the top of the ladder the machine is full. There a step's verdict turns on more than
# the offered rate: measured on the yardstick at a fixed 8,000 msg/s, 3-second steps, one run of
# ten steps failed every one (p99 0.3-2.2 s), the next failed the first five and passed four of
# the last five (p99 26-62 ms). Such a spell lasts tens of seconds to minutes. Ladders climbed one
# after the other fell in different spells, and a ratio of two of their figures was the machine's
# as much as the servers'. So every configuration's ladder climbs at once, one step of each in
# turn (bench_side_by_side), three times on fresh servers; a figure is the best round's, and a
# ratio target is the median of the rounds' ratios. Every round's steps count for the no-loss
# target.


def scenario_params(mode: str) -> dict[str, dict[str, Any]]:
    m = MODES[mode]
    return {
        "fanout": {**FANOUT_BASE, **m["fanout"]},
        "many_rooms": {**MANY_ROOMS_BASE, **m["many_rooms"]},
        "idle": {**IDLE_BASE, **m["idle"]},
    }


def loadgen_timeout(params: dict[str, dict[str, Any]]) -> float:
    f, r, i = params.get("fanout"), params.get("many_rooms"), params.get("idle")
    return (
        (f["budget_s"] + 2 * f["step_s"] + 2 * f["drain_s"] if f else 0)
        + (r["duration_s"] if r else 0)
        + (i["deadline_s"] if i else 0)
        + 90
    )


def run_loadgen(
    dep: Deployment, params: dict[str, Any], probe_path: Path | None = None
) -> dict[str, Any]:
    spec = {
        "label": dep.config.name,
        "ports": dep.ports,
        "server_pids": dep.pids,
        "scenarios": params,
        "probe_path": str(probe_path) if probe_path else None,
    }
    return loadgen(spec, loadgen_timeout(params))


def loadgen(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the load generator on a spec (loadgen.py); what it returns, or an error."""
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH_DIR / "loadgen.py")],
            input=json.dumps(spec).encode(),
            stdout=subprocess.PIPE,
            stderr=None,  # progress lines go straight to the terminal
            timeout=timeout,
            cwd=REPO_ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": "load generator timed out"}
    if done.returncode != 0:
        return {"error": f"load generator exited with {done.returncode}"}
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return {"error": "load generator printed no result"}
    return result


def bench_config(
    name: str, params: dict[str, Any], args: argparse.Namespace, label: str | None = None
) -> dict[str, Any]:
    dep = Deployment(CONFIGS[name], args.pg_url, args.redis_url)
    out: dict[str, Any] = {"config": name, "processes": dep.config.processes}
    t0 = time.monotonic()
    shown = label or name  # what the progress lines call it
    try:
        log(f"== {shown}: starting {dep.config.processes} process(es)")
        dep.start()
        out["ports"] = dep.ports
        out["startup_s"] = dep.startup_s
        log(f"== {shown}: ready on port(s) {dep.ports} after {dep.startup_s}s")
        result = run_loadgen(dep, params, args.probe_path)
        out.update(result)
        dead = dep.dead()
        if dead:
            out["error"] = "server died: " + "; ".join(dead)
            out["server_log_tail"] = dep.log_tails()
        elif "error" in result:
            out["server_log_tail"] = dep.log_tails()
    except StartError as exc:
        out["error"] = f"failed to start: {exc}"
        log(f"== {shown}: {out['error']}")
    finally:
        dep.stop()
        dep.cleanup()
    out["notes"] = dep.notes
    out["status"] = "error" if "error" in out else "ok"
    out["wall_s"] = round(time.monotonic() - t0, 1)
    log(f"== {shown}: {out['status']} in {out['wall_s']}s")
    return out


def bench_side_by_side(
    fanouts: dict[str, dict[str, Any]], args: argparse.Namespace, number: int
) -> dict[str, dict[str, Any]]:
    """One round of the fan-out for several configurations at once: each started fresh, all
    of them running together, one load generator climbing their ladders in turns
    (loadgen.py, `run_lockstep`); each configuration's outcome, shaped as `bench_config`'s."""
    deps = {name: Deployment(CONFIGS[name], args.pg_url, args.redis_url) for name in fanouts}
    outs: dict[str, dict[str, Any]] = {
        name: {"config": name, "processes": dep.config.processes} for name, dep in deps.items()
    }
    t0 = time.monotonic()
    names = ", ".join(fanouts)
    try:
        for name, dep in deps.items():
            log(f"== {name} round {number}: starting {dep.config.processes} process(es)")
            try:
                dep.start()
            except StartError as exc:
                outs[name]["error"] = f"failed to start: {exc}"
                log(f"== {name} round {number}: {outs[name]['error']}")
                continue
            outs[name].update(ports=dep.ports, startup_s=dep.startup_s)
        running = [name for name in fanouts if "error" not in outs[name]]
        log(f"== round {number}: the fan-out of {', '.join(running)}, side by side")
        spec = {
            "lockstep": [
                {
                    "label": name,
                    "ports": deps[name].ports,
                    "server_pids": deps[name].pids,
                    "fanout": fanouts[name],
                }
                for name in running
            ],
            "probe_path": str(args.probe_path) if args.probe_path else None,
        }
        timeout = sum(loadgen_timeout({"fanout": fanouts[name]}) for name in running)
        result = loadgen(spec, timeout) if running else {}
        for name in running:
            out, dep = outs[name], deps[name]
            out.update(result.get(name) or {"error": result.get("error", "no result")})
            dead = dep.dead()
            if dead:
                out["error"] = "server died: " + "; ".join(dead)
            if "error" in out or "error" in (get(out, "scenarios", "fanout") or {}):
                out["server_log_tail"] = dep.log_tails()
    finally:
        for dep in deps.values():
            dep.stop()
            dep.cleanup()
    wall = round(time.monotonic() - t0, 1)
    for name, out in outs.items():
        out["notes"] = deps[name].notes
        out["status"] = "error" if "error" in out else "ok"
        # The round's time, shared: every configuration ran through all of it.
        out["wall_s"] = round(wall / len(outs), 1)
    log(f"== round {number} ({names}): done in {wall}s")
    return outs


def later_round_params(
    params: dict[str, Any], fanout: dict[str, Any], budget_s: float
) -> dict[str, Any]:
    """The fan-out alone, for another round of a configuration: from half the rate it
    sustained so far (the steps below say nothing new), within a smaller budget."""
    p = dict(params["fanout"])
    top = get(fanout, "max_sustained", "offered_msgs_per_s")
    if top:
        p["start_rate"] = max(p["start_rate"], top / p["factor"])
    p["budget_s"] = budget_s
    return {"fanout": p}


def wants_another_round(result: dict[str, Any]) -> bool:
    """Whether a configuration's fan-out ran in the first round, so another can be compared."""
    fanout = get(result, "scenarios", "fanout") or {}
    return result.get("status") == "ok" and "error" not in fanout and bool(fanout.get("steps"))


def add_round(result: dict[str, Any], again: dict[str, Any], number: int) -> None:
    """Fold a later round of a configuration into its result: every round's steps (each
    marked with its round), and the figure of the round that sustained the most.

    A later round that failed does not take the earlier figures away, but it is reported
    like any other problem and makes the configuration's status an error.
    """
    fanout = result["scenarios"]["fanout"]
    if "rounds" not in fanout:
        for s in fanout["steps"]:
            s["round"] = 1
        fanout["rounds"] = [round_summary(fanout, 1)]
        if fanout.get("max_sustained"):
            fanout["max_sustained"]["round"] = 1
    later = get(again, "scenarios", "fanout") or {}
    problem = again.get("error") or later.get("error")
    if problem:
        result.setdefault("round_errors", []).append(f"fanout round {number}: {problem}")
    if again.get("status") != "ok":
        result["status"] = "error"
    steps = [{**s, "round": number} for s in later.get("steps") or []]
    fanout["steps"].extend(steps)
    fanout["rounds"].append(round_summary(later, number))
    result["wall_s"] = round(result.get("wall_s", 0) + again.get("wall_s", 0), 1)
    best = get(later, "max_sustained", "deliveries_per_s")
    if best is not None and best > (get(fanout, "max_sustained", "deliveries_per_s") or 0):
        fanout["max_sustained"] = {**later["max_sustained"], "round": number}
        fanout["saturated"] = later.get("saturated")


def round_summary(fanout: dict[str, Any], number: int) -> dict[str, Any]:
    return {
        "round": number,
        "steps": len(fanout.get("steps") or []),
        "max_deliveries_per_s": get(fanout, "max_sustained", "deliveries_per_s"),
        "at_msgs_per_s": get(fanout, "max_sustained", "offered_msgs_per_s"),
        "saturated": fanout.get("saturated"),
        "error": fanout.get("error"),
    }


def get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def fastest_probe_ms(results: list[dict[str, Any]]) -> float | None:
    """The least time the probe's work took in any fan-out step of the run: the machine at
    its fastest in this run."""
    seen = [
        step.get("probe_ms")
        for r in results
        for step in get(r, "scenarios", "fanout", "steps") or []
        if isinstance(step, dict)
    ]
    return min((v for v in seen if v), default=None)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fastest = fastest_probe_ms(results)
    yard = next((r for r in results if r["config"] == "yardstick"), None)
    yard_max = get(yard, "scenarios", "fanout", "max_sustained", "deliveries_per_s")
    yard_cost = cpu_us_per_delivery(get(yard, "scenarios", "fanout", "max_sustained") or {})
    rows = []
    for r in results:
        best = get(r, "scenarios", "fanout", "max_sustained") or {}
        rooms = get(r, "scenarios", "many_rooms") or {}
        idle = get(r, "scenarios", "idle") or {}
        value = best.get("deliveries_per_s")
        cost = cpu_us_per_delivery(best)
        probe_ms = best.get("probe_ms")
        problems = [
            f"{k}: {v['error']}" for k, v in (r.get("scenarios") or {}).items() if "error" in v
        ] + r.get("round_errors", [])
        if r.get("error"):
            problems.insert(0, r["error"])
        rows.append(
            {
                "config": r["config"],
                "status": r["status"],
                "max_deliveries_per_s": value,
                "vs_yardstick": round(value / yard_max, 3) if value and yard_max else None,
                "at_msgs_per_s": best.get("offered_msgs_per_s"),
                "p99_ms_at_max": get(best, "latency", "p99_ms"),
                "server_cpu_pct_at_max": best.get("server_cpu_pct"),
                "loadgen_cpu_pct_at_max": best.get("loadgen_cpu_pct"),
                "server_cpu_us_per_delivery": cost,
                "cpu_vs_yardstick": round(yard_cost / cost, 3) if cost and yard_cost else None,
                "probe_ms_at_max": probe_ms,
                "speed_at_max": round(fastest / probe_ms, 2) if fastest and probe_ms else None,
                "saturated": get(r, "scenarios", "fanout", "saturated"),
                "round_figures": [
                    x["max_deliveries_per_s"] for x in get(r, "scenarios", "fanout", "rounds") or []
                ],
                "many_rooms_ratio": rooms.get("delivery_ratio"),
                "many_rooms_p99_ms": get(rooms, "latency", "p99_ms"),
                "idle_kb_per_conn": idle.get("kb_per_connection"),
                "idle_connects_per_s": idle.get("connects_per_s"),
                "host_steal_pct_max": max_steal(r),
                "problems": problems,
            }
        )
    return rows


def max_steal(result: dict[str, Any]) -> float | None:
    """The most CPU the host took from the machine in any measured window of a configuration."""
    scenarios = result.get("scenarios") or {}
    fanout = scenarios.get("fanout") or {}
    windows = [*(fanout.get("steps") or []), fanout.get("warmup")]
    windows += [scenarios.get("many_rooms"), scenarios.get("idle")]
    seen = [w.get("host_steal_pct") for w in windows if isinstance(w, dict)]
    return max((v for v in seen if v is not None), default=None)


def cpu_us_per_delivery(step: dict[str, Any]) -> float | None:
    """Server CPU time per delivered message during a fan-out step: what each delivery costs,
    which still compares two servers when the load generator is what limits both."""
    cpu, delivered = step.get("server_cpu_pct"), step.get("deliveries_per_s")
    if not cpu or not delivered:
        return None
    return round(cpu / 100 * 1e6 / delivered, 2)


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def lg_cell(value: float | None) -> str:
    # Above this the generator itself may be what stops the curve (2-core machines).
    return fmt(value, ".0f") + ("!" if value is not None and value >= LG_BUSY_PCT else "")


def print_table(rows: list[dict[str, Any]], clients: int) -> None:
    header = (
        f"{'config':<11} {'status':<6} {'max deliv/s':>11} {'vs yard':>7} {'@msg/s':>7} "
        f"{'p99 ms':>7} {'srv CPU%':>8} {'lg CPU%':>7} {'us/deliv':>8} {'cpu vs yard':>11} "
        f"{'speed':>5} "
        f"| {'rooms ratio':>11} {'rooms p99':>9} "
        f"| {'idle KB/conn':>12} {'conn/s':>7}"
    )
    log("")
    log(header)
    log("-" * len(header))
    for row in rows:
        mark = "" if row["saturated"] is not False else "+"  # "+": never saturated
        log(
            f"{row['config']:<11} {row['status']:<6} "
            f"{fmt(row['max_deliveries_per_s'], ',.0f') + mark:>11} "
            f"{fmt(row['vs_yardstick'], '.2f'):>7} {fmt(row['at_msgs_per_s'], '.0f'):>7} "
            f"{fmt(row['p99_ms_at_max'], '.1f'):>7} {fmt(row['server_cpu_pct_at_max'], '.0f'):>8} "
            f"{lg_cell(row['loadgen_cpu_pct_at_max']):>7} "
            f"{fmt(row['server_cpu_us_per_delivery'], '.2f'):>8} "
            f"{fmt(row['cpu_vs_yardstick'], '.2f'):>11} "
            f"{fmt(row.get('speed_at_max'), '.2f'):>5} | "
            f"{fmt(row['many_rooms_ratio'], '.4f'):>11} "
            f"{fmt(row['many_rooms_p99_ms'], '.1f'):>9} | "
            f"{fmt(row['idle_kb_per_conn'], '.1f'):>12} "
            f"{fmt(row['idle_connects_per_s'], ',.0f'):>7}"
        )
    rounds = [row for row in rows if len(row.get("round_figures") or []) > 1]
    if rounds:
        log("fan-out rounds, max deliv/s of each (the table has the best):")
        for row in rounds:
            log(
                f"  {row['config']:<11} " + " | ".join(fmt(v, ",.0f") for v in row["round_figures"])
            )
    for row in rows:
        for problem in row["problems"]:
            log(f"  ! {row['config']}: {problem.splitlines()[0][:200]}")
        speed = row.get("speed_at_max")
        if speed is not None and speed < SLOW_SPEED:
            log(
                f"  ! {row['config']}: its best step ran with the machine at {speed:.2f} of its "
                "fastest in this run (the probe's fixed work took that much longer): its figure "
                "is the machine's as much as its own"
            )
        steal = row.get("host_steal_pct_max")
        if steal is not None and steal >= STEAL_WARN_PCT:
            log(
                f"  ! {row['config']}: the host took up to {steal:.0f}% of this machine's CPU "
                "(steal) while it was measured: its figures are the host's as much as its own"
            )
    log("")
    log(
        f"max deliv/s: measured deliveries/s of the highest fan-out step (1 room x {clients} "
        "clients) with delivery ratio >= 0.99 and p99 <= 200 ms; '+' = no step failed. CPU% "
        "per core (100 = one core) during that step, server and load generator (lg); "
        f"'!' = lg >= {LG_BUSY_PCT}%, the generator may share the limit. us/deliv: server "
        "CPU microseconds per delivered message in that step; cpu vs yard: the yardstick's "
        "us/deliv divided by this one's (1.00 = as cheap per delivery as the yardstick), the "
        "fairer ratio when the generator limits both. speed: how fast the machine ran a fixed "
        "piece of work during that step (bench/probe.py), against the fastest it ran it in "
        "any fan-out step of this run (1.00)."
    )


# The project's targets (bench/README.md, "Targets"), judged on the figures of one run.
SERVER_CONFIGS = [name for name in CONFIGS if name != "yardstick"]
FANOUT_VS_YARDSTICK: dict[str, tuple[float, float | None]] = {  # config: (required, goal)
    "uvicorn-1": (0.8, 1.0),
    "daphne-1": (0.25, None),
}
TWO_PROCESSES = {"daphne-2": "daphne-1", "uvicorn-2": "uvicorn-1"}
TWO_VS_ONE_MIN = 0.8
ROOMS_P99_MS = 50
IDLE_KB_MAX = 35
IDLE_CONNECTS_MIN = 300
TARGET_STATUSES = ("met", "missed", "not run")


def new_target(number: int, name: str, configs: list[str], required: str) -> dict[str, Any]:
    return {
        "target": number,
        "name": name,
        "configs": configs,
        "required": required,
        "measured": None,
        "status": "not run",
        # False when the verdict rests on a bound that could go either way (see ratio_bound).
        "settled": True,
        "bound": None,
        "note": None,
    }


def first_line(text: str, limit: int = 120) -> str:
    return text.splitlines()[0][:limit] if text else ""


def unavailable(
    name: str, rows: dict[str, dict[str, Any]], configs: dict[str, Any], scenario: str
) -> str | None:
    """Why `name`'s scenario cannot be judged (absent, skipped, errored), or None if it can."""
    row = rows.get(name)
    if row is None:
        return f"{name} not in this run"
    if row["status"] != "ok":
        problem = first_line(row["problems"][0]) if row["problems"] else ""
        return f"{name} {row['status']}" + (f": {problem}" if problem else "")
    data = get(configs.get(name), "scenarios", scenario)
    if not isinstance(data, dict):
        return f"{name} has no {scenario} result"
    if "error" in data:
        return f"{name} {scenario}: {first_line(str(data['error']))}"
    return None


def ratio_bound(value_is_floor: bool, reference_is_floor: bool) -> str | None:
    """What a ratio of two max-sustained figures is, given which of them never saturated.

    A figure that never saturated is only a floor (the load generator's ceiling), so the
    true ratio is >= the measured one when only the numerator is a floor, <= it when only
    the denominator is, and unknown either way when both are."""
    if value_is_floor and reference_is_floor:
        return "unknown"
    if value_is_floor:
        return "lower"
    if reference_is_floor:
        return "upper"
    return None


def bound_settles(bound: str | None, met: bool) -> bool:
    # A lower bound that meets the target, or an upper bound that misses it, settles it.
    return bound is None or (bound == "lower" and met) or (bound == "upper" and not met)


BOUND_PREFIX = {None: "", "lower": ">=", "upper": "<=", "unknown": "~"}


def figure(value: float, saturated: bool | None) -> str:
    return f"{value:,.0f}" + ("+" if saturated is False else "")


def ratio_text(ratio: float, minimum: float) -> str:
    text = f"{ratio:.2f}"
    if ratio < minimum <= float(text):  # never print a miss as the very figure required
        text = f"{ratio:.4f}"
    return text


def bound_note(bound: str | None, config: str, reference: str) -> str | None:
    if bound == "lower":
        return f"{config} never saturated: its ratio is a lower bound"
    if bound == "upper":
        return f"{reference} never saturated: the true ratio may be lower"
    if bound == "unknown":
        return "neither saturated: both figures are the load generator's ceiling"
    return None


def ratio_target(
    number: int,
    name: str,
    config: str,
    reference: str,
    minimum: float,
    goal: float | None,
    rows: dict[str, dict[str, Any]],
    configs: dict[str, Any],
) -> dict[str, Any]:
    """`config`'s max sustained deliveries/s is at least `minimum` times `reference`'s.

    Judged round by round: in each round the two climbed their ladders side by side, so the
    machine's spells fell on both, and the ratio is the median of the rounds' ratios (one
    lucky or unlucky round moves it no more than the others let it).
    """
    required = f">= {minimum:.2f}x {reference}" + (f" (goal {goal:.2f}x)" if goal else "")
    entry = new_target(number, name, [config, reference], required)
    why = unavailable(config, rows, configs, "fanout") or unavailable(
        reference, rows, configs, "fanout"
    )
    if why:
        entry["note"] = why
        return entry
    mine, theirs = round_figures(configs[config]), round_figures(configs[reference])
    passed = {n: f for n, f in theirs.items() if f[0]}
    if not passed:
        entry["note"] = f"{reference}: no fan-out step passed"
        return entry
    common = [n for n in sorted(passed) if n in mine]
    pairs = [(mine[n], passed[n]) for n in common]
    if not any(value for (value, _), _ in pairs):
        entry.update(status="missed", measured="no fan-out step passed")
        return entry
    ratios = [(value or 0) / ref_value for (value, _), (ref_value, _) in pairs]
    ratio = statistics.median(ratios)
    met = ratio >= minimum
    bound = ratio_bound(
        any(saturated is False for (_, saturated), _ in pairs),
        any(saturated is False for _, (_, saturated) in pairs),
    )
    if len(pairs) == 1:
        (value, saturated), (ref_value, ref_saturated) = pairs[0]
        detail = f"{figure(value or 0, saturated)} / {figure(ref_value, ref_saturated)}"
    else:
        detail = "median of rounds " + ", ".join(f"{r:.2f}" for r in ratios)
    entry.update(
        status="met" if met else "missed",
        measured=f"{BOUND_PREFIX[bound]}{ratio_text(ratio, minimum)}x ({detail})",
        bound=bound,
        settled=bound_settles(bound, met),
        note=bound_note(bound, config, reference),
    )
    return entry


def round_figures(result: dict[str, Any]) -> dict[int, tuple[float | None, bool | None]]:
    """A configuration's fan-out figure in each round, with whether that round saturated."""
    fanout = get(result, "scenarios", "fanout") or {}
    rounds = fanout.get("rounds")
    if not rounds:
        return {1: (get(fanout, "max_sustained", "deliveries_per_s"), fanout.get("saturated"))}
    return {r["round"]: (r["max_deliveries_per_s"], r["saturated"]) for r in rounds}


def steps_below_saturation(fanout: dict[str, Any]) -> list[dict[str, Any]]:
    """The ladder steps that passed, and any other at or below the max sustained rate."""
    top = get(fanout, "max_sustained", "offered_msgs_per_s")
    return [
        s
        for s in fanout.get("steps") or []
        if s.get("ok") or (top is not None and s["offered_msgs_per_s"] <= top)
    ]


def delivery_count(steps: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(expected, missing, errors) summed over steps, from the integer counts.

    delivery_ratio is rounded to 5 decimals, so 1.0 there can hide a few lost deliveries
    in a step of millions. Missing is counted per step: a surplus (a duplicate) in one
    step must not cancel a loss in another."""
    expected = sum(s["expected"] for s in steps)
    missing = sum(max(0, s["expected"] - s["received"]) for s in steps)
    errors = sum(s["errors"] for s in steps)
    return expected, missing, errors


def delivered_text(expected: int, missing: int, errors: int) -> str:
    text = f"{expected - missing:,}/{expected:,}"
    if missing:
        text += f" ({missing:,} missing)"
    if errors:
        text += f", {errors:,} error" + ("s" if errors != 1 else "")
    return text


def loss_target(
    config: str, rows: dict[str, dict[str, Any]], configs: dict[str, Any]
) -> dict[str, Any]:
    entry = new_target(5, "no loss below saturation", [config], "ratio 1.000, no error")
    why = unavailable(config, rows, configs, "fanout")
    if why:
        entry["note"] = why
        return entry
    steps = steps_below_saturation(configs[config]["scenarios"]["fanout"])
    if not steps:
        entry["note"] = "no fan-out step passed"
        return entry
    expected, missing, errors = delivery_count(steps)
    entry.update(
        status="met" if missing == 0 and errors == 0 else "missed",
        measured=f"{delivered_text(expected, missing, errors)} in {len(steps)} steps",
    )
    return entry


def many_rooms_target(
    config: str, rows: dict[str, dict[str, Any]], configs: dict[str, Any]
) -> dict[str, Any]:
    entry = new_target(3, "many rooms", [config], f"ratio 1.000, p99 <= {ROOMS_P99_MS} ms")
    why = unavailable(config, rows, configs, "many_rooms")
    if why:
        entry["note"] = why
        return entry
    rooms = configs[config]["scenarios"]["many_rooms"]
    expected, missing, errors = delivery_count([rooms])
    p99 = get(rooms, "latency", "p99_ms")
    short = []
    if missing or errors:
        short.append("delivery")
    if p99 is None or p99 > ROOMS_P99_MS:
        short.append("p99")
    entry.update(
        status="missed" if short else "met",
        measured=f"{delivered_text(expected, missing, errors)}, p99 {fmt(p99, '.1f')} ms",
        note=f"short on {', '.join(short)}" if short else None,
    )
    return entry


def idle_target(
    config: str, rows: dict[str, dict[str, Any]], configs: dict[str, Any]
) -> dict[str, Any]:
    required = f"<= {IDLE_KB_MAX} KB/conn; all connected at >= {IDLE_CONNECTS_MIN}/s"
    entry = new_target(4, "idle", [config], required)
    why = unavailable(config, rows, configs, "idle")
    if why:
        entry["note"] = why
        return entry
    idle = configs[config]["scenarios"]["idle"]
    requested, connected = idle["connect"]["requested"], idle["connect"]["connected"]
    still_open = idle.get("still_open_after_hold", connected)
    kb, rate = idle.get("kb_per_connection"), idle.get("connects_per_s")
    short = []
    if kb is None or kb > IDLE_KB_MAX:
        short.append("KB/conn")
    if connected < requested or still_open < connected:
        short.append("connections")
    if rate is None or rate < IDLE_CONNECTS_MIN:
        short.append("connects/s")
    measured = f"{fmt(kb, '.1f')} KB/conn; {connected:,}/{requested:,} at {fmt(rate, ',.0f')}/s"
    if still_open < connected:
        measured += f" ({still_open:,} still open)"
    entry.update(
        status="missed" if short else "met",
        measured=measured,
        note=f"short on {', '.join(short)}" if short else None,
    )
    return entry


def evaluate_targets(
    rows: list[dict[str, Any]], configs: dict[str, Any], mode: str
) -> list[dict[str, Any]]:
    """The issue's targets, judged on one run: `rows` from summarize(), `configs` the raw
    results by configuration name (results.json's `summary` and `configs`)."""
    by_name = {row["config"]: row for row in rows}
    targets = [
        ratio_target(1, "fan-out, 1 process", c, "yardstick", req, goal, by_name, configs)
        for c, (req, goal) in FANOUT_VS_YARDSTICK.items()
    ]
    targets += [
        ratio_target(2, "fan-out, 2 processes", c, one, TWO_VS_ONE_MIN, None, by_name, configs)
        for c, one in TWO_PROCESSES.items()
    ]
    targets += [many_rooms_target(c, by_name, configs) for c in SERVER_CONFIGS]
    targets += [idle_target(c, by_name, configs) for c in SERVER_CONFIGS]
    # Target 2's "no message lost" is this check on the -2 configurations.
    targets += [loss_target(c, by_name, configs) for c in SERVER_CONFIGS]
    if mode == "smoke":
        for entry in targets:
            if entry["status"] != "not run":
                entry.update(status="not run", settled=True, note="smoke mode: not judged")
    return targets


def target_counts(targets: list[dict[str, Any]]) -> dict[str, int]:
    return {status: sum(t["status"] == status for t in targets) for status in TARGET_STATUSES}


def print_targets(targets: list[dict[str, Any]], mode: str) -> None:
    log("")
    if mode == "smoke":
        log("targets: smoke mode, loads far too small to mean anything; none judged")
    else:
        log(f"targets ({mode} mode), from this run's figures (see bench/README.md):")
    for t in targets:
        status = t["status"] + ("" if t["settled"] else "?")
        line = (
            f"  {status:<8} {t['target']}. {t['configs'][0]:<10} {t['name']:<25} "
            f"{t['required']:<42} {t['measured'] or '-'}"
        )
        log(line + (f"  ({t['note']})" if t["note"] else ""))
    counts = target_counts(targets)
    if mode == "smoke":
        log(f"targets: not judged in smoke mode ({len(targets)} listed)")
        return
    unsettled = sum(not t["settled"] for t in targets)
    log(
        f"targets: {counts['met']} met, {counts['missed']} missed, {counts['not run']} not run"
        + (f" ({unsettled} judged on a bound, marked ?)" if unsettled else "")
    )


def chart_round(
    ax1: Any, ax2: Any, steps: list[dict[str, Any]], config: str, number: int, color: Any
) -> Any:
    """One round of one configuration's fan-out steps, in its colour (the first round's
    line, solid and labelled, sets it; later rounds are dashed)."""
    x = [s["offered_deliveries_per_s"] for s in steps]
    style = "-" if number == 1 else "--"
    label = config if number == 1 else None
    line = ax1.plot(x, [s["latency"]["p99_ms"] for s in steps], style, color=color, label=label)[0]
    color = line.get_color()
    for passed, marker, size in ((True, "o", 22), (False, "x", 40)):
        shown = [s for s in steps if bool(s.get("ok")) is passed]
        ax1.scatter(
            [s["offered_deliveries_per_s"] for s in shown],
            [s["latency"]["p99_ms"] for s in shown],
            color=color,
            marker=marker,
            s=size,
        )
    ax2.plot(
        x, [s["delivered_per_s"] for s in steps], style, marker="o", color=color, ms=3, label=label
    )
    return color


def draw_chart(results: list[dict[str, Any]], path: Path, title: str, fan: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    for r in results:
        every = [
            s
            for s in get(r, "scenarios", "fanout", "steps") or []
            if s["latency"]["p99_ms"] is not None
        ]
        color = None
        for number in sorted({s.get("round", 1) for s in every}):
            steps = sorted(
                (s for s in every if s.get("round", 1) == number),
                key=lambda s: s["offered_deliveries_per_s"],
            )
            color = chart_round(ax1, ax2, steps, r["config"], number, color)
    ax1.axhline(200, color="grey", ls="--", lw=1)
    ax1.text(
        0.01,
        210,
        "200 ms limit",
        color="grey",
        fontsize=8,
        transform=ax1.get_yaxis_transform(),
    )
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel(f"offered deliveries/s (msgs/s x {fan} recipients)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("p99 delivery latency (ms)")
    ax1.set_title("p99 latency vs offered load (x = step failed; dashed = a later round)")
    ax2.set_yscale("log")
    ax2.set_ylabel("delivered/s")
    ax2.set_title("delivered vs offered")
    lim = ax2.get_xlim()
    ax2.plot(lim, lim, color="grey", ls=":", lw=1)
    ax2.set_xlim(lim)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "django",
        "channels",
        "channels-redis",
        "daphne",
        "uvicorn",
        "aiohttp",
        "uvloop",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.decode().strip() or None) if done.returncode == 0 else None


@contextlib.contextmanager
def machine_probe(path: Path) -> Iterator[None]:
    """Run bench/probe.py, writing to `path`, for as long as the block runs."""
    path.write_text("")
    probe = subprocess.Popen([sys.executable, PROBE_SCRIPT, str(path)])
    try:
        yield
    finally:
        probe.terminate()
        probe.wait(10)


def run_rounds(
    args: argparse.Namespace, mode: str, configs: list[str], params: dict[str, Any], t0: float
) -> list[dict[str, Any]]:
    """The fan-out of every configuration side by side (`bench_side_by_side`), then each
    configuration alone for what measures one server by itself (many rooms, idle), then the
    later fan-out rounds side by side again, within the mode's deadline."""
    m = MODES[mode]
    deadline = t0 + m["deadline_s"]
    first = bench_side_by_side({name: params["fanout"] for name in configs}, args, 1)
    results = [first[name] for name in configs]
    alone = {name: p for name, p in params.items() if name != "fanout"}
    for result in results:
        name = result["config"]
        if str(result.get("error", "")).startswith("failed to start"):
            continue
        # Keep the whole run bounded: a configuration alone needs roughly this much time.
        if time.monotonic() + alone["many_rooms"]["duration_s"] + 30 > deadline:
            log(f"== {name}: the scenarios alone skipped, the run's time budget is spent")
            for scenario in alone:
                result["scenarios"][scenario] = {"error": "time budget spent"}
            continue
        add_alone(result, bench_config(name, alone, args, label=f"{name} alone"))
    for number in range(2, m.get("rounds", 1) + 1):
        taking = [result for result in results if wants_another_round(result)]
        need = min(len(taking) * (m["later_budget_s"] + 15), m["deadline_s"] / 2)
        if not taking or time.monotonic() + need > deadline:
            log(f"== round {number} skipped, the run's time budget is spent")
            break
        fanouts = {
            result["config"]: later_round_params(
                params, result["scenarios"]["fanout"], m["later_budget_s"]
            )["fanout"]
            for result in taking
        }
        again = bench_side_by_side(fanouts, args, number)
        for result in taking:
            add_round(result, again[result["config"]], number)
    return results


def add_alone(result: dict[str, Any], alone: dict[str, Any]) -> None:
    """Fold what a configuration measured alone into its result."""
    result.setdefault("scenarios", {}).update(alone.get("scenarios") or {})
    result["notes"] = result.get("notes", []) + alone.get("notes", [])
    result["wall_s"] = round(result.get("wall_s", 0) + alone.get("wall_s", 0), 1)
    if alone.get("error"):
        result.setdefault("round_errors", []).append(f"alone: {alone['error']}")
        result["server_log_tail"] = alone.get("server_log_tail")
    if alone.get("status") != "ok":
        result["status"] = "error"


def main() -> int:
    parser = argparse.ArgumentParser(description="Chat server benchmark (loopback only).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="short run, under 2 minutes")
    group.add_argument("--smoke", action="store_true", help="a few seconds of tiny load (CI)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="what to run")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="output folder")
    parser.add_argument(
        "--pg-url",
        default="postgres://postgres@127.0.0.1:5432/test",
        help="PostgreSQL admin connection used to create/drop the scratch database (*-2)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for *-2")
    parser.add_argument(
        "--receivers",
        type=int,
        default=FANOUT_BASE["receiver_processes"],
        help="processes reading the fan-out room besides the load generator (0: it reads all)",
    )
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    configs: list[str] = args.configs or MODES[mode]["configs"]
    if "yardstick" in configs:  # the reference goes first
        configs = ["yardstick"] + [c for c in configs if c != "yardstick"]
    if any(CONFIGS[c].processes > 1 for c in configs):
        from servers import require_loopback

        require_loopback(args.pg_url)
        require_loopback(args.redis_url)
    raise_nofile()  # inherited by the load generator and the servers
    params = scenario_params(mode)
    params["fanout"]["receiver_processes"] = max(0, args.receivers)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.probe_path = args.out / "probe.txt"
    log(f"chat bench, mode {mode}: {', '.join(configs)}")
    with machine_probe(args.probe_path):
        results = run_rounds(args, mode, configs, params, t0)
    rows = summarize(results)
    print_table(rows, params["fanout"]["clients"])
    by_name = {r["config"]: r for r in results}
    targets = evaluate_targets(rows, by_name, mode)
    print_targets(targets, mode)

    json_path = args.out / "results.json"
    png_path = args.out / "latency.png"
    report = {
        "meta": {
            "mode": mode,
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - t0, 1),
            "host": {
                "platform": platform.platform(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            },
            "versions": versions(),
            "git_commit": git_commit(),
            "params": params,
            # The probe's fastest unit of work in the run: what "speed" 1.00 stands for.
            "probe_fastest_ms": fastest_probe_ms(results),
        },
        "summary": rows,
        "targets": targets,
        "configs": by_name,
    }
    json_path.write_text(json.dumps(report, indent=1))
    title = (
        f"chat fan-out, 1 room x {params['fanout']['clients']} clients, "
        f"{params['fanout']['senders']} senders ({mode}, {report['meta']['host']['cpus']} cpus, "
        f"{started:%Y-%m-%d %H:%M} UTC)"
    )
    try:
        draw_chart(results, png_path, title, params["fanout"]["clients"] - 1)
    except Exception as exc:
        log(f"chart failed: {exc}")
    log(f"wrote {json_path} and {png_path} ({report['meta']['wall_s']}s total)")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
