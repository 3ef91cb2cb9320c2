"""The lifeline: no sandbox outlives its owner, whatever signal ends the run.

A 4-task foreach whose sandboxed tasks sleep 60 s is killed mid-run, by SIGINT, SIGTERM or
SIGKILL sent to the launcher's PID alone (as a supervisor or `kill` does) or to its whole
process group (Ctrl-C in a terminal, a CI runner), or by SIGKILL of one trampoline. Ten seconds
later no sandbox may be alive: the emulators' own lists for Daytona and E2B; for `local`, no
sandbox process, directory or memory cgroup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from metaflow_sandbox.backends._local import ondisk

from .conftest import FLOWS, PYTHON, Target, base_env, child_pids, cmdline, local_leftovers, s3_env

SIGNALS = [
    ("SIGINT", "launcher"),
    ("SIGTERM", "launcher"),
    ("SIGKILL", "launcher"),
    ("SIGINT", "group"),
    ("SIGTERM", "group"),
    ("SIGKILL", "group"),
    ("SIGKILL", "trampoline"),
]
TASKS = 4
GRACE = 10.0


def _local_cgroups(names: set[str]) -> list[str]:
    from metaflow_sandbox.backends._local import limits

    return [p for p in limits.stale_cgroups("mfsb-") if os.path.basename(p) in names]


@pytest.fixture(params=["local", "daytona", "e2b"])
def killable(request, tmp_path):
    """A target whose `alive()` lists the live sandboxes of this test's run."""
    backend = request.param
    env = {"METAFLOW_SANDBOX_BACKEND": backend}
    if backend == "local":
        seen: set[str] = set()

        def alive():
            left = local_leftovers(tmp_path)
            seen.update(os.path.basename(p) for p in left if "/mfsb-" in p)
            return left + _local_cgroups(seen)

    else:
        emu = request.getfixturevalue("%s_emulator" % backend)
        env.update(s3_env(request.getfixturevalue("s3_server"), "lifeline-%s" % tmp_path.name))
        env.update(emu.env)
        env["METAFLOW_SKIP_INSTALL_DEPENDENCIES"] = "1"
        alive = emu.live_sandboxes
    yield Target(backend, backend, "local" if backend == "local" else "s3", env, alive, tmp_path)


def _start(t: Target) -> subprocess.Popen:
    env = base_env(t.tmp)
    env.update(t.env)
    return subprocess.Popen(
        [PYTHON, str(FLOWS / "sleepy_foreach_flow.py"), "--no-pylint", "run", "--max-workers", str(TASKS)],
        cwd=t.tmp,
        env=env,
        stdout=open(Path(t.tmp) / "flow.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group, as under a terminal or a CI runner
    )


def _task_id(command: str) -> str:
    words = command.split()
    return words[words.index("--task-id") + 1]


def _task_sandboxes(t: Target, task_id: str) -> list[str]:
    """What is still alive of task ``task_id``'s sandbox: its directory or bwrap process (`local`), its provider record."""
    if t.backend != "local":
        return [s["id"] for s in t.live_sandboxes() if (s.get("labels") or {}).get("metaflow.task") == task_id]
    left = []
    for root in Path(t.tmp).glob("metaflow-sandbox-*/mfsb-*"):
        state = ondisk.read_state(str(root)) or {}
        if (state.get("labels") or {}).get("metaflow.task") == task_id:
            left.append(str(root))
    for pid in os.listdir("/proc"):
        words = cmdline(int(pid)) if pid.isdigit() else ""
        if "bwrap" in words and str(t.tmp) in words and " --task-id %s " % task_id in words:
            left.append("pid %s" % pid)
    return left


def _wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for %s; flow log:\n%s" % (what, log.read_text()[-4000:]))


@pytest.mark.slow
@pytest.mark.parametrize("signame,target", SIGNALS, ids=["%s-%s" % s for s in SIGNALS])
def test_no_sandbox_outlives_a_killed_run(killable, signame, target):
    t = killable
    log = Path(t.tmp) / "flow.log"
    proc = _start(t)
    try:
        trampolines = lambda: [p for p in child_pids(proc.pid) if " sandbox step " in cmdline(p)]
        running = lambda: len(list(Path(t.tmp).glob("metaflow-sandbox-*/mfsb-*"))) if t.backend == "local" else len(t.live_sandboxes())
        _wait_for(lambda: running() >= TASKS and len(trampolines()) >= TASKS, 120, "%d live sandboxes" % TASKS, log)
        sig = getattr(signal, signame)
        if target == "launcher":
            os.kill(proc.pid, sig)
        elif target == "group":
            os.killpg(proc.pid, sig)
        else:
            victim = trampolines()[0]
            task_id = _task_id(cmdline(victim))
            _wait_for(lambda: _task_sandboxes(t, task_id), 60, "task %s's sandbox" % task_id, log)
            os.kill(victim, sig)
        killed_at = time.time()
        deadline = killed_at + GRACE
        if target == "trampoline":
            # The killed task's sandbox is gone (the others run on until the runtime fails the run).
            while time.time() < deadline and _task_sandboxes(t, task_id):
                time.sleep(0.2)
            left = _task_sandboxes(t, task_id)
            assert left == [], "%d s after SIGKILL, the killed task %s's sandbox is still alive: %s\n%s" % (
                GRACE,
                task_id,
                left,
                log.read_text()[-3000:],
            )
        else:
            while time.time() < deadline and running() > 0:
                time.sleep(0.2)
            left = t.live_sandboxes()
            assert left == [], "%d s after %s to the %s, still alive: %s\n%s" % (GRACE, signame, target, left, log.read_text()[-3000:])
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
    # Whatever the signal, once the run is over nothing of it remains.
    _wait_for(lambda: t.live_sandboxes() == [], 30, "no sandbox left after the run ended", log)
