"""One local sandbox's host-side state, the registry of this process's sandboxes, and their cleanup.

Sandboxes never outlive this process: ``--die-with-parent`` for processes, atexit and SIGTERM
cleanup, and a sweep of what dead launchers left (directories and cgroups named after their pid).
Everything another process needs to destroy one is on disk (``ondisk.py``).
"""

from __future__ import annotations

import atexit
import logging
import os
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any, Mapping

from metaflow_sandbox import SandboxError, SandboxHandle, SandboxNotFoundError, SandboxSpec, UnsupportedOptionError
from metaflow_sandbox.signals import cleanup_on_sigterm

from . import identity, isolation, limits, ondisk, proc
from . import options as options_
from .mounts import Layout, PathError, reexposed

NAME = "local"
ENV_ROOT = "METAFLOW_SANDBOX_LOCAL_ROOT"
ENV_MEMORY_LIMITER = "METAFLOW_SANDBOX_LOCAL_MEMORY_LIMITER"
log = logging.getLogger("metaflow_sandbox.local")

try:
    _PIDNS = os.stat("/proc/self/ns/pid").st_ino
except OSError:
    _PIDNS = 0
_live: dict[str, LocalSandbox] = {}
_dying: set[LocalSandbox] = set()
_lock = threading.RLock()  # re-entrant: the SIGTERM handler may run while the main thread holds it
_started = False


