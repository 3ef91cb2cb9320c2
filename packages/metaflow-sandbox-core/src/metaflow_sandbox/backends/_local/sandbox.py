"""One local sandbox's host-side state, the registry of this process's sandboxes, and their cleanup.

Sandboxes never outlive this process: ``--die-with-parent`` for processes, atexit and SIGTERM
cleanup, and a sweep of what dead launchers left (directories and cgroups named after their pid).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any, Mapping

from metaflow_sandbox import SandboxError, SandboxHandle, SandboxNotFoundError, SandboxSpec, UnsupportedOptionError

from . import isolation, limits, ondisk, proc
from .mounts import Layout, PathError

NAME = "local"
ENV_ROOT = "METAFLOW_SANDBOX_LOCAL_ROOT"
ENV_MEMORY_LIMITER = "METAFLOW_SANDBOX_LOCAL_MEMORY_LIMITER"
log = logging.getLogger("metaflow_sandbox.local")

try:
    _PIDNS = os.stat("/proc/self/ns/pid").st_ino
except OSError:
    _PIDNS = 0
_live: dict[str, LocalSandbox] = {}
_lock = threading.RLock()  # re-entrant: the SIGTERM handler may run while the main thread holds it
_started = False


class LocalSandbox:
    """Everything one sandbox needs on the host; ``handle.native`` points here."""

    def __init__(self, spec: SandboxSpec, bwrap: str | None):
        self.sid = "local-" + uuid.uuid4().hex[:12]
        self.owner = os.getpid()
        self.name = "mfsb-%d-%d-%s" % (_PIDNS, os.getpid(), self.sid[6:])
        self.root = os.path.join(_base_dir(spec.options), self.name)
        try:
            self.layout = Layout(self.root, spec.binds, isolated=bwrap is not None)
        except PathError:
            raise UnsupportedOptionError(
                "a bind target needs a new directory inside a large read-only system directory",
                hint="bind at an existing path, under /tmp or the work dir, or at a new top-level path (e.g. /data)",
                backend=NAME,
            ) from None
        self.bwrap = bwrap
        self.labels = dict(spec.labels)
        self.memory_mb = spec.resources.memory_mb
        self.cpus = limits.pick_cpus(spec.resources.cpu)
        os.mkdir(self.root, 0o700)
        try:  # the state first: from here on another process can list and destroy this sandbox
            self.state: dict[str, Any] = {"id": self.sid, "owner": self.owner, "labels": self.labels, "workdir": self.layout.workdir}
            self.state["cgroups"] = []
            ondisk.write_state(self.root, self.state)
            self.cgroup, self.rlimit_mb = _memory_limit(self.name, self.memory_mb, spec.options)
            if self.cgroup:
                self.state["cgroups"] = [self.cgroup.path]
                ondisk.write_state(self.root, self.state)
            os.mkdir(os.path.join(self.root, "work"))
            os.mkdir(os.path.join(self.root, "tmp"))
        except BaseException:
            ondisk.remove(self.root, scan=False)
            if getattr(self, "cgroup", None):
                self.cgroup.remove()
            raise
        self.env = {
            "PATH": _path_with_python(),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": self.layout.workdir,
            "TMPDIR": self.layout.tmpdir,
        }
        self.env.update(spec.env)
        self.argv: list[str] = []
        if bwrap:
            self.argv = [bwrap, *self.layout.bwrap_args(), *isolation.ISOLATION_FLAGS]
            self.argv += [] if spec.network else ["--unshare-net"]
            self.argv += ["--hostname", self.sid, "--die-with-parent", "--new-session"]
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.RLock()
        self.destroyed = False
        self.ttl = spec.ttl_seconds
        self.expired = False
        self.timer: threading.Timer | None = None
        if spec.ttl_seconds:
            self.timer = threading.Timer(spec.ttl_seconds, self.expire)
            self.timer.daemon = True
            self.timer.start()
        self.handle = SandboxHandle(
            NAME, self.sid, workdir=self.layout.workdir, labels=self.labels, options=dict(spec.options), native=self
        )

    def expire(self) -> None:
        self.expired = True
        self.destroy()

    def gone(self, what: str = "is gone") -> SandboxNotFoundError:
        why = "its ttl of %ss expired" % self.ttl if self.expired else "it was destroyed"
        return SandboxNotFoundError(
            "sandbox %s %s (%s)" % (self.sid, what, why),
            hint="create a new sandbox" + ("; raise ttl_seconds if it expired too early" if self.expired else ""),
            backend=NAME,
            sandbox_id=self.sid,
        )

    def track(self, p: subprocess.Popen) -> None:
        with self.lock:
            self.running.add(p)
            dead = self.destroyed
        if dead:  # destroyed between our check and the start of the process
            proc.kill_group(p)

    def destroy(self) -> bool:
        """Kill every process, remove the files and the cgroup. False if already destroyed."""
        with self.lock:
            if self.destroyed:
                return False
            self.destroyed = True
            running = list(self.running)
        with _lock:
            _live.pop(self.sid, None)
        if self.timer:
            self.timer.cancel()
        for p in running:
            proc.kill_group(p)
        if self.cgroup:
            self.cgroup.kill_all()
        for p in running:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("process %d of sandbox %s did not die within 5s", p.pid, self.sid)
        ondisk.remove(self.root, scan=False)
        return True


def _path_with_python() -> str:
    """The launcher's PATH, with this Python's bin dir first so ``python`` inside is the launcher's."""
    path = os.environ.get("PATH", os.defpath)
    bindir = os.path.dirname(sys.executable)
    if bindir and bindir not in path.split(os.pathsep):
        path = bindir + os.pathsep + path
    return path


