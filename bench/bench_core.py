"""Core benchmark: local sandbox round trip vs a plain subprocess, and pluggy hook dispatch vs a direct call.

    python bench/bench_core.py [--n 200] [--calls 200000] [--json results.json]

Not a test: it prints a table (and optionally JSON). Goals: round trip median < 40 ms, dispatch overhead < 20 us.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from metaflow_sandbox import Backend, Resources, SandboxSpec, get_plugin_manager
from metaflow_sandbox.backends import local
from metaflow_sandbox.backends._local import isolation

GOAL_ROUND_TRIP_MS = 40.0
GOAL_DISPATCH_US = 20.0


def timed(fn: Callable[[], Any], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float], scale: float) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median": statistics.median(s) * scale,
        "p90": s[int(0.9 * (len(s) - 1))] * scale,
        "min": s[0] * scale,
        "n": len(s),
    }


def round_trip(backend: Backend, spec: SandboxSpec | None = None) -> Callable[[], None]:
    def run() -> None:
        sb = backend.create(spec or SandboxSpec())
        try:
            result = sb.exec(["echo", "hi"])
            assert result.exit_code == 0
        finally:
            sb.destroy()

    return run


def per_call(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call, best of 5 batches (the least disturbed by the other tenants of the machine)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="round trips per measurement")
    ap.add_argument("--calls", type=int, default=200_000, help="hook calls per batch")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    bwrap = isolation.select({})
    rows: dict[str, dict[str, float]] = {}
    rows["subprocess.run(['echo','hi'])"] = summary(
        timed(lambda: subprocess.run(["echo", "hi"], capture_output=True, check=True), args.n), 1e3
    )
    isolated = Backend("local")
    rows["local round trip (bwrap)" if bwrap else "local round trip (NO bwrap)"] = summary(timed(round_trip(isolated), args.n), 1e3)
    breakdown = {hook: statistics.median(v) * 1e3 for hook, v in isolated.timings.items()}
    limited = SandboxSpec(network=False, resources=Resources(cpu=1, memory_mb=512))
    if bwrap:
        rows["  ... network=False, cpu=1, memory=512"] = summary(timed(round_trip(Backend("local"), limited), args.n), 1e3)
    rows["local round trip (isolation=none)"] = summary(timed(round_trip(Backend("local", options={"isolation": "none"})), args.n), 1e3)

    pm = get_plugin_manager("local")
    opts: dict[str, Any] = {}
    direct = per_call(lambda: local.sandbox_check_config(options=opts), args.calls)
    hooked = per_call(lambda: pm.hook.sandbox_check_config(options=opts), args.calls)
    facade_backend = Backend("local", pm=pm)
    facade = per_call(facade_backend.check_config, args.calls // 4)
    dispatch = {
        "direct_us": direct * 1e6,
        "pm_hook_us": hooked * 1e6,
        "dispatch_overhead_us": (hooked - direct) * 1e6,
        "facade_backend_call_us": facade * 1e6,
    }

    base = rows["subprocess.run(['echo','hi'])"]["median"]
    rt_key = next(k for k in rows if k.startswith("local round trip (") and "none" not in k)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "bwrap": bwrap,
        },
        "round_trip_ms": rows,
        "round_trip_breakdown_median_ms": breakdown,
        "round_trip_ratio_vs_subprocess": rows[rt_key]["median"] / base,
        "dispatch": dispatch,
        "goals": {
            "round_trip_median_ms_lt_40": rows[rt_key]["median"] < GOAL_ROUND_TRIP_MS,
            "dispatch_overhead_us_lt_20": dispatch["dispatch_overhead_us"] < GOAL_DISPATCH_US,
        },
    }

    print("machine: %(cpus)s CPUs, %(platform)s, Python %(python)s" % result["machine"])
    print("bwrap:   %s" % (bwrap or "not usable: commands ran WITHOUT isolation"))
    print()
    print("%-38s %9s %9s %9s %5s" % ("round trip (create, exec echo, destroy)", "median ms", "p90 ms", "min ms", "n"))
    for name, r in rows.items():
        print("%-38s %9.2f %9.2f %9.2f %5d" % (name, r["median"], r["p90"], r["min"], r["n"]))
    print("ratio local(bwrap)/subprocess median: %.1fx" % result["round_trip_ratio_vs_subprocess"])
    print("breakdown (median ms): " + ", ".join("%s %.2f" % (k.replace("sandbox_", ""), v) for k, v in breakdown.items()))
    print()
    print("%-38s %9s" % ("hook dispatch (sandbox_check_config)", "us/call"))
    for name, value in dispatch.items():
        print("%-38s %9.2f" % (name, value))
    print()
    for goal, ok in result["goals"].items():
        print("goal %-30s %s" % (goal, "met" if ok else "MISSED"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print("wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
