"""A local sandbox as its directory alone describes it, so that ANOTHER process can list or destroy it.

The lifeline's reaper, ``metaflow-sandbox list/gc`` and the next launcher's sweep never see the creating
process's memory: everything they need (labels, owner, cgroups) is in ``sandbox.json`` next to ``work/``
and ``tmp/``, written atomically before anything else of the sandbox exists. Processes still running
are found through the sandbox's cgroups and, without them, by the sandbox's path on their bwrap command
line or their working directory.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import time
from typing import Any, Iterator

from . import limits

STATE = "sandbox.json"
DIR_RE = re.compile(r"^mfsb-(\d+)-(\d+)-([0-9a-f]{12})$")
SID_RE = re.compile(r"^local-([0-9a-f]{12})$")
MNT_DETACH = 2
GONE = "-gone"
log = logging.getLogger("metaflow_sandbox.local")


def write_state(root: str, state: dict[str, Any]) -> None:
    """Atomically (write + rename), so a reader never sees half a file."""
    tmp = os.path.join(root, ".%s.tmp" % STATE)
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(root, STATE))


def read_state(root: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(root, STATE)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else None
    except (OSError, ValueError):
        return None


def entries(base: str) -> Iterator[tuple[str, int, int, str]]:
    """(dir, pid namespace, owner pid, sandbox id) of every sandbox directory under ``base``."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        m = DIR_RE.match(name)
        if m:
            yield os.path.join(base, name), int(m.group(1)), int(m.group(2)), "local-" + m.group(3)


@contextlib.contextmanager
def placing(base: str) -> Iterator[collections.Counter]:
    """Held while a new sandbox picks its CPUs and writes its state: yields how many live sandboxes (of every
    process, under ``base``) are pinned to each CPU. Without it, each trampoline placed its sandbox alone
    and 16 concurrent tasks on 2 CPUs could land 10 and 6 (the busier CPU then set the run's wall time)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the base dir itself: no lock file left in it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        in_use: collections.Counter = collections.Counter()
        for root, _, _, _ in entries(base):
            for cpu in (read_state(root) or {}).get("cpus") or ():
                in_use[cpu] += 1
        yield in_use
    finally:
        os.close(fd)  # releases the lock


def find(base: str, sandbox_id: str) -> list[str]:
    """The directories of ``sandbox_id`` under ``base`` (normally one; none for a malformed id)."""
    if not SID_RE.match(sandbox_id or ""):
        return []
    return [root for root, _, _, sid in entries(base) if sid == sandbox_id]


def _argv(pid: str) -> list[str]:
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _cwd(pid: str) -> str:
    try:
        return os.readlink("/proc/%s/cwd" % pid)
    except OSError:
        return ""


def pids_in(roots: list[str]) -> list[int]:
    """Host pids of processes of the sandbox whose directories are ``roots``: its bwrap processes (whose argv
    binds ``root/...``; killing one takes its pid namespace down) and processes working in them."""
    prefixes = tuple(r.rstrip("/") + "/" for r in roots)
    me = str(os.getpid())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        cwd = _cwd(pid) + "/"
        if cwd.startswith(prefixes) or any(a.startswith(prefixes) for a in _argv(pid)):
            found.append(int(pid))
    return found


def kill_processes(roots: list[str], cgroups: list[str]) -> None:
    """SIGKILL everything still running in the sandbox, until nothing is (bounded: about 2 s)."""
    for cg in cgroups:
        limits.kill_cgroup(cg)
    for _ in range(100):
        pids = pids_in(roots)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def mounts_under(root: str) -> list[str]:
    """Mount points at or under ``root`` in this process's view, deepest first."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
    except OSError:
        return []
    prefix = root.rstrip("/")
    return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True)


def unmount(root: str) -> None:
    """Detach whatever is mounted at or under ``root`` (the disk tmpfs, ID-mapped binds), so rmtree never crosses into it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for point in mounts_under(root):
        libc.umount2(point.encode(), MNT_DETACH)


def rmtree(path: str) -> None:
    def fix(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    for _ in range(3):
        shutil.rmtree(path, onerror=fix)
        if not os.path.lexists(path):
            return


def remove(root: str, scan: bool = True) -> bool:
    """Kill what runs in the sandbox at ``root``, then remove its files and cgroups; False if it was not there.
    The directory is first renamed out of the way, so its owner sees at once that the sandbox is gone.
    ``scan=False`` when the caller already killed every process it started (the owner itself)."""
    name = os.path.basename(root)
    if name.startswith(".") and name.endswith(GONE):  # a remover died half-way: finish its work
        doomed, name = root, name[1 : -len(GONE)]
        if not os.path.lexists(doomed):
            return False
    else:
        doomed = os.path.join(os.path.dirname(root), ".%s%s" % (name, GONE))
        try:
            os.rename(root, doomed)
        except FileNotFoundError:
            return False
        except OSError:
            doomed = root
    state = read_state(doomed) or {}
    cgroups = [str(c) for c in state.get("cgroups") or []]
    data = _data_dir(name, state.get("data"))
    if scan:
        kill_processes([os.path.join(os.path.dirname(root), name), doomed] + ([data] if data else []), cgroups)
    else:
        for cg in cgroups:
            limits.kill_cgroup(cg)
    for d in ([data] if data else []) + [doomed]:
        for _ in range(3):  # whatever the state says: a remover may have died before writing it
            if not mounts_under(d):
                break
            unmount(d)
        left = mounts_under(d)
        if left:  # never delete through a mount: a bind shows the launcher's own files
            log.error("sandbox dir %s still has mounts %s; not removing it", d, left)
        else:
            rmtree(d)
    for cg in cgroups:
        limits.remove_cgroup(cg)
    return True


def _data_dir(name: str, data: Any) -> str | None:
    """The sandbox's data dir when it is staged outside its root (only ever ``/tmp/metaflow-sandbox-stage-UID/<name>``)."""
    if not isinstance(data, str):
        return None
    stage, data_name = os.path.split(data)
    if not re.fullmatch(r"/tmp/metaflow-sandbox-stage-\d+", stage) or data_name != name:
        return None
    return data


def half_removed(base: str) -> list[str]:
    """Directories a remover renamed but did not finish removing (it was killed meanwhile)."""
    try:
        return [os.path.join(base, n) for n in os.listdir(base) if n.startswith(".mfsb-") and n.endswith(GONE)]
    except OSError:
        return []
