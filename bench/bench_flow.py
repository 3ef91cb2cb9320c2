"""Sandboxed flows against the same flows plain, on the fast path and on the trampoline, in one run.

    python bench/bench_flow.py [--rounds 5] [--width 16] [--cases ratio,overhead,memory,latency,concurrency,edit]
                               [--backends local,daytona,e2b] [--concurrency 64] [--json out.json]

Not a test. Every figure is a ratio or a difference against a baseline measured in the same run:

- ratio: the 16-task foreach (bench/flows/foreach16.py), rounds alternating plain / @sandbox on
  the fast path / @sandbox on the trampoline (METAFLOW_SANDBOX_FAST_PATH=0); median walls, ratios.
- overhead: one task at a time, the median time from the runtime launching a foreach task to its
  success (the runtime's own timestamps), sandboxed minus plain; variants interleaved run by run,
  and each run's first task left out (on the fast path it also waits for the run's server to start).
- memory: 8 sleeping sandboxed tasks; the launcher side's processes sampled while they run
  (PSS and USS from /proc/<pid>/smaps_rollup: forked children share pages copy-on-write, so RSS
  would count the shared pages once per task). Per task: its worker (thin client or trampoline)
  plus, on the fast path, its forked trampoline; the run's server and its spare trampoline (forked
  ahead of the next request) are reported apart.
- latency: tasks print "TS <time>" every 50 ms (and then every 300 ms); the time from the print
  inside the sandbox to the line arriving on the launcher's console (its stdout, read here).
  Baseline: the same flow plain.
- edit: the one sandboxed task of a 1-wide run right after the flow file was edited (a new code
  package: on `local` its Metaflow is shared with the last package's, only the user's files are new)
  against the same run unedited; runs alternate.
- concurrency: `--concurrency` sandboxed tasks at once (`--max-workers` as many) on each backend
  (Daytona and E2B through their emulators, with an S3 datastore), all must succeed; wall time
  against the same flow plain, and the launcher side's peak memory.
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
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

FLOWS = Path(__file__).parent / "flows"
FLOW = FLOWS / "foreach16.py"
TASKS_FLOW = FLOWS / "bench_tasks.py"
LINE = re.compile(r"^(\S+ \S+) \[\d+/work/(\d+) \(pid \d+\)\] (.*)$")
VARIANTS = {"plain": (False, "1"), "fast": (True, "1"), "trampoline": (True, "0")}


def flow_env(variant: str, extra: dict | None = None) -> dict[str, str]:
    sandboxed, fast = VARIANTS[variant]
    env = dict(os.environ, BENCH_SANDBOX="1" if sandboxed else "0", METAFLOW_SANDBOX_FAST_PATH=fast,
               METAFLOW_SANDBOX_FORWARD_ENV="BENCH_SANDBOX,BENCH_PRINTS,BENCH_GAP,BENCH_SLEEP",
               METAFLOW_SANDBOX_BACKEND="local", USER=os.environ.get("USER", "bench"))
    env.update(extra or {})
    return env


CPU: dict[str, list[float]] = {v: [] for v in VARIANTS}  # CPU seconds per task, the whole machine during the run


def _children_cpu() -> float:
    """The machine's busy CPU time (user, nice, system, irq, softirq of every CPU, from /proc/stat).

    Not getrusage(RUSAGE_CHILDREN): it misses every process its parent did not wait for (helpers reaped
    later, processes inside a sandbox's pid namespace) and so once reported the fast path below plain.
    This counts everything, the kernel's share included; run it on an otherwise idle machine."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def run_once(workdir: Path, variant: str, width: int, workers: int = 0) -> tuple[float, list[float]]:
    env = flow_env(variant, {"BENCH_WIDTH": str(width)})
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run", "--max-workers", str(workers or width)],
                          cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    CPU[variant].append((_children_cpu() - cpu) / width)
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


# ---------------------------------------------------------------- launcher-side memory


def _proc_table() -> dict[int, tuple[int, str]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open("/proc/%s/stat" % entry).read().rsplit(")", 1)[1].split()[1])
                cmd = open("/proc/%s/cmdline" % entry, "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            table[int(entry)] = (ppid, cmd)
    return table


def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, USS) in kB."""
    pss = uss = 0
    try:
        for line in open("/proc/%d/smaps_rollup" % pid):
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
    except OSError:
        pass
    return pss, uss


def launcher_side(launcher: int) -> dict[str, list[int]]:
    """The launcher's descendants that are not sandboxed work, by role: worker, forked, server, other."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    roles: dict[str, list[int]] = {"worker": [], "forked": [], "spare": [], "server": [], "other": []}
    stack = [(launcher, "launcher")]
    while stack:
        pid, parent_role = stack.pop()
        for child in children.get(pid, []):
            cmd = table[child][1]
            if "bwrap" in cmd.split(" ")[0] or "/emulator" in cmd or "weed" in cmd.split(" ")[0]:
                continue  # the sandbox itself (its processes are not the launcher's cost), or a server of this bench
            if parent_role == "server":
                # a forked trampoline keeps the server's command line; the one forked ahead (no task yet) runs nothing
                role = "forked" if children.get(child) else "spare"
            elif " sandbox serve " in cmd:
                role = "server"
            elif parent_role == "launcher" and " sandbox step " in cmd:
                role = "worker"
            else:
                role = "other"
            roles[role].append(child)
            stack.append((child, role))
    return roles


class MemorySampler:
    """Samples the launcher side of a running flow every `period` s; keeps the sample with the most workers."""

    def __init__(self, proc: subprocess.Popen, period: float = 0.5):
        self.proc, self.period = proc, period
        self.best: dict = {}
        self.peak_pss_kb = 0
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while self.proc.poll() is None:
            roles = launcher_side(self.proc.pid)
            mem = {role: [_memory_kb(p) for p in pids] for role, pids in roles.items()}
            total = _memory_kb(self.proc.pid)[0] + sum(p for role in mem.values() for p, _ in role)
            self.peak_pss_kb = max(self.peak_pss_kb, total)
            if len(roles["worker"]) >= len(self.best.get("worker", [])) and roles["worker"]:
                self.best = dict(mem, launcher=[_memory_kb(self.proc.pid)])
            time.sleep(self.period)

    def per_task_mb(self) -> dict[str, float]:
        workers = self.best.get("worker", [])
        if not workers:
            return {}
        n = len(workers)
        pss = sum(p for p, _ in workers) + sum(p for p, _ in self.best.get("forked", []))
        uss = sum(u for _, u in workers) + sum(u for _, u in self.best.get("forked", []))
        server = self.best.get("server", [(0, 0)])
        return {"tasks_sampled": n, "pss_mb": pss / n / 1024, "uss_mb": uss / n / 1024,
                "server_pss_mb": sum(p for p, _ in server) / 1024, "launcher_pss_mb": self.best["launcher"][0][0] / 1024,
                "spare_pss_mb": sum(p for p, _ in self.best.get("spare", [])) / 1024}


def run_tasks_flow(workdir: Path, variant: str, extra: dict, workers: int, on_line=None) -> tuple[float, subprocess.Popen, MemorySampler]:
    env = flow_env(variant, extra)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(TASKS_FLOW), "--no-pylint", "run", "--max-workers", str(workers)],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = MemorySampler(proc)
    tail = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if on_line:
            on_line(line, time.time())
        tail = (tail + [line])[-40:]
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit("flow failed (%s):\n%s" % (variant, "".join(tail)))
    return wall, proc, sampler


