"""Resource limits applied to every process of a sandbox: CPU affinity and a hard memory limit.

Memory uses a cgroup per sandbox (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``) created under the
launcher's own cgroup when that is writable; otherwise RLIMIT_AS per process (weaker: it limits address
space, and a breach is a failed allocation rather than a kill).
"""

from __future__ import annotations

import functools
import math
import os
import resource
import signal
import threading
import time
from itertools import count
from typing import Callable, Sequence

# Seeded per process: each Metaflow task has its own trampoline process, so a fixed start
# would pin every concurrent sandbox to the same CPUs.
_next_cpu = count(os.getpid())
_cpu_lock = threading.Lock()


def pick_cpus(cpu: float | None) -> set[int] | None:
    """ceil(cpu) CPUs of those this process may use, rotating so concurrent sandboxes spread out."""
    if not cpu or cpu <= 0 or not hasattr(os, "sched_getaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    n = min(len(available), max(1, math.ceil(cpu)))
    if n == len(available):
        return None
    with _cpu_lock:
        start = next(_next_cpu) % len(available)
    return {available[(start + i) % len(available)] for i in range(n)}


@functools.lru_cache(maxsize=1)
def memory_cgroup_parent() -> tuple[int, str] | None:
    """(cgroup version, a writable cgroup dir whose children get memory control), or None."""
    v1_mount = v2_mount = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if rfields[0] == "cgroup2" and v2_mount is None:
                    v2_mount = (fields[4], fields[3])
                elif rfields[0] == "cgroup" and "memory" in rfields[-1].split(","):
                    v1_mount = (fields[4], fields[3])
        with open("/proc/self/cgroup") as f:
            own = dict((ctrl, path) for _, ctrl, path in (ln.rstrip("\n").split(":", 2) for ln in f))
    except (OSError, ValueError, IndexError):
        return None
    v1_path = next((p for c, p in own.items() if "memory" in c.split(",")), None)
    for version, mount, path in ((1, v1_mount, v1_path), (2, v2_mount, own.get(""))):
        if mount is None or path is None:
            continue
        point, root = mount
        rel = path[len(root) :] if root != "/" and path.startswith(root) else path
        d = os.path.join(point, rel.lstrip("/"))
        # Our own cgroup first; then (v2, where a cgroup holding processes cannot give memory control to
        # children) its ancestors, e.g. the root cgroup when running as root.
        while True:
            if os.path.isdir(d) and os.access(d, os.W_OK) and (version == 1 or _v2_memory_delegated(d)):
                return version, d
            if d.rstrip("/") == point.rstrip("/"):
                break
            d = os.path.dirname(d.rstrip("/"))
    return None


def _v2_memory_delegated(d: str) -> bool:
    try:
        with open(os.path.join(d, "cgroup.subtree_control")) as f:
            if "memory" in f.read().split():
                return True
        with open(os.path.join(d, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")
        return True
    except OSError:  # not delegated, or processes in the parent ("no internal processes" rule)
        return False


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class MemoryCgroup:
    """A cgroup holding every process of one sandbox, with a hard memory limit."""

    def __init__(self, version: int, path: str):
        self.version = version
        self.path = path
        self.procs = os.path.join(path, "cgroup.procs")

    @classmethod
    def create(cls, name: str, limit_mb: int) -> MemoryCgroup | None:
        parent = memory_cgroup_parent()
        if parent is None:
            return None
        version, base = parent
        path = os.path.join(base, name)
        limit = str(int(limit_mb) * 1024 * 1024)
        try:
            os.mkdir(path)
            if version == 1:
                _write(os.path.join(path, "memory.limit_in_bytes"), limit)
                _optional_write(os.path.join(path, "memory.memsw.limit_in_bytes"), limit)
            else:
                _write(os.path.join(path, "memory.max"), limit)
                _optional_write(os.path.join(path, "memory.swap.max"), "0")
        except OSError:
            _rmdir(path)
            return None
        return cls(version, path)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for hitting this cgroup's limit so far."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            with open(os.path.join(self.path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def kill_all(self) -> None:
        kill_cgroup(self.path)

    def remove(self) -> None:
        remove_cgroup(self.path)


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in the cgroup at ``path`` (any version), including ones forked meanwhile."""
    for _ in range(20):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def remove_cgroup(path: str) -> None:
    kill_cgroup(path)
    for _ in range(50):
        if _rmdir(path):
            return
        time.sleep(0.02)


def _optional_write(path: str, value: str) -> None:
    try:
        _write(path, value)
    except OSError:
        pass


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def stale_cgroups(prefix: str) -> list[str]:
    """Our cgroups (name starting with ``prefix``) under this process's memory cgroup."""
    parent = memory_cgroup_parent()
    if parent is None:
        return []
    try:
        return [os.path.join(parent[1], n) for n in os.listdir(parent[1]) if n.startswith(prefix)]
    except OSError:
        return []


def preexec(cpus: set[int] | None, cgroup: MemoryCgroup | None, rlimit_mb: int | None) -> Callable[[], None] | None:
    """What the child runs between fork and exec (only when there is something to apply)."""
    if cpus is None and cgroup is None and rlimit_mb is None:
        return None
    procs = cgroup.procs if cgroup else None

    def apply() -> None:  # no locks or allocations worth mentioning: it runs in a forked child
        if procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        if cpus:
            os.sched_setaffinity(0, cpus)
        if rlimit_mb:
            limit = int(rlimit_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


OOM_MARKERS: Sequence[str] = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
