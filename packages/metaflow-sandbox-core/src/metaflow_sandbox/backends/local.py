"""The embedded default backend: namespace-isolated sandboxes on this machine, made with bubblewrap.

A sandbox is a directory on the host (``sandbox.json``, ``work/`` and ``tmp/``) plus limits; each exec
is one ``bwrap`` run (fresh user/pid/ipc/uts/cgroup/mount namespaces, host read-only, homes and the
sandbox root hidden, ``work/`` at ``handle.workdir``), so the sandbox behaves like one machine whose
processes end with their exec. A root launcher's sandbox runs as its own unprivileged uid, on a
size-capped tmpfs, with a pids limit (see ``_local/identity.py`` and ``_local/limits.py``).
Where bwrap cannot run, commands run as plain subprocesses in the sandbox directory (said once, loudly).
Sandboxes never outlive their owner: ``--die-with-parent``, atexit/SIGTERM cleanup, destroy by id from
any process (the lifeline's reaper, ``metaflow-sandbox gc``), and a sweep of what dead owners left.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from typing import Any, Mapping, Sequence

from metaflow_sandbox import (
    Bind,
    Capabilities,
    DownloadItem,
    EnvironmentSpec,
    ExecResult,
    FileResult,
    OutputCallback,
    PreparedEnvironment,
    SandboxError,
    SandboxHandle,
    SandboxSpec,
    SandboxTimeoutError,
    UnsupportedOptionError,
    UploadItem,
    hookimpl,
)

from ._local import environments as environments_
from ._local import files as files_
from ._local import identity, isolation, limits, proc
from ._local import options as options_
from ._local.mounts import PathError
from ._local.sandbox import (
    ENV_MEMORY_LIMITER,
    ENV_ROOT,
    NAME,
    LocalSandbox,
    destroy_all,
    destroy_elsewhere,
    live_sandbox,
    live_sandboxes,
    lookup,
    other_sandboxes,
    register,
    start_once,
    sweep,
)

__all__ = ["NAME", "LocalSandbox", "destroy_all"]

#: Longest a prepared environment's pip install may take (its sandbox's lifetime).
BUILD_TTL = 3600.0


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        gpu=False,
        max_cpu=float(os.cpu_count() or 1),
        max_memory_mb=_physical_memory_mb(),
        network_toggle=True,
        binds=True,
        images=False,
        shares_host_filesystem=True,
        enforces_limits=True,  # CPU affinity; a memory cgroup, else RLIMIT_AS (both end an over-limit command)
        config_env=(
            isolation.ENV_ISOLATION,
            isolation.ENV_BWRAP,
            ENV_ROOT,
            ENV_MEMORY_LIMITER,
            options_.ENV_PIDS_LIMIT,
            options_.ENV_DISK_MB,
        ),
    )


def _physical_memory_mb() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return None


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    options_.check(options)  # at launch: a typo in a setting is refused before any task starts
    # The once-per-process probes (bwrap works, a root launcher's sandboxes get their own uid; ~50 ms), now:
    # a fork server that checks its backends once hands every forked task the answers.
    bwrap = isolation.select(options)
    if bwrap is not None and identity.is_root():
        identity.why_no_own_uid(bwrap)
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
    options_.check(spec.options)
    options_.disk_mb(spec.options, spec.resources.disk_mb)
    if spec.environment:
        spec = _with_environment(spec)
    _check_env(spec.env, [])
    bwrap = isolation.select(spec.options)
    _check_binds(spec, isolated=bwrap is not None)
    start_once(spec.options)
    sb = LocalSandbox(spec, bwrap)
    register(sb)
    return sb.handle


def _with_environment(spec: SandboxSpec) -> SandboxSpec:
    """A prepared environment: its directory bound read-only and first on PYTHONPATH."""
    path = environments_.check_ref(spec.environment or "")
    python_path = os.pathsep.join(p for p in (path, spec.env.get("PYTHONPATH", "")) if p)
    return dataclasses.replace(spec, binds=(*spec.binds, Bind(path, read_only=True)), env={**spec.env, "PYTHONPATH": python_path})


@hookimpl
def sandbox_environment_prepare(environment: EnvironmentSpec, on_log: OutputCallback | None) -> PreparedEnvironment:
    return environments_.prepare(environment, on_log, _build_runner(environment.options))


def _build_runner(options: Mapping[str, Any]) -> environments_.Runner:
    """pip in a local sandbox of its own: network on, only the build directory writable (a package's
    setup code runs with no access to the launcher's home or files)."""

    def run(argv: list, env: dict, writable: str, on_output: Any) -> int:
        if isolation.select(options) is None:  # no bubblewrap here: the backend already said so once
            return environments_.run_plain(argv, env, writable, on_output)
        spec = SandboxSpec(env=env, binds=(Bind(writable),), ttl_seconds=BUILD_TTL, options=options)
        handle = sandbox_create(spec)
        try:
            return sandbox_exec(handle, argv, {}, None, BUILD_TTL, on_output, on_output).exit_code
        finally:
            sandbox_destroy(handle)

    return run


@hookimpl
def sandbox_environment_list(options: Mapping[str, Any]) -> list[PreparedEnvironment]:
    return environments_.listed(options)


@hookimpl
def sandbox_environment_remove(ref: str, options: Mapping[str, Any]) -> bool:
    return environments_.remove(ref, options)


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
    exec_id: str | None = None,
) -> ExecResult:
    sb = live_sandbox(handle)
    full_env = {**sb.env, **(env or {})}
    if not command:
        raise SandboxError("empty command", hint="pass an argv list such as ['echo', 'hi']", backend=NAME)
    _check_env(full_env, [*sb.argv, *command])
    if not os.path.isdir(sb.root):  # destroyed by another process (the lifeline's reaper, `metaflow-sandbox gc`)
        sb.destroy()
        raise sb.gone("was destroyed by another process")
    given = cwd
    cwd = os.path.join(sb.layout.workdir, cwd) if cwd else sb.layout.workdir  # a relative cwd is under workdir
    if not _is_dir_inside(sb, cwd):  # said in our words (bwrap's own would name neither the option nor the fix)
        if on_stderr:
            on_stderr(
                "metaflow-sandbox: cwd %r is not a directory in the sandbox (relative paths start at its work dir %s)\n"
                "  Fix: create it first (e.g. sh -c 'mkdir -p DIR && cd DIR && ...'), or drop cwd\n" % (given, sb.layout.workdir)
            )
        return ExecResult(exit_code=1)
    if sb.bwrap:
        argv, host_cwd = [*sb.argv, "--chdir", cwd, "--", *command], sb.data
    else:
        argv, host_cwd = list(command), cwd
    watch = _StderrWatch(on_stderr)
    oom_before = sb.cgroup.oom_kills() if sb.cgroup else 0
    pids_before = sb.pids.hits() if sb.pids else 0
    try:
        code = proc.run(
            argv,
            full_env,
            host_cwd,
            timeout,
            on_stdout,
            watch,
            sb.preexec(),
            started=lambda p: _started(sb, exec_id, p),
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
            _commands.pop((sb.sid, exec_id), None)
    if sb.destroyed:
        sb.torn_down.wait(30)  # e.g. the ttl timer is still removing it: report once nothing is left
        raise sb.gone("went away while the command ran")
    if not os.path.isdir(sb.root):  # destroyed by another process (the lifeline's reaper, `metaflow-sandbox gc`)
        sb.destroy()
        raise sb.gone("was destroyed by another process")
    if sb.bwrap and code == 1 and watch.head.startswith("bwrap: "):  # bwrap's own failure, before the command
        if watch.head.startswith("bwrap: execvp"):
            code = 126 if "Permission denied" in watch.head else 127  # the shell's codes for these
        elif not watch.head.startswith("bwrap: Can't chdir"):  # a missing cwd stays the caller's error (exit 1)
            raise SandboxError(
                "bubblewrap could not set up sandbox %s: %s" % (sb.sid, watch.head.splitlines()[0]),
                hint="check that every bind source still exists; `metaflow-sandbox doctor` shows the isolation status",
                backend=NAME,
                sandbox_id=sb.sid,
            )
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
    elif code != 0:
        _explain_limits(sb, code, watch, pids_before)
    return ExecResult(exit_code=code, oom_killed=oom)


#: (sandbox id, exec id) -> the command's process, while it runs: what sandbox_exec_kill signals.
_commands: dict[tuple[str, str | None], subprocess.Popen] = {}


def _started(sb: LocalSandbox, exec_id: str | None, p: subprocess.Popen) -> None:
    with sb.lock:
        _commands[(sb.sid, exec_id)] = p
    sb.track(p)


@hookimpl
def sandbox_exec_kill(handle: SandboxHandle, exec_id: str) -> bool:
    """SIGKILL the command's process group (under bwrap: its whole pid namespace); the sandbox stays."""
    sb = lookup(handle)
    if sb is None:
        return False
    with sb.lock:
        p = _commands.get((sb.sid, exec_id))
    if p is None or p.poll() is not None:
        return False
    proc.kill_group(p)
    return True


def _explain_limits(sb: LocalSandbox, code: int, watch: _StderrWatch, pids_before: int) -> None:
    """A failed command that hit the pids limit or the disk cap: say which setting to raise."""
    if (sb.pids and sb.pids.hits() > pids_before) or (sb.uid is not None and watch.saw_fork_failure):
        n = sb.pids_limit
        watch(
            "\nmetaflow-sandbox: the command hit the sandbox's pids limit of %d processes and threads.\n"
            "  Fix: raise %s (option pids_limit), e.g. %s=%d.\n" % (n, options_.ENV_PIDS_LIMIT, options_.ENV_PIDS_LIMIT, n * 4)
        )
    elif sb.disk_full() or (not sb.disk_capped and code == 128 + signal.SIGXFSZ):
        mb = sb.disk_mb
        watch(
            "\nmetaflow-sandbox: the command filled the sandbox's writable space (work dir + /tmp) of %d MB.\n"
            "  Fix: raise it with disk=... (e.g. @sandbox(disk=%d) or @resources(disk=%d)), or %s.\n"
            % (mb, mb * 2, mb * 2, options_.ENV_DISK_MB)
        )


def _is_dir_inside(sb: LocalSandbox, path: str) -> bool:
    if not sb.bwrap:
        return os.path.isdir(path)
    try:
        resolved, host, _ = sb.layout.resolve(os.path.normpath(path))
    except PathError:
        return False
    if host is None:  # hidden (/root, /run, ...), /proc or /dev: only the mount point itself is known to exist
        return resolved in sb.layout.mounts
    return os.path.isdir(host)


class _StderrWatch:
    """Passes stderr through, keeping its start (bwrap's own errors) and noticing allocation failures."""

    def __init__(self, callback: OutputCallback | None):
        self.callback = callback
        self.head = ""
        self.saw_oom = self.saw_fork_failure = False

    def __call__(self, text: str) -> None:
        if len(self.head) < 200:
            self.head += text[:200]
        self.saw_oom = self.saw_oom or any(m in text for m in limits.OOM_MARKERS)
        self.saw_fork_failure = self.saw_fork_failure or any(m in text for m in limits.FORK_MARKERS)
        if self.callback:
            self.callback(text)


MAX_ARG_STRLEN = 128 * 1024  # the kernel's limit on one argument or one NAME=value


def _check_env(env: Mapping[str, str], argv: Sequence[str]) -> None:
    """Refuse what execve would refuse (with a shell's bare "Argument list too long"), saying what to do."""
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name or any(c.isspace() for c in name):
            raise UnsupportedOptionError(
                "environment variable name %r is not valid (it must be non-empty, without '=', spaces or NUL)" % (name,),
                hint="rename it in env= (e.g. MY_SETTING)",
                backend=NAME,
            )
        if not isinstance(value, str) or "\0" in value:
            raise UnsupportedOptionError(
                "environment variable %s must be a string without NUL bytes" % name, hint="fix its value in env=", backend=NAME
            )
        if len(name.encode()) + len(value.encode(errors="surrogateescape")) + 1 >= MAX_ARG_STRLEN:
            raise UnsupportedOptionError(
                "environment variable %s is %d KB; a process can receive at most 128 KB per variable" % (name, len(value) // 1024),
                hint="pass large values as a file instead: upload it (sandbox.write_file) or read it from the datastore in the step",
                backend=NAME,
            )
    total = sum(len(k.encode()) + len(v.encode(errors="surrogateescape")) + 2 for k, v in env.items())
    total += sum(len(a.encode(errors="surrogateescape")) + 1 for a in argv)
    limit = _arg_max() - 64 * 1024
    if total > limit:
        raise UnsupportedOptionError(
            "the environment and command line are %d KB; this machine starts processes with at most %d KB" % (total // 1024, limit // 1024),
            hint="pass large values as a file instead: upload it (sandbox.write_file) or read it from the datastore in the step",
            backend=NAME,
        )


def _arg_max() -> int:
    try:
        return int(os.sysconf("SC_ARG_MAX"))
    except (ValueError, OSError):
        return 2 * 1024 * 1024


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    layout = live_sandbox(handle).layout
    return [FileResult(item.path, error=files_.upload_one(layout, item)) for item in files]  # type: ignore[arg-type]


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    layout = live_sandbox(handle).layout
    return [files_.download_one(layout, item) for item in files]


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    sb = lookup(handle)
    if sb is not None:
        return sb.destroy()
    return destroy_elsewhere(handle)  # e.g. the lifeline's reaper, for an owner that was killed


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    sweep(options)  # a dead owner's sandbox is garbage: removed, not listed
    handles = [sb.handle for sb in live_sandboxes()] + other_sandboxes(options)
    return [h for h in handles if all(h.labels.get(k) == v for k, v in labels.items())]
