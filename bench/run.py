"""Benchmark runner: starts each configuration fresh, drives it with the load generator
(a separate process) and writes a table, a JSON file and a latency chart.

    python bench/run.py            # full run (bounded, < 15 min)
    python bench/run.py --quick    # < 2 min: yardstick, daphne-1, uvicorn-1
    python bench/run.py --smoke    # a few seconds, tiny loads (CI)
    python bench/run.py --configs yardstick uvicorn-1 --out bench/results

Run it with the project's virtualenv python, from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from servers import BENCH_DIR, CONFIGS, REPO_ROOT, Deployment, StartError, raise_nofile

FANOUT_BASE = {
    "min_ratio": 0.99,
    "p99_limit_ms": 200,
    "min_rate": 1,
    "timeout_s": 10,
}
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "configs": list(CONFIGS),
        "deadline_s": 14 * 60,
        "fanout": {
            "clients": 200,
            "senders": 5,
            "start_rate": 20,
            "factor": 2,
            "max_rate": 4000,
            "resolution": 0.1,
            "max_steps": 14,
            "step_s": 3,
            "warmup_s": 2,
            "drain_s": 5,
            "budget_s": 75,
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
            "start_rate": 20,
            "factor": 2,
            "max_rate": 4000,
            "resolution": 0.3,
            "max_steps": 10,
            "step_s": 1.5,
            "warmup_s": 1,
            "drain_s": 3,
            "budget_s": 20,
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
            "max_steps": 2,
            "step_s": 0.5,
            "warmup_s": 0,
            "drain_s": 2,
            "budget_s": 5,
        },
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
IDLE_BASE = {"room_size": 10, "concurrency": 64, "timeout_s": 10, "deadline_s": 60}


def log(line: str) -> None:
    print(line, flush=True)


def scenario_params(mode: str) -> dict[str, dict[str, Any]]:
    m = MODES[mode]
    return {
        "fanout": {**FANOUT_BASE, **m["fanout"]},
        "many_rooms": {**MANY_ROOMS_BASE, **m["many_rooms"]},
        "idle": {**IDLE_BASE, **m["idle"]},
    }


def loadgen_timeout(params: dict[str, dict[str, Any]]) -> float:
    f, r, i = params["fanout"], params["many_rooms"], params["idle"]
    return (
        f["budget_s"] + 2 * f["step_s"] + 2 * f["drain_s"] + r["duration_s"] + i["deadline_s"] + 90
    )


def run_loadgen(dep: Deployment, params: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "label": dep.config.name,
        "ports": dep.ports,
        "server_pids": dep.pids,
        "scenarios": params,
    }
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH_DIR / "loadgen.py")],
            input=json.dumps(spec).encode(),
            stdout=subprocess.PIPE,
            stderr=None,  # progress lines go straight to the terminal
            timeout=loadgen_timeout(params),
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


def bench_config(name: str, params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    dep = Deployment(CONFIGS[name], args.pg_url, args.redis_url)
    out: dict[str, Any] = {"config": name, "processes": dep.config.processes}
    t0 = time.monotonic()
    try:
        log(f"== {name}: starting {dep.config.processes} process(es)")
        dep.start()
        out["ports"] = dep.ports
        out["startup_s"] = dep.startup_s
        log(f"== {name}: ready on port(s) {dep.ports} after {dep.startup_s}s")
        result = run_loadgen(dep, params)
        out.update(result)
        dead = dep.dead()
        if dead:
            out["error"] = "server died: " + "; ".join(dead)
            out["server_log_tail"] = dep.log_tails()
        elif "error" in result:
            out["server_log_tail"] = dep.log_tails()
    except StartError as exc:
        out["error"] = f"failed to start: {exc}"
        log(f"== {name}: {out['error']}")
    finally:
        dep.stop()
        dep.cleanup()
    out["notes"] = dep.notes
    out["status"] = "error" if "error" in out else "ok"
    out["wall_s"] = round(time.monotonic() - t0, 1)
    log(f"== {name}: {out['status']} in {out['wall_s']}s")
    return out


def get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
        problems = [
            f"{k}: {v['error']}" for k, v in (r.get("scenarios") or {}).items() if "error" in v
        ]
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
                "saturated": get(r, "scenarios", "fanout", "saturated"),
                "many_rooms_ratio": rooms.get("delivery_ratio"),
                "many_rooms_p99_ms": get(rooms, "latency", "p99_ms"),
                "idle_kb_per_conn": idle.get("kb_per_connection"),
                "idle_connects_per_s": idle.get("connects_per_s"),
                "problems": problems,
            }
        )
    return rows


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
            f"{fmt(row['cpu_vs_yardstick'], '.2f'):>11} | "
            f"{fmt(row['many_rooms_ratio'], '.4f'):>11} "
            f"{fmt(row['many_rooms_p99_ms'], '.1f'):>9} | "
            f"{fmt(row['idle_kb_per_conn'], '.1f'):>12} "
            f"{fmt(row['idle_connects_per_s'], ',.0f'):>7}"
        )
    for row in rows:
        for problem in row["problems"]:
            log(f"  ! {row['config']}: {problem.splitlines()[0][:200]}")
    log("")
    log(
        f"max deliv/s: measured deliveries/s of the highest fan-out step (1 room x {clients} "
        "clients) with delivery ratio >= 0.99 and p99 <= 200 ms; '+' = no step failed. CPU% "
        "per core (100 = one core) during that step, server and load generator (lg); "
        f"'!' = lg >= {LG_BUSY_PCT}%, the generator may share the limit. us/deliv: server "
        "CPU microseconds per delivered message in that step; cpu vs yard: the yardstick's "
        "us/deliv divided by this one's (1.00 = as cheap per delivery as the yardstick), the "
        "fairer ratio when the generator limits both."
    )


def draw_chart(results: list[dict[str, Any]], path: Path, title: str, fan: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    for r in results:
        steps = sorted(
            get(r, "scenarios", "fanout", "steps") or [],
            key=lambda s: s["offered_deliveries_per_s"],
        )
        steps = [s for s in steps if s["latency"]["p99_ms"] is not None]
        if not steps:
            continue
        x = [s["offered_deliveries_per_s"] for s in steps]
        line = ax1.plot(x, [s["latency"]["p99_ms"] for s in steps], "-", label=r["config"])[0]
        color = line.get_color()
        ok = [s for s in steps if s.get("ok")]
        bad = [s for s in steps if not s.get("ok")]
        ax1.scatter(
            [s["offered_deliveries_per_s"] for s in ok],
            [s["latency"]["p99_ms"] for s in ok],
            color=color,
            marker="o",
            s=22,
        )
        ax1.scatter(
            [s["offered_deliveries_per_s"] for s in bad],
            [s["latency"]["p99_ms"] for s in bad],
            color=color,
            marker="x",
            s=40,
        )
        ax2.plot(
            x,
            [s["delivered_per_s"] for s in steps],
            "-o",
            color=color,
            ms=3,
            label=r["config"],
        )
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
    ax1.set_title("p99 latency vs offered load (x = step failed)")
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
    started = datetime.now(UTC)
    t0 = time.monotonic()
    log(f"chat bench, mode {mode}: {', '.join(configs)}")
    results = []
    deadline = t0 + MODES[mode]["deadline_s"]
    for name in configs:
        # Keep the whole run bounded: a configuration needs roughly this much time.
        need = min(params["fanout"]["budget_s"] + 30, MODES[mode]["deadline_s"] / 4)
        if time.monotonic() + need > deadline:
            log(f"== {name}: skipped, the run's time budget is spent")
            results.append({"config": name, "status": "skipped", "error": "time budget spent"})
            continue
        results.append(bench_config(name, params, args))
    rows = summarize(results)
    print_table(rows, params["fanout"]["clients"])

    args.out.mkdir(parents=True, exist_ok=True)
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
        },
        "summary": rows,
        "configs": {r["config"]: r for r in results},
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
