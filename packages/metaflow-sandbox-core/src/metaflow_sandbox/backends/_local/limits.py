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
from typing import Callable, Mapping, Sequence

# Breaks ties between equally used CPUs; seeded per process (each Metaflow task has its own trampoline).
_next_cpu = count(os.getpid())
_cpu_lock = threading.Lock()


def _reseed_after_fork() -> None:  # the fast path forks its trampolines from one server: seed each anew
    global _next_cpu
    _next_cpu = count(os.getpid())


os.register_at_fork(after_in_child=_reseed_after_fork)


def pick_cpus(cpu: float | None, in_use: Mapping[int, int] | None = None) -> set[int] | None:
    """ceil(cpu) CPUs of those this process may use: the ones the fewest live sandboxes are pinned to
    (``in_use``: CPU -> how many, every process's), ties rotating so concurrent sandboxes spread out."""
    if not cpu or cpu <= 0 or not hasattr(os, "sched_getaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    n = min(len(available), max(1, math.ceil(cpu)))
    if n == len(available):
        return None
    with _cpu_lock:
        start = next(_next_cpu) % len(available)
    load = in_use or {}
    order = sorted(range(len(available)), key=lambda i: (load.get(available[i], 0), (i - start) % len(available)))
    return {available[i] for i in order[:n]}


def memory_cgroup_parent() -> tuple[int, str] | None:
    """(cgroup version, a writable cgroup dir whose children get memory control), or None."""
    return cgroup_parent("memory")


@functools.lru_cache(maxsize=4)
def cgroup_parent(controller: str) -> tuple[int, str] | None:
    """(cgroup version, a writable cgroup dir whose children get ``controller``), or None."""
    v1_mount = v2_mount = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if rfields[0] == "cgroup2" and v2_mount is None:
                    v2_mount = (fields[4], fields[3])
                elif rfields[0] == "cgroup" and controller in rfields[-1].split(","):
                    v1_mount = (fields[4], fields[3])
        with open("/proc/self/cgroup") as f:
            own = dict((ctrl, path) for _, ctrl, path in (ln.rstrip("\n").split(":", 2) for ln in f))
    except (OSError, ValueError, IndexError):
        return None
    v1_path = next((p for c, p in own.items() if controller in c.split(",")), None)
    for version, mount, path in ((1, v1_mount, v1_path), (2, v2_mount, own.get(""))):
        if mount is None or path is None:
            continue
        point, root = mount
        rel = path[len(root) :] if root != "/" and path.startswith(root) else path
        d = os.path.join(point, rel.lstrip("/"))
        # Our own cgroup first; then (v2, where a cgroup holding processes cannot give memory control to
        # children) its ancestors, e.g. the root cgroup when running as root.
        while True:
            if os.path.isdir(d) and os.access(d, os.W_OK) and (version == 1 or _v2_delegated(d, controller)):
                return version, d
            if d.rstrip("/") == point.rstrip("/"):
                break
            d = os.path.dirname(d.rstrip("/"))
    return None


def _v2_delegated(d: str, controller: str) -> bool:
    try:
        with open(os.path.join(d, "cgroup.subtree_control")) as f:
            if controller in f.read().split():
                return True
        with open(os.path.join(d, "cgroup.subtree_control"), "w") as f:
            f.write("+" + controller)
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
    """Our cgroups (name starting with ``prefix``) under this process's memory and pids cgroups."""
    found = []
    for controller in ("memory", "pids"):
        parent = cgroup_parent(controller)
        if parent is None:
            continue
        try:
            found += [os.path.join(parent[1], n) for n in os.listdir(parent[1]) if n.startswith(prefix)]
        except OSError:
            pass
    return sorted(set(found))


_MS_NOSUID, _MS_NODEV = 2, 4


def mount_tmpfs(target: str, size_mb: int, owner: int) -> str | None:
    """Mount a tmpfs of ``size_mb`` owned by ``owner`` at ``target`` (the disk cap); None, or why it failed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    opts = "size=%dm,mode=0700,uid=%d,gid=%d" % (size_mb, owner, owner)
    if libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), opts.encode()) != 0:
        return os.strerror(ctypes.get_errno())
    return None


class PidsCgroup:
    """A cgroup capping how many processes and threads one sandbox may have (``pids.max``)."""

    def __init__(self, path: str):
        self.path = path
        self.procs = os.path.join(path, "cgroup.procs")

    @classmethod
    def create(cls, name: str, limit: int) -> PidsCgroup | None:
        parent = cgroup_parent("pids")
        if parent is None:
            return None
        path = os.path.join(parent[1], name)
        try:
            os.mkdir(path)
        except FileExistsError:  # the memory cgroup itself (cgroup v2: one directory for every controller)
            pass
        except OSError:
            return None
        try:
            _write(os.path.join(path, "pids.max"), str(limit))
        except OSError:
            _rmdir(path)
            return None
        return cls(path)

    def hits(self) -> int:
        """How many forks this cgroup's limit refused so far."""
        try:
            with open(os.path.join(self.path, "pids.events")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0


def preexec(
    cpus: set[int] | None,
    cgroup_procs: Sequence[str],
    rlimit_mb: int | None,
    nproc: int | None = None,
    fsize_mb: int | None = None,
    uid: int | None = None,
    mount_ns: int | None = None,
    foreign_mounts: Sequence[str] = (),
) -> Callable[[], None] | None:
    """What the child runs between fork and exec (only when there is something to apply): join the cgroups,
    pin CPUs, set rlimits, and (root launcher) become the sandbox's own unprivileged uid, last."""
    if cpus is None and not cgroup_procs and rlimit_mb is None and nproc is None and fsize_mb is None and uid is None:
        return None
    from .identity import enter_mount_ns

    drop = [os.fsencode(p) for p in foreign_mounts]  # encoded here: the child should not allocate much

    joins = [_join_target(path) for path in cgroup_procs]

    def apply() -> None:  # no locks or allocations worth mentioning: it runs in a forked child
        for path, value in joins:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, value or str(os.getpid()).encode())
            finally:
                os.close(fd)
        if cpus:
            os.sched_setaffinity(0, cpus)
        if rlimit_mb:
            limit = int(rlimit_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if nproc:  # counts every process of the uid: a pids limit only because the uid is the sandbox's own
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if fsize_mb:
            size = int(fsize_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        if mount_ns is not None or drop:  # where the sandbox's binds are, without other sandboxes' mounts
            enter_mount_ns(mount_ns, drop)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply


def _join_target(procs: str) -> tuple[str, bytes | None]:
    """Where the forked child joins a cgroup, and what it writes (None: its pid).

    cgroup v1 moves the writer's own thread through ``tasks`` with "0" without the kernel's global
    threadgroup lock, whose RCU grace period made every ``cgroup.procs`` write cost ~10 ms
    (docs/performance.md). The forked child has one thread, so that moves the whole process.
    """
    tasks = os.path.join(os.path.dirname(procs), "tasks")
    return (tasks, b"0") if os.path.exists(tasks) else (procs, None)


OOM_MARKERS: Sequence[str] = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
FORK_MARKERS: Sequence[str] = ("Resource temporarily unavailable", "fork: retry", "can't start new thread", "Cannot fork")