def _base_dir(options: Mapping[str, Any]) -> str:
    base = options.get("root") or options.get("root_dir") or os.environ.get(ENV_ROOT)  # option "root" = METAFLOW_SANDBOX_LOCAL_ROOT
    base = base or os.path.join(tempfile.gettempdir(), "metaflow-sandbox-%d" % os.getuid())
    os.makedirs(base, mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        raise SandboxError(
            "the local sandbox directory %s is not a directory owned by you" % base,
            hint="remove it, or point %s (option root) at a private directory" % ENV_ROOT,
            backend=NAME,
        )
    return str(base)


def _memory_limit(name: str, memory_mb: int | None, options: Mapping[str, Any]) -> tuple[Any, int | None]:
    """(cgroup, None) for a hard limit; (None, MB) for the RLIMIT_AS fallback; (None, None) for no limit."""
    if not memory_mb:
        return None, None
    limiter = str(options.get("memory_limiter") or os.environ.get(ENV_MEMORY_LIMITER) or "auto").lower()
    if limiter != "rlimit":
        cgroup = limits.MemoryCgroup.create(name, memory_mb)
        if cgroup is not None:
            return cgroup, None
        if limiter == "cgroup":
            raise SandboxError(
                "memory_limiter=cgroup was requested but no writable memory cgroup is available",
                hint="delegate a cgroup to this user (systemd-run --user --scope -p Delegate=yes ...) or unset %s" % ENV_MEMORY_LIMITER,
                backend=NAME,
            )
        _warn_rlimit_once()
    return None, memory_mb


_rlimit_warned = False


def _warn_rlimit_once() -> None:
    global _rlimit_warned
    if not _rlimit_warned:
        _rlimit_warned = True
        log.warning(
            "metaflow-sandbox: no writable memory cgroup here; the local backend's memory limit is enforced "
            "as an address-space limit (RLIMIT_AS), which is less exact. Fix: run under a delegated cgroup "
            "(systemd-run --user --scope -p Delegate=yes ...)."
        )


def lookup(handle: SandboxHandle) -> LocalSandbox | None:
    return handle.native if isinstance(handle.native, LocalSandbox) else _live.get(handle.sandbox_id)


def live_sandbox(handle: SandboxHandle) -> LocalSandbox:
    """The sandbox behind ``handle``, or SandboxNotFoundError."""
    sb = lookup(handle)
    if sb is None:
        raise SandboxNotFoundError(
            "sandbox %s does not exist in this process" % handle.sandbox_id,
            hint="local sandboxes live only as long as the process that created them; create a new one",
            backend=NAME,
            sandbox_id=handle.sandbox_id,
        )
    if sb.destroyed:
        raise sb.gone()
    return sb


def start_once(options: Mapping[str, Any]) -> None:
    """First create in this process: sweep what dead launchers left, and arrange our own cleanup."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    sweep(options)
    atexit.register(destroy_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def sweep(options: Mapping[str, Any]) -> None:
    """Remove what owners that died without cleaning up left: sandboxes (processes included), cgroups."""
    base = _base_dir(options)
    for root, pidns, pid, _ in list(ondisk.entries(base)):
        if pidns == _PIDNS and not _alive(pid):
            ondisk.remove(root)
    for doomed in ondisk.half_removed(base):
        ondisk.remove(doomed)
    for path in limits.stale_cgroups("mfsb-"):
        m = ondisk.DIR_RE.match(os.path.basename(path))
        if m and int(m.group(1)) == _PIDNS and not _alive(int(m.group(2))):
            limits.remove_cgroup(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _on_sigterm(signum: int, frame: Any) -> None:
    destroy_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def destroy_elsewhere(handle: SandboxHandle) -> bool:
    """Destroy a sandbox this process did not create (its owner may be dead), found by its id under the
    base dir of ``handle.options``: kill its processes, remove its files and cgroups. False if none is there."""
    removed = [ondisk.remove(root) for root in ondisk.find(_base_dir(handle.options), handle.sandbox_id)]
    return any(removed)


def other_sandboxes(options: Mapping[str, Any]) -> list[SandboxHandle]:
    """Handles (without ``native``) of the sandboxes under the base dir that this process does not own."""
    found = []
    for root, _, _, sid in ondisk.entries(_base_dir(options)):
        state = ondisk.read_state(root)
        if sid in _live or state is None:  # ours, or not yet described (its creator writes that first)
            continue
        labels = state.get("labels") if isinstance(state.get("labels"), dict) else {}
        workdir = str(state.get("workdir") or "/tmp")
        found.append(SandboxHandle(NAME, sid, workdir=workdir, labels=labels, options=dict(options)))
    return found


def register(sb: LocalSandbox) -> None:
    with _lock:
        _live[sb.sid] = sb


def live_sandboxes() -> list[LocalSandbox]:
    with _lock:
        return list(_live.values())


def destroy_all() -> int:
    """Destroy every live sandbox of this process; returns how many."""
    with _lock:  # a forked child inherits the registry, but not the sandboxes: leave them to the parent
        live = [sb for sb in _live.values() if sb.owner == os.getpid()]
    return sum(sb.destroy() for sb in live)
