"""E2B backend benchmark: per-task launch overhead (create + exec `true` + destroy) through the E2B emulator,
vs the `local` backend called directly, interleaved in ONE run so both see the same machine load.

    python bench/bench_e2b.py [--n 50] [--json results.json]

Not a test: it prints a table (and optionally JSON). Goal: e2b-via-emulator median <= 2x local median.
The emulator runs every command in a `local` sandbox, so the ratio is the cost of the E2B path itself
(real SDK, REST + envd over HTTP, Connect streaming, the emulator) on top of the same local work.
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
from typing import Any, Callable

from metaflow_sandbox import MARKER_LABEL, Backend, SandboxSpec
from metaflow_sandbox_e2b.emulator import start_emulator

GOAL_RATIO = 2.0


def launch(backend: Backend, spec: SandboxSpec) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        sb = backend.create(spec)
        t1 = time.perf_counter()
        assert sb.exec(["true"]).exit_code == 0
        t2 = time.perf_counter()
        assert sb.destroy() is True
        t3 = time.perf_counter()
        return {"total": t3 - t0, "create": t1 - t0, "exec": t2 - t1, "destroy": t3 - t2}

    return run


def med(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples) * 1000


def p90(samples: list[dict[str, float]], key: str) -> float:
    values = sorted(s[key] for s in samples)
    return values[int(0.9 * (len(values) - 1))] * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="launches per backend")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    labels = {MARKER_LABEL: "1", "flow": "Bench", "run": "bench", "step": "s", "task": "1"}
    with start_emulator(port=0) as emu:
        os.environ.update(emu.env)
        runners = {
            "local": launch(Backend("local"), SandboxSpec(labels=labels, ttl_seconds=600)),
            "e2b": launch(Backend("e2b"), SandboxSpec(labels=labels, ttl_seconds=600)),
        }
        for _ in range(args.warmup):
            for run in runners.values():
                run()
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
        for _ in range(args.n):  # interleaved: both backends see the same load
            for name, run in runners.items():
                samples[name].append(run())
        leftovers = emu.live_sandboxes()

    rows: dict[str, Any] = {}
    print("%-7s %10s %10s %10s %10s %10s" % ("backend", "median ms", "p90 ms", "create", "exec", "destroy"))
    for name, s in samples.items():
        rows[name] = {k: round(med(s, k), 2) for k in ("total", "create", "exec", "destroy")}
        rows[name]["p90_total"] = round(p90(s, "total"), 2)
        print(
            "%-7s %10.1f %10.1f %10.1f %10.1f %10.1f"
            % (name, med(s, "total"), p90(s, "total"), med(s, "create"), med(s, "exec"), med(s, "destroy"))
        )
    ratio = rows["e2b"]["total"] / rows["local"]["total"]
    verdict = "OK" if ratio <= GOAL_RATIO else "OVER GOAL"
    print("ratio e2b/local (median total): %.2fx (goal <= %.1fx): %s" % (ratio, GOAL_RATIO, verdict))
    print("live sandboxes left in the emulator: %d" % len(leftovers))
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "n": args.n,
        "median_ms": rows,
        "ratio": round(ratio, 3),
        "goal_ratio": GOAL_RATIO,
        "leftovers": len(leftovers),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
