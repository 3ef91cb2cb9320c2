"""The embedded default backend: namespace-isolated sandboxes on this machine, made with bubblewrap.

A sandbox is a directory on the host (``work/`` and ``tmp/``) plus limits; each exec is one ``bwrap``
run (fresh user/pid/ipc/uts/cgroup/mount namespaces, host read-only, homes hidden, ``work/`` at
``handle.workdir``), so the sandbox behaves like one machine whose processes end with their exec.
Where bwrap cannot run, commands run as plain subprocesses in the sandbox directory (said once, loudly).
Sandboxes never outlive this process: ``--die-with-parent``, atexit/SIGTERM cleanup, and a sweep of
directories left by dead launchers.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any, Mapping, Sequence

from metaflow_sandbox import (
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    OutputCallback,
    SandboxError,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
    UnsupportedOptionError,
    UploadItem,
    hookimpl,
)

from ._local import isolation, limits, proc
from ._local.mounts import RW, Layout, PathError

NAME = "local"
ENV_ROOT = "METAFLOW_SANDBOX_LOCAL_ROOT"
ENV_MEMORY_LIMITER = "METAFLOW_SANDBOX_LOCAL_MEMORY_LIMITER"
CHUNK = 1 << 20
log = logging.getLogger("metaflow_sandbox.local")

try:
    _PIDNS = os.stat("/proc/self/ns/pid").st_ino
except OSError:
    _PIDNS = 0
_DIR_RE = re.compile(r"^mfsb-(\d+)-(\d+)-")
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
        os.makedirs(os.path.join(self.root, "work"))
        os.mkdir(os.path.join(self.root, "tmp"))
        try:
            self.layout = Layout(self.root, spec.binds, isolated=bwrap is not None)
        except PathError:
            _rmtree(self.root)
            raise UnsupportedOptionError(
                "a bind target needs a new directory inside a large read-only system directory",
                hint="bind at an existing path, under /tmp or the work dir, or at a new top-level path (e.g. /data)",
                backend=NAME,
            ) from None
        self.bwrap = bwrap
        self.labels = dict(spec.labels)
        self.memory_mb = spec.resources.memory_mb
        self.cpus = limits.pick_cpus(spec.resources.cpu)
        self.cgroup, self.rlimit_mb = _memory_limit(self.name, self.memory_mb, spec.options)
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
        _rmtree(self.root)
        if self.cgroup:
            self.cgroup.remove()
        return True


def _path_with_python() -> str:
    """The launcher's PATH, with this Python's bin dir first so ``python`` inside is the launcher's."""
    path = os.environ.get("PATH", os.defpath)
    bindir = os.path.dirname(sys.executable)
    if bindir and bindir not in path.split(os.pathsep):
        path = bindir + os.pathsep + path
    return path


