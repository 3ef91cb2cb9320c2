"""The same 16-task foreach flow, plain and with @sandbox (local backend), in one run.

    python bench/bench_flow.py [--rounds 5] [--width 16] [--json out.json]

Rounds alternate plain/sandboxed so drift on a shared machine hits both alike. Reports the
median wall time of whole runs (all 16 tasks at once on this machine's cores) and their ratio;
then the per-task overhead: with one task at a time (so no task waits for a CPU), the median time
from the runtime launching a foreach task to its success (as the runtime logs it), sandboxed
minus plain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

FLOW = Path(__file__).parent / "flows" / "foreach16.py"
LINE = re.compile(r"^(\S+ \S+) \[\d+/work/(\d+) \(pid \d+\)\] (.*)$")


def run_once(workdir: Path, sandboxed: bool, width: int, workers: int = 0) -> tuple[float, list[float]]:
    env = dict(os.environ, BENCH_SANDBOX="1" if sandboxed else "0", BENCH_WIDTH=str(width),
               METAFLOW_SANDBOX_FORWARD_ENV="BENCH_SANDBOX", METAFLOW_SANDBOX_BACKEND="local",
               USER=os.environ.get("USER", "bench"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run", "--max-workers", str(workers or width)],
                          cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit("flow failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
    return wall, task_durations(proc.stdout + proc.stderr)


def task_durations(output: str) -> list[float]:
    """Seconds from the runtime's "Task is starting." to "Task finished" for each foreach task."""
    started: dict[str, datetime] = {}
    durations = []
    for line in output.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
        if m.group(3).startswith("Task is starting.") and m.group(2) not in started:
            started[m.group(2)] = when
        elif m.group(3).startswith("Task finished successfully") and m.group(2) in started:
            durations.append((when - started[m.group(2)]).total_seconds())
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"plain": [], "sandbox": []}
    tasks: dict[str, list[float]] = {"plain": [], "sandbox": []}
    with tempfile.TemporaryDirectory(prefix="mfsb-bench-") as tmp:
        run_once(Path(tmp), True, args.width)  # warm-up: code package cache, page cache
        for _ in range(args.rounds):
            for label, sandboxed in (("plain", False), ("sandbox", True)):
                wall, durations = run_once(Path(tmp), sandboxed, args.width)
                walls[label].append(wall)
        for label, sandboxed in (("plain", False), ("sandbox", True)):
            tasks[label].extend(run_once(Path(tmp), sandboxed, args.width, workers=1)[1])
    result = {
        "width": args.width,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "plain_wall_median_s": statistics.median(walls["plain"]),
        "sandbox_wall_median_s": statistics.median(walls["sandbox"]),
        "plain_task_median_s": statistics.median(tasks["plain"]),
        "sandbox_task_median_s": statistics.median(tasks["sandbox"]),
    }
    result["wall_ratio"] = result["sandbox_wall_median_s"] / result["plain_wall_median_s"]
    result["per_task_overhead_ms"] = 1000 * (result["sandbox_task_median_s"] - result["plain_task_median_s"])
    print("%-34s %10s %10s" % ("", "plain", "@sandbox"))
    print("%-34s %10.2f %10.2f" % ("whole run, median wall (s)", result["plain_wall_median_s"], result["sandbox_wall_median_s"]))
    print("%-34s %10.3f %10.3f" % ("foreach task alone, median (s)", result["plain_task_median_s"], result["sandbox_task_median_s"]))
    print("wall ratio (goal <= 1.3): %.2f" % result["wall_ratio"])
    print("per-task overhead (goal < 250 ms): %.0f ms" % result["per_task_overhead_ms"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