def memory_case(workdir: Path, width: int = 8) -> dict:
    out = {}
    for variant in ("fast", "trampoline"):
        _, _, sampler = run_tasks_flow(workdir, variant, {"BENCH_WIDTH": str(width), "BENCH_SLEEP": "8"}, width)
        out[variant] = sampler.per_task_mb()
    return out


def latency_case(workdir: Path, width: int = 2) -> dict:
    out = {}
    for variant in ("plain", "fast"):
        delays: list[float] = []

        def on_line(line: str, now: float, delays: list[float] = delays) -> None:
            m = re.search(r"\] TS (\d+\.\d+)\s*$", line)
            if m:
                delays.append(now - float(m.group(1)))

        for gap, prints in (("0.05", "40"), ("0.3", "10")):
            run_tasks_flow(workdir, variant, {"BENCH_WIDTH": str(width), "BENCH_PRINTS": prints, "BENCH_GAP": gap}, width, on_line)
        delays.sort()
        out[variant] = {"lines": len(delays), "median_s": statistics.median(delays),
                        "p99_s": delays[min(len(delays) - 1, int(len(delays) * 0.99))], "max_s": delays[-1]}
    out["median_difference_s"] = out["fast"]["median_s"] - out["plain"]["median_s"]
    return out


def edit_case(workdir: Path, rounds: int) -> dict:
    flow = workdir / "edited_flow.py"
    flow.write_text(FLOW.read_text())
    samples: dict[str, list[float]] = {"cached": [], "edited": []}
    for i in range(rounds + 1):
        for kind in ("edited", "cached"):
            if kind == "edited":
                flow.write_text(flow.read_text() + "\n# edit %d\n" % i)
            proc = subprocess.run([sys.executable, str(flow), "--no-pylint", "run"], cwd=workdir,
                                  env=flow_env("fast", {"BENCH_WIDTH": "1"}), capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit("flow failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
            if i:  # the first pair warms up
                samples[kind].append(task_durations(proc.stdout + proc.stderr)[0])
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"task_median_s": med, "edited_minus_cached_ms": 1000 * (med["edited"] - med["cached"])}


def _backend_env(stack: ExitStack, backend: str, root: Path) -> dict:
    if backend == "local":
        return {"METAFLOW_SANDBOX_BACKEND": "local"}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.e2e import conftest  # the test suite's S3 server (SeaweedFS) and emulators

    if "s3" not in stack.__dict__.setdefault("_servers", {}):
        stack._servers["s3"] = _start_s3(stack, conftest, root)  # type: ignore[attr-defined]
    if backend == "daytona":
        from metaflow_sandbox_daytona.emulator import start_emulator
    else:
        from metaflow_sandbox_e2b.emulator import start_emulator
    emu = start_emulator(port=0)
    stack.callback(emu.stop)
    env = dict(conftest.s3_env(stack._servers["s3"], "bench-%s-%d" % (backend, time.time())))  # type: ignore[attr-defined]
    env.update(emu.env, METAFLOW_SANDBOX_BACKEND=backend, METAFLOW_SKIP_INSTALL_DEPENDENCIES="1")
    return env


def _start_s3(stack: ExitStack, conftest, root: Path) -> dict:
    gen = conftest.s3_server.__wrapped__(_Factory(root)) if hasattr(conftest.s3_server, "__wrapped__") else None
    if gen is None:
        raise SystemExit("cannot start the test suite's S3 server from here")
    s3 = next(gen)
    stack.callback(lambda: next(gen, None))
    return s3


class _Factory:
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return path


def concurrency_case(workdir: Path, backends: list[str], n: int) -> dict:
    out = {}
    with ExitStack() as stack:
        for backend in backends:
            env = _backend_env(stack, backend, workdir)
            extra = dict(env, BENCH_WIDTH=str(n), BENCH_SLEEP="2")
            plain, _, _ = run_tasks_flow(workdir, "plain", extra, n)
            wall, proc, sampler = run_tasks_flow(workdir, "fast", extra, n)
            out[backend] = c = {"tasks": n, "all_succeeded": proc.returncode == 0, "wall_s": wall, "plain_wall_s": plain,
                                "wall_ratio": wall / plain, "launcher_side_peak_pss_mb": sampler.peak_pss_kb / 1024,
                                "per_task": sampler.per_task_mb()}
            print("%d concurrent on %s: all succeeded %s, wall %.1f s (plain %.1f s, ratio %.2f), launcher-side peak PSS %.0f MB"
                  % (n, backend, c["all_succeeded"], wall, plain, c["wall_ratio"], c["launcher_side_peak_pss_mb"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--cases", default="ratio,overhead,memory,latency,concurrency,edit")
    parser.add_argument("--backends", default="local,daytona,e2b")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cases = args.cases.split(",")
    result: dict = {"width": args.width, "rounds": args.rounds, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="mfsb-bench-") as tmp:
        work = Path(tmp)
        os.environ["TMPDIR"] = tmp  # this run's local sandboxes live here, out of other runs' way
        if "ratio" in cases or "overhead" in cases:
            run_once(work, "fast", args.width)  # warm-up: code package cache, page cache
            CPU["fast"].clear()
        if "ratio" in cases:
            walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    walls[variant].append(run_once(work, variant, args.width)[0])
            med = {v: statistics.median(w) for v, w in walls.items()}
            result["ratio"] = {"wall_median_s": med, "fast_over_plain": med["fast"] / med["plain"],
                               "trampoline_over_plain": med["trampoline"] / med["plain"]}
            print("16-task foreach, median wall (s): plain %.2f  fast %.2f  trampoline %.2f" % tuple(med[v] for v in VARIANTS))
            ratios = (med["fast"] / med["plain"], med["trampoline"] / med["plain"])
            print("  ratio @sandbox/plain: fast path %.2f (goal <= 1.2), trampoline %.2f" % ratios)
            cpu = {v: statistics.median(c) for v, c in CPU.items()}
            result["ratio"]["cpu_per_task_ms"] = {v: 1000 * c for v, c in cpu.items()}
            print("  CPU per task, the whole machine during the run, over plain (ms): fast path %.0f, trampoline %.0f"
                  % (1000 * (cpu["fast"] - cpu["plain"]), 1000 * (cpu["trampoline"] - cpu["plain"])))
        if "overhead" in cases:
            samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
            paired: dict[str, list[float]] = {"fast": [], "trampoline": []}  # per round: its median minus plain's
            for _ in range(max(1, args.rounds // 2)):  # interleaved, so load drift hits every variant alike
                medians = {}
                for variant in VARIANTS:
                    durations = run_once(work, variant, args.width, workers=1)[1][1:]  # the 1st waits for the server
                    samples[variant].extend(durations)
                    medians[variant] = statistics.median(durations)
                for variant in paired:
                    paired[variant].append(1000 * (medians[variant] - medians["plain"]))
            task = {v: statistics.median(d) for v, d in samples.items()}
            result["overhead"] = {"task_median_s": task, "fast_minus_plain_ms": 1000 * (task["fast"] - task["plain"]),
                                  "trampoline_minus_plain_ms": 1000 * (task["trampoline"] - task["plain"]),
                                  "per_round_ms": paired, "fast_minus_plain_per_round_median_ms": statistics.median(paired["fast"])}
            print("  per round (ms over that round's plain): fast path %s" % ", ".join("%.0f" % d for d in paired["fast"]))
            print("one task alone, launch to success (ms over plain): fast path %.0f (goal <= 60), trampoline %.0f"
                  % (result["overhead"]["fast_minus_plain_ms"], result["overhead"]["trampoline_minus_plain_ms"]))
        if "memory" in cases:
            result["memory"] = memory_case(work)
            for variant, mem in result["memory"].items():
                print("launcher side per running task, %s: PSS %.1f MB, USS %.1f MB (server PSS %.1f MB, spare %.1f MB, %d tasks sampled)"
                      % (variant, mem.get("pss_mb", 0), mem.get("uss_mb", 0), mem.get("server_pss_mb", 0), mem.get("spare_pss_mb", 0),
                         mem.get("tasks_sampled", 0)))
        if "latency" in cases:
            result["latency"] = lat = latency_case(work)
            for variant in ("plain", "fast"):
                print("print -> console, %s: median %.3f s, p99 %.3f s, max %.3f s (%d lines)"
                      % (variant, lat[variant]["median_s"], lat[variant]["p99_s"], lat[variant]["max_s"], lat[variant]["lines"]))
        if "edit" in cases:
            result["edit"] = ed = edit_case(work, max(2, args.rounds // 2))
            print("first task after a flow edit, launch to success: %.0f ms over an unedited run (medians %.2f s / %.2f s)"
                  % (ed["edited_minus_cached_ms"], ed["task_median_s"]["edited"], ed["task_median_s"]["cached"]))
        if "concurrency" in cases:
            result["concurrency"] = concurrency_case(work, args.backends.split(","), args.concurrency)  # prints as it goes
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
