"""Lifeline cost: a local sandbox round trip with and without a lifeline, in the same run.

    python bench/bench_lifeline.py [--n 100] [--json results.json]

Not a test. Interleaves the two cases (A, B, A, B, ...) so machine noise hits both alike, and
reports the per-task difference and ratio, plus the one-off costs: starting a run's reaper and an
owner's connect (once per task in a trampoline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from metaflow_sandbox import Backend, SandboxSpec
from metaflow_sandbox.lifeline import Lifeline, spawn


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def round_trip(backend: Backend) -> float:
    start = time.perf_counter()
    sb = backend.create(SandboxSpec(labels={"bench": "lifeline"}))
    try:
        assert sb.exec(["true"]).exit_code == 0
    finally:
        sb.destroy()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("METAFLOW_SANDBOX_LOCAL_ROOT", tempfile.mkdtemp(prefix="mfsb-bench-"))

    t0 = time.perf_counter()
    path = spawn()
    launcher = Lifeline.connect(path, role="launcher", wait=30)
    spawn_ms = (time.perf_counter() - t0) * 1000

    connects = []
    for _ in range(20):
        t0 = time.perf_counter()
        Lifeline.connect(path).close()
        connects.append(time.perf_counter() - t0)

    plain = Backend("local")
    guarded = Backend("local", lifeline=Lifeline.connect(path))
    for _ in range(5):  # warm up both
        round_trip(plain), round_trip(guarded)
    without, with_ = [], []
    for _ in range(args.n):
        without.append(round_trip(plain))
        with_.append(round_trip(guarded))
    launcher.close()

    result = {
        "n": args.n,
        "round_trip_without_ms": median_ms(without),
        "round_trip_with_ms": median_ms(with_),
        "lifeline_cost_per_task_ms": median_ms(with_) - median_ms(without),
        "ratio": median_ms(with_) / median_ms(without),
        "owner_connect_ms": median_ms(connects),
        "reaper_start_per_run_ms": spawn_ms,
    }
    print("local round trip (create + exec true + destroy), median of %d, same run:" % args.n)
    print("  without lifeline  %7.2f ms" % result["round_trip_without_ms"])
    with_ms, cost, ratio = result["round_trip_with_ms"], result["lifeline_cost_per_task_ms"], result["ratio"]
    print("  with lifeline     %7.2f ms   (+%.2f ms, ratio %.3f)" % (with_ms, cost, ratio))
    print("one-off costs:")
    print("  owner connect (per task)   %6.2f ms" % result["owner_connect_ms"])
    print("  reaper start (per run)     %6.2f ms" % result["reaper_start_per_run_ms"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