def _base_dir(options: Mapping[str, Any]) -> str:
    base = options.get("root_dir") or os.environ.get(ENV_ROOT)
    base = base or os.path.join(tempfile.gettempdir(), "metaflow-sandbox-%d" % os.getuid())
    os.makedirs(base, mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        raise SandboxError(
            "the local sandbox directory %s is not a directory owned by you" % base,
            hint="remove it, or point %s (or options root_dir) at a private directory" % ENV_ROOT,
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


def _rmtree(path: str) -> None:
    def fix(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    for _ in range(3):
        shutil.rmtree(path, onerror=fix)
        if not os.path.exists(path):
            return


def _sandbox(handle: SandboxHandle) -> LocalSandbox:
    sb = handle.native if isinstance(handle.native, LocalSandbox) else _live.get(handle.sandbox_id)
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


def _start_once(options: Mapping[str, Any]) -> None:
    """First create in this process: sweep what dead launchers left, and arrange our own cleanup."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    base = _base_dir(options)
    stale = [os.path.join(base, n) for n in os.listdir(base)] + limits.stale_cgroups("mfsb-")
    for path in stale:
        m = _DIR_RE.match(os.path.basename(path))
        if m and int(m.group(1)) == _PIDNS and not _alive(int(m.group(2))):
            if path.startswith(base):
                _rmtree(path)
            else:
                limits.MemoryCgroup(0, path).remove()
    atexit.register(destroy_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


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


def destroy_all() -> int:
    """Destroy every live sandbox of this process; returns how many."""
    with _lock:  # a forked child inherits the registry, but not the sandboxes: leave them to the parent
        live = [sb for sb in _live.values() if sb.owner == os.getpid()]
    return sum(sb.destroy() for sb in live)


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        gpu=False,
        max_cpu=float(os.cpu_count() or 1),
        network_toggle=True,
        binds=True,
        images=False,
        shares_host_filesystem=True,
        config_env=(isolation.ENV_ISOLATION, isolation.ENV_BWRAP, ENV_ROOT, ENV_MEMORY_LIMITER),
    )


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    return True


@hookimpl
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    if spec.image:
        raise UnsupportedOptionError(
            "the 'local' backend runs on this machine's own system and cannot use image %r" % spec.image,
            hint="remove image=..., or pick a backend with images (daytona, e2b)",
            backend=NAME,
            op="sandbox_create",
        )
    bwrap = isolation.select(spec.options)
    _check_binds(spec, isolated=bwrap is not None)
    _start_once(spec.options)
    sb = LocalSandbox(spec, bwrap)
    with _lock:
        _live[sb.sid] = sb
    return sb.handle


def _check_binds(spec: SandboxSpec, isolated: bool) -> None:
    if not spec.network and not isolated:
        raise UnsupportedOptionError("network=False needs bubblewrap, which cannot run here", hint=isolation.FIX, backend=NAME)
    for b in spec.binds:
        if not os.path.isabs(b.source) or not os.path.isabs(b.dest) or ".." in b.dest.split("/"):
            raise UnsupportedOptionError("bind %s -> %s: paths must be absolute" % (b.source, b.dest), backend=NAME)
        if not os.path.exists(b.source):
            raise UnsupportedOptionError(
                "bind source %s does not exist" % b.source, hint="create it first, or remove the bind", backend=NAME
            )
        if not isolated and os.path.realpath(b.dest) != os.path.realpath(b.source):
            raise UnsupportedOptionError(
                "bind %s -> %s needs bubblewrap (without it only same-path binds work)" % (b.source, b.dest),
                hint=isolation.FIX,
                backend=NAME,
            )


@hookimpl
def sandbox_exec(
    handle: SandboxHandle,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    timeout: float | None,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
) -> ExecResult:
    sb = _sandbox(handle)
    full_env = {**sb.env, **(env or {})}
    if not command:
        raise SandboxError("empty command", hint="pass an argv list such as ['echo', 'hi']", backend=NAME)
    cwd = os.path.join(sb.layout.workdir, cwd) if cwd else sb.layout.workdir  # a relative cwd is under workdir
    if sb.bwrap:
        argv, host_cwd = [*sb.argv, "--chdir", cwd, "--", *command], sb.root
    else:
        argv, host_cwd = list(command), cwd
    watch = _StderrWatch(on_stderr)
    oom_before = sb.cgroup.oom_kills() if sb.cgroup else 0
    try:
        code = proc.run(
            argv,
            full_env,
            host_cwd,
            timeout,
            on_stdout,
            watch,
            limits.preexec(sb.cpus, sb.cgroup, sb.rlimit_mb),
            started=sb.track,
        )
    except proc.Timeout:
        raise SandboxTimeoutError(
            "command %s ran longer than its timeout of %ss and was killed" % (list(command)[:3], timeout),
            hint="raise timeout= (or @timeout on the step)",
            backend=NAME,
            sandbox_id=sb.sid,
        ) from None
    except OSError as exc:  # fallback mode: the command or cwd does not exist
        code = 126 if isinstance(exc, PermissionError) else 127
        watch("%s: %s\n" % (list(command)[0] if command else "", exc.strerror or exc))
    finally:
        with sb.lock:
            sb.running = {p for p in sb.running if p.poll() is None}
    if sb.destroyed:
        raise sb.gone("went away while the command ran")
    if sb.bwrap and code == 1 and watch.head.startswith("bwrap: execvp"):
        code = 126 if "Permission denied" in watch.head else 127  # the shell's codes for these
    oom = False
    if sb.cgroup:
        oom = code != 0 and sb.cgroup.oom_kills() > oom_before
    elif sb.rlimit_mb:
        oom = code != 0 and watch.saw_oom
    if oom:
        mb = sb.memory_mb or 0
        watch(
            "\nmetaflow-sandbox: the command hit the sandbox memory limit of %d MB and was killed.\n"
            "  Fix: raise it with memory=... (e.g. @sandbox(memory=%d)) or @resources(memory=%d).\n" % (mb, mb * 2, mb * 2)
        )
    return ExecResult(exit_code=code, oom_killed=oom)


class _StderrWatch:
    """Passes stderr through, keeping its start (bwrap's own errors) and noticing allocation failures."""

    def __init__(self, callback: OutputCallback | None):
        self.callback = callback
        self.head = ""
        self.saw_oom = False

    def __call__(self, text: str) -> None:
        if len(self.head) < 200:
            self.head += text[:200]
        if not self.saw_oom and any(m in text for m in limits.OOM_MARKERS):
            self.saw_oom = True
        if self.callback:
            self.callback(text)


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    sb = _sandbox(handle)
    return [FileResult(item.path, error=_upload_one(sb, item)) for item in files]  # type: ignore[arg-type]


def _upload_one(sb: LocalSandbox, item: UploadItem) -> str | None:
    try:
        _, host, kind = sb.layout.resolve(item.path)
        if host is None or kind != RW:
            return "permission_denied"
        if os.path.isdir(host):
            return "is_directory"
        os.makedirs(os.path.dirname(host), exist_ok=True)
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted by the sandbox
            os.close(fd)
            return "permission_denied"
        os.ftruncate(fd, 0)
        with open(fd, "wb") as out:
            if item.source is not None:
                with open(item.source, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)
            else:
                out.write(item.content or b"")
        return None
    except PathError as exc:
        return exc.code
    except OSError as exc:
        return _file_error(exc)


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    sb = _sandbox(handle)
    return [_download_one(sb, item) for item in files]


def _download_one(sb: LocalSandbox, item: DownloadItem) -> FileResult:
    try:
        _, host, _ = sb.layout.resolve(item.path)
        if host is None or not os.path.lexists(host):
            return FileResult(item.path, error="file_not_found")
        if os.path.isdir(host):
            return FileResult(item.path, error="is_directory")
        with open(os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):  # never block on a FIFO planted by the sandbox
                return FileResult(item.path, error="permission_denied")
            if item.destination is None:
                return FileResult(item.path, content=src.read())
            with open(item.destination, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        return FileResult(item.path)
    except PathError as exc:
        return FileResult(item.path, error=exc.code)  # type: ignore[arg-type]
    except OSError as exc:
        return FileResult(item.path, error=_file_error(exc))  # type: ignore[arg-type]


def _file_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file_not_found"
    if isinstance(exc, IsADirectoryError):
        return "is_directory"
    if isinstance(exc, NotADirectoryError):
        return "invalid_path"
    return "permission_denied"


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    sb = handle.native if isinstance(handle.native, LocalSandbox) else _live.get(handle.sandbox_id)
    return sb.destroy() if sb is not None else False


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    with _lock:
        live = list(_live.values())
    return [sb.handle for sb in live if all(sb.labels.get(k) == v for k, v in labels.items())]