class LocalSandbox:
    """Everything one sandbox needs on the host; ``handle.native`` points here."""

    def __init__(self, spec: SandboxSpec, bwrap: str | None):
        self.sid = "local-" + uuid.uuid4().hex[:12]
        self.owner = os.getpid()
        self.name = "mfsb-%d-%d-%s" % (_PIDNS, os.getpid(), self.sid[6:])
        base = self.base = _base_dir(spec.options)
        self.root = os.path.join(base, self.name)
        self.uid = _sandbox_uid(bwrap)  # None: the processes are the launcher's uid (mapped, without capabilities)
        # Where work/, tmp/ and the mapped binds live: next to the state, unless the sandbox's uid cannot reach
        # the root (e.g. TMPDIR in a 0700 dir); then in a root-owned, world-searchable stage under /tmp.
        self.data = self.root
        if self.uid is not None and not identity.world_reachable(os.path.dirname(os.path.abspath(base)), read=False):
            self.data = os.path.join(identity.stage_dir(ENV_ROOT), self.name)
        try:
            self.layout = Layout(os.path.join(self.data, "disk"), spec.binds, isolated=bwrap is not None, hide=[base])
        except PathError:
            raise UnsupportedOptionError(
                "a bind target needs a new directory inside a large read-only system directory",
                hint="bind at an existing path, under /tmp or the work dir, or at a new top-level path (e.g. /data)",
                backend=NAME,
            ) from None
        self.layout.owner = self.uid
        self.bwrap = bwrap
        self.labels = dict(spec.labels)
        self.memory_mb = spec.resources.memory_mb
        self.pids_limit = options_.pids_limit(spec.options)
        self.disk_mb = options_.disk_mb(spec.options, spec.resources.disk_mb)
        self.cgroup: limits.MemoryCgroup | None = None
        self.pids: limits.PidsCgroup | None = None
        self.rlimit_mb: int | None = None
        self.disk_capped = False  # True: work/ and /tmp live on a tmpfs of disk_mb (else only files are capped)
        self.mount_ns: int | None = None  # fd of the private mount namespace holding the binds (root launcher)
        if self.uid is not None and self.data == self.root and os.stat(base).st_mode & 0o711 != 0o711:
            os.chmod(base, 0o711)  # the sandbox's uid must reach its own dir; names stay unlistable
        # The state first: from here on another process can list and destroy this sandbox. It says which
        # CPUs this one is pinned to, so the next sandbox picks others.
        with ondisk.placing(base) as in_use:
            self.cpus = limits.pick_cpus(spec.resources.cpu, in_use)
            os.mkdir(self.root, 0o700)
            self.state: dict[str, Any] = {"id": self.sid, "owner": self.owner, "labels": self.labels, "workdir": self.layout.workdir}
            self.state.update(cgroups=[], uid=self.uid, mounted=False, data=self.data, cpus=sorted(self.cpus or ()))
            try:
                ondisk.write_state(self.root, self.state)
            except BaseException:
                ondisk.remove(self.root, scan=False)
                raise
        try:
            if self.data != self.root:
                os.mkdir(self.data, 0o700)
            self._make_cgroups(spec.options)
            self._make_disk()
            if self.uid is not None:
                self._map_sources()
        except BaseException:
            ondisk.remove(self.root, scan=False)
            self._close_mount_ns()
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
            if self.uid is not None:  # a user namespace for sure, its one user being the sandbox's own uid
                self.argv[self.argv.index("--unshare-user-try")] = "--unshare-user"
                self.argv += ["--uid", str(identity.INSIDE_ID), "--gid", str(identity.INSIDE_ID)]
                self.argv += ["--disable-userns"]  # no nested user namespaces: less kernel surface from inside
            self.argv += [] if spec.network else ["--unshare-net"]
            self.argv += ["--hostname", self.sid, "--die-with-parent", "--new-session"]
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.RLock()
        self.destroyed = False
        self.torn_down = threading.Event()  # set once destroy() has removed everything
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

    def _save(self) -> None:
        ondisk.write_state(self.root, self.state)

    def _make_cgroups(self, options: Mapping[str, Any]) -> None:
        self.cgroup, self.rlimit_mb = _memory_limit(self.name, self.memory_mb, options)
        if self.cgroup:
            self.state["cgroups"].append(self.cgroup.path)
            self._save()
        if self.uid is None:  # with its own uid, RLIMIT_NPROC is the sandbox's pids limit; else a pids cgroup
            self.pids = limits.PidsCgroup.create(self.name, self.pids_limit)
            if self.pids and self.pids.path not in self.state["cgroups"]:
                self.state["cgroups"].append(self.pids.path)
                self._save()
            if self.pids is None:
                _warn_once("pids", "no writable pids cgroup here: the pids limit (%s) is not enforced" % options_.ENV_PIDS_LIMIT)

    def _make_disk(self) -> None:
        """work/ and tmp/ on a tmpfs of disk_mb when the launcher may mount (root); else plain dirs."""
        disk = self.layout.root
        os.mkdir(disk, 0o700)
        if identity.is_root():
            self.state["mounted"] = True
            self._save()
            err = limits.mount_tmpfs(disk, self.disk_mb, self.uid if self.uid is not None else 0)
            if err:
                _warn_once("disk", "cannot mount a tmpfs for the sandbox's disk cap (%s): only single files are capped" % err)
            self.disk_capped = not err
        for d in (self.layout.host_work, self.layout.host_tmp):
            os.mkdir(d, 0o700)
        for d in (self.data, disk, self.layout.host_work, self.layout.host_tmp):
            if self.uid is not None:
                os.chown(d, self.uid, self.uid)

    def _map_sources(self) -> None:
        """ID-mapped binds, attached only in a private mount namespace that bwrap enters, so the sandbox's uid
        reads and writes them as the launcher; and read-only plain binds of re-exposed paths the sandbox's uid
        cannot reach: in that namespace too when there is one, else on the host (no namespace to make: a sandbox
        without binds costs no fork). Every mount on the host is one more for each other sandbox's namespace
        to drop, and each drop waits for the kernel (docs/performance.md)."""
        assert self.uid is not None
        wanted = [(b.source, b.read_only, True) for b in self.layout.binds]
        wanted += [(d, True, False) for d in reexposed() if not identity.world_reachable(d)]  # e.g. a Python under /root
        if not wanted:
            return
        mnt = os.path.join(self.data, "mnt")
        os.mkdir(mnt, 0o755)
        ns = identity.userns_fd(self.uid) if self.layout.binds else None  # a few ms: only binds need the mapping
        trees: list[tuple[int, str]] = []
        try:
            for i, (source, read_only, mapped) in enumerate(wanted):
                if source in self.layout.sources:
                    continue
                target = os.path.join(mnt, str(i))
                if os.path.isdir(source):
                    os.mkdir(target)
                else:
                    open(target, "w").close()
                try:
                    tree = identity.detached_bind(source, ns if mapped else None, read_only)
                    if ns is not None:
                        trees.append((tree, target))
                    else:
                        self.state["mounted"] = True  # from here on, removal detaches it
                        self._save()
                        try:
                            identity.attach(tree, target)
                        finally:
                            os.close(tree)
                except OSError as exc:
                    raise SandboxError(
                        "cannot give the sandbox's own user access to %s: %s" % (source, exc),
                        hint="move it to a local filesystem (ID-mapped mounts need ext4, xfs, btrfs or tmpfs), "
                        "or run the launcher as a non-root user",
                        backend=NAME,
                    ) from None
                self.layout.sources[source] = target
            if trees:
                self.mount_ns = identity.private_mount_ns(trees, self._foreign_mounts())
        finally:
            for tree, _ in trees:
                os.close(tree)
            if ns is not None:
                os.close(ns)

    def preexec(self) -> Any:
        """What each exec's child applies before bwrap starts (cgroups, CPUs, rlimits, then the sandbox's uid)."""
        procs = [cg.procs for cg in (self.cgroup, self.pids) if cg is not None]
        return limits.preexec(
            self.cpus,
            sorted(set(procs)),
            self.rlimit_mb,
            nproc=self.pids_limit if self.uid is not None else None,
            fsize_mb=None if self.disk_capped else self.disk_mb,
            uid=self.uid,
            mount_ns=self.mount_ns,
            # A private namespace dropped them when it was made, and later mounts on the host never reach it
            # (private propagation): dropping them again copied the mount table and cost each exec a wait per mount.
            foreign_mounts=[] if self.mount_ns is not None else self._foreign_mounts(),
        )

    def _foreign_mounts(self) -> list[str]:
        """Other sandboxes' mounts (tmpfs disks, clones) on the host, for the exec's namespace to drop (root only)."""
        if not identity.is_root() or not self.bwrap:
            return []
        mine = self.data.rstrip("/") + "/"
        found = ondisk.mounts_under(self.base) + ondisk.mounts_under(identity.STAGE_PREFIX + str(os.getuid()))
        return [p for p in found if not p.startswith(mine)]

    def disk_full(self) -> bool:
        """Whether the sandbox's writable space is (nearly) full: a 'No space left' was ours, not a bind's."""
        if not self.disk_capped:
            return False
        try:
            st = os.statvfs(self.layout.root)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < max(1 << 20, st.f_blocks * st.f_frsize // 100)

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
                dying = True
            else:
                dying, self.destroyed = False, True
                running = list(self.running)
        if dying:  # e.g. the ttl timer is removing it: wait, or the process may exit with its directory half-removed
            self.torn_down.wait(30)
            return False
        try:
            self._teardown(running)
        finally:
            self.torn_down.set()
        return True

    def _teardown(self, running: list[subprocess.Popen]) -> None:
        with _lock:
            _live.pop(self.sid, None)
            _dying.add(self)  # until removed: an exiting process waits for it (e.g. a ttl timer's teardown)
        try:
            self._remove(running)
        finally:
            with _lock:
                _dying.discard(self)

    def _remove(self, running: list[subprocess.Popen]) -> None:
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
        self._close_mount_ns()

    def _close_mount_ns(self) -> None:
        if self.mount_ns is not None:  # the binds go with the namespace once its bwraps are gone too
            os.close(self.mount_ns)
            self.mount_ns = None


def _sandbox_uid(bwrap: str | None) -> int | None:
    """A fresh unprivileged uid for a root launcher's sandbox; None when not root, not isolated, or impossible
    here (said once, loudly: then the step runs as root without capabilities and root-only files are readable)."""
    if bwrap is None or not identity.is_root():
        return None
    why = identity.why_no_own_uid(bwrap)
    if why is None:
        return identity.new_uid()
    _warn_once(
        "uid",
        "the launcher is root and sandboxes cannot get their own unprivileged user here (%s): steps run as root "
        "without capabilities and CAN READ root-only files such as /etc/shadow. Fix: run the launcher as a "
        "non-root user, or allow unprivileged user namespaces and ID-mapped mounts (Linux >= 5.12)" % why,
    )
    return None


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("metaflow-sandbox: %s", msg)


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
    limiter = options_.memory_limiter(options)
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
        _warn_once(
            "rlimit",
            "no writable memory cgroup here; the local backend's memory limit is enforced as an address-space "
            "limit (RLIMIT_AS), which is less exact. Fix: run under a delegated cgroup (systemd-run --user --scope -p Delegate=yes ...).",
        )
    return None, memory_mb


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
    cleanup_on_sigterm(destroy_all)


def sweep(options: Mapping[str, Any]) -> None:
    """Remove what owners that died without cleaning up left: sandboxes (processes included), cgroups."""
    _sweep_dir(_base_dir(options))
    if identity.is_root():  # data dirs staged for a dead owner whose state dir went away with it (e.g. a test's tmp dir)
        _sweep_dir(identity.STAGE_PREFIX + str(os.getuid()))
    for path in limits.stale_cgroups("mfsb-"):
        m = ondisk.DIR_RE.match(os.path.basename(path))
        if m and int(m.group(1)) == _PIDNS and not _alive(int(m.group(2))):
            limits.remove_cgroup(path)


def _sweep_dir(base: str) -> None:
    for root, pidns, pid, _ in list(ondisk.entries(base)):
        if pidns == _PIDNS and not _alive(pid):
            ondisk.remove(root)
    for doomed in ondisk.half_removed(base):  # its remover died half-way (its owner too: else it may still be at it)
        m = ondisk.DIR_RE.match(os.path.basename(doomed)[1 : -len(ondisk.GONE)])
        if m and int(m.group(1)) == _PIDNS and not _alive(int(m.group(2))):
            ondisk.remove(doomed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


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
        raw = state.get("labels")
        labels = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
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
    """Destroy every live sandbox of this process, and wait for those another thread is destroying."""
    with _lock:  # a forked child inherits the registry, but not the sandboxes: leave them to the parent
        live = [sb for sb in _live.values() if sb.owner == os.getpid()]
        dying = [sb for sb in _dying if sb.owner == os.getpid()]
    count = sum(sb.destroy() for sb in live)
    for sb in dying:
        sb.torn_down.wait(30)
    return count
