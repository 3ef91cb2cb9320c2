"""Per-task bootstrap with a prepared environment vs pip in every task, interleaved in ONE run per backend.

    python bench/bench_prepared.py [--backends daytona,e2b,local] [--n 10] [--json results.json]

Not a test: it prints a table (and optionally JSON). "Bootstrap" is what a task pays between its
sandbox being created and the step's code starting with its requirements resolvable: with a prepared
environment, one command that starts Python and finds them; without, Metaflow's per-task `python -m pip
install -qqq --no-compile --no-cache-dir` of the same requirements (into a fresh directory, so it really
installs), then the same Python. Importing them costs the same either way and is left out (boto3 alone
takes 0.3-0.6 s to import on a loaded 2-core machine). The requirements are Metaflow's S3 dependencies (`boto3`, `requests`) plus a
step's `toolz`. Goal: prepared median < 1 s and >= 10x faster than pip per task.

Daytona and E2B run through their real SDKs against the emulators, whose request latency is set to
``--latency-ms`` (default 40 ms per API call: a cloud round trip; Daytona publishes sub-90 ms sandbox
creation and E2B ~150 ms starts, which the create time reported separately shows). PyPI here is a
local mirror plus pypi.org, so pip per task is if anything faster than on a real provider.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Iterator

from metaflow_sandbox import MARKER_LABEL, Backend, EnvironmentSpec, SandboxSpec

REQUIREMENTS = ("boto3", "requests", "toolz")
PY = "%d.%d" % sys.version_info[:2]
#: The step's Python starting with every requirement resolvable (importing them costs the same either way).
IMPORTS = "import time, importlib.util as u; assert all(map(u.find_spec, %r)); print('STARTED', time.time())" % (REQUIREMENTS,)
PIP = 'python -m pip install -qqq --no-compile --no-cache-dir --disable-pip-version-check --target "$T" %s' % " ".join(REQUIREMENTS)
GOAL_SECONDS, GOAL_RATIO = 1.0, 10.0


@contextlib.contextmanager
def emulated(name: str, latency_ms: float) -> Iterator[dict[str, str]]:
    if name == "local":
        yield {}
        return
    if name == "daytona":
        from metaflow_sandbox_daytona.emulator import start_emulator
    else:
        from metaflow_sandbox_e2b.emulator import start_emulator  # type: ignore[no-redef]
    with start_emulator(latency_ms=latency_ms) as emu:
        yield emu.env


def bootstrap(backend: Backend, spec: SandboxSpec, script: str) -> tuple[float, float]:
    """(create seconds, created -> user code started seconds)."""
    t0 = time.time()
    with backend.create(spec) as sb:
        created = time.time()
        out: list[str] = []
        code = sb.exec(["bash", "-c", script], on_stdout=out.append, on_stderr=out.append).exit_code
        text = "".join(out)
        assert code == 0 and "STARTED" in text, text[-2000:]
        started = float(text.split("STARTED", 1)[1].split()[0])
    return created - t0, started - created


def run_backend(name: str, n: int, latency_ms: float) -> dict[str, Any]:
    with emulated(name, latency_ms) as env:
        os.environ.update(env)
        backend = Backend(name)
        t = time.time()
        prepared = backend.prepare_environment(EnvironmentSpec(python_version=PY, requirements=REQUIREMENTS))
        build_s = time.time() - t
        labels = {MARKER_LABEL: "1", "bench": "prepared"}
        with_env = SandboxSpec(labels=labels, environment=prepared.ref)
        plain = SandboxSpec(labels=labels)
        rows: dict[str, list[tuple[float, float]]] = {"prepared": [], "pip": []}
        for _ in range(n):  # interleaved, so both see the same load
            rows["prepared"].append(bootstrap(backend, with_env, "python -c %r" % IMPORTS))
            script = 'T=$(mktemp -d) && %s && PYTHONPATH="$T" python -c %r' % (PIP, IMPORTS)
            rows["pip"].append(bootstrap(backend, plain, script))
        with contextlib.suppress(Exception):
            backend.remove_environment(prepared.ref)
    med = {k: statistics.median(b for _, b in v) for k, v in rows.items()}
    create = {k: statistics.median(c for c, _ in v) for k, v in rows.items()}
    return {
        "backend": name,
        "build_s": round(build_s, 2),
        "built": prepared.built,
        "bootstrap_prepared_s": round(med["prepared"], 3),
        "bootstrap_pip_s": round(med["pip"], 3),
        "ratio": round(med["pip"] / med["prepared"], 1),
        "create_s": {k: round(v, 3) for k, v in create.items()},
        "goal_met": med["prepared"] < GOAL_SECONDS and med["pip"] / med["prepared"] >= GOAL_RATIO,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="daytona,e2b,local")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    print("%-8s %9s %14s %10s %7s %12s  goal" % ("backend", "build s", "prepared s", "pip s", "ratio", "create s"))
    for name in args.backends.split(","):
        r = run_backend(name.strip(), args.n, args.latency_ms)
        results.append(r)
        print(
            "%-8s %9.2f %14.3f %10.3f %6.1fx %12.3f  %s"
            % (
                r["backend"],
                r["build_s"],
                r["bootstrap_prepared_s"],
                r["bootstrap_pip_s"],
                r["ratio"],
                r["create_s"]["prepared"],
                r["goal_met"],
            ),
            flush=True,
        )
    if args.json:
        meta = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(), "machine": platform.platform(), "cpus": os.cpu_count()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "n": args.n, "latency_ms": args.latency_ms, "results": results}, f, indent=2)
    return 0 if all(r["goal_met"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
