"""Daytona backend benchmark: per-task launch overhead (create + exec `true` + destroy) through the
Daytona emulator vs the `local` backend called directly, interleaved in ONE run so both see the
same machine load.

    python bench/bench_daytona.py [--n 50] [--json results.json]

Not a test: it prints a table (and optionally JSON). Goal: daytona-via-emulator median <= 2x local.
The emulator runs every command in a `local` sandbox, so the ratio is the cost of the Daytona path
itself (real SDK, REST + toolbox over HTTP, a session + log WebSocket per exec, the emulator) on
top of the same local work. Per-phase medians show where the time goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from metaflow_sandbox import MARKER_LABEL, Backend, SandboxSpec
from metaflow_sandbox_daytona.emulator import start_emulator

GOAL_RATIO = 2.0


def one_task(backend: Backend, spec: SandboxSpec) -> dict[str, float]:
    """create + exec `true` + destroy, timed per phase (seconds)."""
    t0 = time.perf_counter()
    sb = backend.create(spec)
    t1 = time.perf_counter()
    code = sb.exec(["true"]).exit_code
    t2 = time.perf_counter()
    sb.destroy()
    t3 = time.perf_counter()
    assert code == 0
    return {"create": t1 - t0, "exec": t2 - t1, "destroy": t3 - t2, "total": t3 - t0}


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()

    spec = SandboxSpec(labels={MARKER_LABEL: "1", "bench": "daytona"})
    with start_emulator() as emu:
        os.environ.update(emu.env)
        local, daytona = Backend("local"), Backend("daytona")
        for _ in range(args.warmup):
            one_task(local, spec)
            one_task(daytona, spec)
        rows: dict[str, list[dict[str, float]]] = {"local": [], "daytona": []}
        for _ in range(args.n):  # interleaved: both backends see the same load
            rows["local"].append(one_task(local, spec))
            rows["daytona"].append(one_task(daytona, spec))
        emu.clear_requests()
        one_task(daytona, spec)
        calls = [r for r in emu.requests() if r["endpoint"] != "socketio"]
        assert emu.live_sandboxes() == [], "the benchmark leaked sandboxes"

    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": "%s, %s cores, python %s" % (platform.platform(), os.cpu_count(), platform.python_version()),
        "n": args.n,
        "median_ms": {b: {k: round(med(r, k), 2) for k in ("create", "exec", "destroy", "total")} for b, r in rows.items()},
        "http_calls_per_task": len(calls),
    }
    result["ratio"] = round(result["median_ms"]["daytona"]["total"] / result["median_ms"]["local"]["total"], 2)
    result["goal_ratio"] = GOAL_RATIO
    result["meets_goal"] = result["ratio"] <= GOAL_RATIO

    print("per-task launch overhead (create + exec `true` + destroy), n=%d, %s" % (args.n, result["machine"]))
    print("%-28s %10s %10s %10s %10s" % ("backend", "create", "exec", "destroy", "total"))
    for name, label in (("local", "local (direct)"), ("daytona", "daytona (SDK -> emulator)")):
        m = result["median_ms"][name]
        print("%-28s %8.1fms %8.1fms %8.1fms %8.1fms" % (label, m["create"], m["exec"], m["destroy"], m["total"]))
    print(
        "ratio daytona/local = %.2fx (goal <= %.1fx): %s; %d HTTP calls per task"
        % (result["ratio"], GOAL_RATIO, "OK" if result["meets_goal"] else "MISSED", len(calls))
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
