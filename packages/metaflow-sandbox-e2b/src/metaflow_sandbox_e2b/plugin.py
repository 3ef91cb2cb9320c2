"""The E2B backend's hooks. Importing this module is cheap and offline: the SDK loads on first use."""

from __future__ import annotations

import io
import math
import shlex
import threading
import time
from typing import Any, Mapping, NoReturn, Sequence

from metaflow_sandbox import (
    DEFAULT_LEASE_SECONDS,
    Capabilities,
    DownloadItem,
    EnvironmentSpec,
    ExecResult,
    FileResult,
    PreparedEnvironment,
    SandboxError,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    UnsupportedOptionError,
    UploadItem,
    hookimpl,
    valid_sandbox_path,
)

from . import environments
from ._inputs import checked_argv, checked_env, checked_labels
from .settings import NAME, Settings, require_key, settings
from .templates import largest, pick_template

DEFAULT_WORKDIR = "/home/user"
#: Times one command's dropped output stream is reattached (Process/Connect) before the exec fails.
MAX_REATTACH = 5
#: Our tries of a REST call; each is already up to 4 tries by the SDK (429/502/503/504, honouring Retry-After).
#: envd calls get the default 6 tries: the SDK does not repeat those.
REST_ATTEMPTS = 3
CONFIG_ENV = ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN")


class _Live:
    """What travels in ``handle.native``: the SDK sandbox and its lease.

    The sandbox's E2B timeout is a short lease (``SandboxSpec.lease_seconds``), renewed by a
    heartbeat thread from create until destroy: during commands and between them (uploads,
    downloads, the launcher's own work). If the owning process dies by any signal, the renewals
    stop and E2B ends the sandbox within one lease. A renewal never reaches past the deadline (ttl).
    """

    def __init__(self, sbx: Any, s: Settings, deadline: float, lease: int):
        self.sbx = sbx
        self.settings = s
        self.deadline = deadline
        self.lease = max(1, lease)
        self.renew_every = float(s.renew_seconds or max(1.0, self.lease / 6.0))
        self.renewals = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        #: exec id -> the running command (what sandbox_exec_kill signals), and the ids a kill was asked for.
        self.commands: dict[str, Any] = {}
        self.killed: set[str] = set()

    def renew(self) -> bool:
        """Push the sandbox's timeout to min(lease, time left before the deadline); False once it is gone."""
        from ._client import is_gone, retrying

        left = self.deadline - time.time()
        if left < 1:
            return False
        with self.lock:
            try:
                retrying(lambda: self.sbx.set_timeout(int(min(self.lease, left))), attempts=REST_ATTEMPTS)
            except Exception as exc:
                return not is_gone(exc)  # a failed renewal is retried next tick, several ticks before the lease ends
            self.renewals += 1
            return True

    def start(self) -> None:
        self.thread = threading.Thread(target=self._beat, name="e2b-lease-%s" % self.sbx.sandbox_id, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _beat(self) -> None:
        while not self.stopped.wait(self.renew_every):
            if not self.renew():
                return


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    require_key(settings(options))
    return True


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    s = settings(options)
    max_cpu, max_mem = largest(s.plan)
    return Capabilities(
        gpu=False,
        max_cpu=float(max_cpu),
        max_memory_mb=max_mem,
        max_ttl_seconds=float(s.plan.max_ttl_seconds),
        network_toggle=True,
        binds=False,
        images=True,
        shares_host_filesystem=False,
        config_env=CONFIG_ENV,
        # The plan's published quotas; the core's limiter keeps every process of this user inside them
        # (options `concurrency` / `create_rate`, METAFLOW_SANDBOX_E2B_CONCURRENCY, override; 0 = off).
        max_concurrent_sandboxes=s.plan.max_concurrent_sandboxes,
        max_creates_per_minute=s.plan.max_creates_per_minute,
    )


def lease_seconds(spec: SandboxSpec, s: Settings, ttl: float) -> int:
    """The option overrides the spec's lease (the core's METAFLOW_SANDBOX_LEASE_SECONDS); never past the ttl."""
    lease = s.lease_seconds or spec.lease_seconds or DEFAULT_LEASE_SECONDS
    return max(1, int(math.ceil(min(ttl, float(lease)))))


@hookimpl
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    from ._client import idempotency_key, sdk, translated

    s = settings(spec.options)
    require_key(s)
    if spec.resources.gpu or spec.resources.gpu_type:
        raise UnsupportedOptionError("E2B sandboxes have no GPUs", hint="remove gpu=... or use another backend", backend=NAME)
    ttl = float(spec.ttl_seconds or s.default_ttl_seconds)
    if ttl > s.plan.max_ttl_seconds:
        raise UnsupportedOptionError(
            "E2B's '%s' plan keeps a sandbox at most %ds, but the step needs %ds" % (s.plan_name, s.plan.max_ttl_seconds, ttl),
            hint="lower @timeout, or set METAFLOW_SANDBOX_E2B_PLAN=pro (24 h) if your account has it",
            backend=NAME,
            op="sandbox_create",
        )
    # A prepared environment is a template built from spec.image at this step's resource class.
    template = spec.environment or pick_template(spec.resources, spec.image, spec.options)
    env = checked_env(spec.env, "sandbox_create")
    metadata = checked_labels(spec.labels)
    key = idempotency_key(spec.idempotency_key)
    now = time.time()
    lease = lease_seconds(spec, s, ttl)
    with translated("create", retry_safe=bool(key), s=s):
        sbx = sdk().Sandbox.create(
            template=template,
            timeout=lease,
            metadata=metadata,
            envs=env,
            allow_internet_access=None if spec.network else False,
            idempotency_key=key,
            **s.api_params(),
        )
    try:
        workdir = s.workdir or _home(sbx, s)
    except BaseException:
        _kill_quietly(sbx.sandbox_id, s)
        raise
    live = _Live(sbx, s, deadline=now + ttl, lease=lease)
    live.start()
    return SandboxHandle(NAME, sbx.sandbox_id, workdir=workdir, labels=dict(spec.labels), options=spec.options, native=live)


@hookimpl
def sandbox_environment_prepare(environment: EnvironmentSpec, on_log: Any) -> PreparedEnvironment:
    return environments.prepare(environment, on_log)


@hookimpl
def sandbox_environment_list(options: Mapping[str, Any]) -> list[PreparedEnvironment]:
    return environments.environments(options)


@hookimpl
def sandbox_environment_remove(ref: str, options: Mapping[str, Any]) -> bool:
    return environments.remove(ref, options)


def _home(sbx: Any, s: Settings) -> str:
    """The sandbox user's home, as envd resolves it (``/home/user`` on E2B)."""
    from ._client import retrying, translated

    with translated("workdir", sbx.sandbox_id, s=s):
        return retrying(lambda: sbx.files.get_info(".")).path or DEFAULT_WORKDIR


def _kill_quietly(sandbox_id: str, s: Settings) -> None:
    from ._client import retrying, sdk

    try:
        retrying(lambda: sdk().Sandbox.kill(sandbox_id, **s.api_params()), attempts=REST_ATTEMPTS)
    except Exception:  # best effort: the sandbox dies at the end of its lease anyway
        pass


def _live(handle: SandboxHandle) -> _Live:
    """The handle's SDK sandbox; handles from ``sandbox_list`` reconnect on first use (and renew from then on)."""
    if isinstance(handle.native, _Live):
        return handle.native
    from ._client import retrying, sdk, translated

    s = settings(handle.options)
    lease = int(s.lease_seconds or DEFAULT_LEASE_SECONDS)
    with translated("connect", handle.sandbox_id, retry_safe=True, s=s):
        sbx = retrying(lambda: sdk().Sandbox.connect(handle.sandbox_id, timeout=lease, **s.api_params()), attempts=REST_ATTEMPTS)
    live = _Live(sbx, s, deadline=time.time() + s.plan.max_ttl_seconds, lease=lease)
    live.start()
    object.__setattr__(handle, "native", live)
    return live


@hookimpl
def sandbox_exec(
    handle: SandboxHandle,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    on_stdout: Any,
    on_stderr: Any,
    exec_id: str,
) -> ExecResult:
    """Run until the command ends or ``sandbox_exec_kill`` kills it; the facade keeps the deadline."""
    from ._client import is_gone, translated

    argv = checked_argv(command)
    envs = checked_env(env, "sandbox_exec")
    live = _live(handle)
    sid = handle.sandbox_id
    with translated("exec", sid, s=live.settings):
        # timeout=0 at the SDK level: its 60 s default would kill long steps (the facade keeps our deadline).
        # Starting the command is never retried: a lost answer may mean it runs already.
        proc = live.sbx.commands.run(
            shlex.join(argv), background=True, envs=envs or None, cwd=cwd or handle.workdir, timeout=0, retain_output=False
        )
    live.commands[exec_id] = proc
    try:
        for reattached in range(MAX_REATTACH + 1):
            try:
                return ExecResult(exit_code=_wait(proc, on_stdout, on_stderr))
            except SandboxError:
                raise
            except Exception as exc:
                if exec_id in live.killed:
                    raise SandboxError("the command was killed", backend=NAME, sandbox_id=sid) from exc
                if is_gone(exc):
                    raise SandboxNotFoundError(
                        "E2B sandbox is gone (killed, or it reached its timeout): %s" % exc, backend=NAME, sandbox_id=sid
                    ) from exc
                if reattached == MAX_REATTACH:
                    _lost(proc, sid, exc, "its output stream was lost %d times" % (MAX_REATTACH + 1))
                proc = live.commands[exec_id] = _reattach(live, proc, sid, exc)
                if on_stderr:
                    on_stderr("[metaflow-sandbox] the output stream from E2B dropped; reattached to the running command "
                              "(output in between may be missing)\n")  # fmt: skip
        raise AssertionError("unreachable")
    finally:
        live.commands.pop(exec_id, None)
        live.killed.discard(exec_id)


@hookimpl
def sandbox_exec_kill(handle: SandboxHandle, exec_id: str) -> bool:
    """Kill the command by pid (envd signals it, whichever stream is attached); False if it is not running here."""
    live = handle.native if isinstance(handle.native, _Live) else None
    proc = live.commands.get(exec_id) if live else None
    if live is None or proc is None:
        return False
    live.killed.add(exec_id)
    _kill_command(proc)
    return True


def _reattach(live: _Live, proc: Any, sid: str, lost: BaseException) -> Any:
    """Attach to the still-running command again (envd's Process/Connect): nothing is re-run."""
    from ._client import is_gone, retrying, sdk

    try:
        return retrying(lambda: live.sbx.commands.connect(proc.pid, timeout=0, retain_output=False))
    except Exception as exc:
        if is_gone(exc):
            raise SandboxNotFoundError(
                "E2B sandbox is gone (killed, or it reached its timeout): %s" % exc, backend=NAME, sandbox_id=sid
            ) from exc
        if isinstance(exc, sdk().NotFoundException):  # the command ended while no stream was attached
            raise SandboxError(
                "the command ended while its output stream was lost (%s), so its exit status is unknown; it was NOT retried" % _brief(lost),
                hint="the network to E2B dropped mid-command; rerun the step (use @retry to do it automatically)",
                backend=NAME,
                op="sandbox_exec",
                sandbox_id=sid,
            ) from exc
        _lost(proc, sid, lost, "reattaching failed too (%s)" % _brief(exc))


def _lost(proc: Any, sid: str, exc: BaseException, why: str) -> NoReturn:
    _kill_command(proc)  # never leave a command running that nobody watches; it is not re-run either
    raise SandboxError(
        "lost the command's output stream (%s) and %s; the command was killed and NOT retried" % (_brief(exc), why),
        hint="the network to E2B dropped mid-command; rerun the step (use @retry to do it automatically)",
        backend=NAME,
        op="sandbox_exec",
        sandbox_id=sid,
    ) from exc


def _brief(exc: BaseException) -> str:
    """``Type: first sentence`` of an SDK error (its full text, with advice meant for SDK users, is in the cause)."""
    text = str(exc).strip().split(": The sandbox", 1)[0]
    return "%s: %s" % (type(exc).__name__, text if len(text) <= 200 else text[:197] + "...")


def _kill_command(proc: Any) -> None:
    from ._client import retrying

    try:
        retrying(proc.kill)
    except Exception:  # the backstop deadline (or the lease) still ends it
        pass


def _wait(proc: Any, on_stdout: Any, on_stderr: Any) -> int:
    from ._client import sdk

    try:
        return int(proc.wait(on_stdout=on_stdout, on_stderr=on_stderr).exit_code)
    except sdk().CommandExitException as exc:  # a non-zero exit is a result, not an error
        return int(exc.exit_code)


# -- files -------------------------------------------------------------------------------------
def _bad_path(path: str) -> bool:
    """Defensive: the facade already answers these (``valid_sandbox_path``) before they reach us."""
    return not valid_sandbox_path(path)


def _file_code(exc: BaseException) -> str | None:
    """Per-file error code from the SDK's error type and HTTP status, or None if it is not a per-file problem.

    envd answers 404 (the SDK's ``FileNotFoundException``), 400 (``InvalidArgumentException``: a directory
    where a file was meant, or a bad path) and 403; the SDK has no class for 403 and raises a
    ``SandboxException("403: <message>")``, so its status is read from that prefix, never searched for.
    """
    from ._client import is_gone, sdk

    e2b = sdk()
    if is_gone(exc):
        return None
    if isinstance(exc, e2b.FileNotFoundException):
        return "file_not_found"
    if isinstance(exc, e2b.InvalidArgumentException):
        return "is_directory" if "is a directory" in str(exc).lower() else "invalid_path"
    if type(exc) is e2b.SandboxException and _status(exc) == 403:
        return "permission_denied"
    return None


def _status(exc: BaseException) -> int | None:
    """The HTTP status of an SDK error the SDK formatted as ``"<status>: <message>"``."""
    head = str(exc).split(":", 1)[0].strip()
    return int(head) if head.isdigit() and len(head) == 3 else None


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    live = _live(handle)
    out = []
    for item in files:
        if _bad_path(item.path):
            out.append(FileResult(item.path, error="invalid_path"))
            continue

        def write(item: UploadItem = item) -> None:
            # A file object makes the SDK stream an octet-stream body with no client deadline;
            # opened anew on each try, so a retried upload sends the whole file again.
            data = open(item.source, "rb") if item.source is not None else io.BytesIO(item.content or b"")
            with data:
                live.sbx.files.write(item.path, data)

        out.append(_file_op(handle, live, "upload", item.path, write))
    return out


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    live = _live(handle)
    out = []
    for item in files:
        if _bad_path(item.path):
            out.append(FileResult(item.path, error="invalid_path"))
            continue

        def read(item: DownloadItem = item) -> bytes | None:
            stream = live.sbx.files.read(item.path, format="stream")
            with stream:
                if item.destination is None:
                    return b"".join(stream)
                with open(item.destination, "wb") as f:  # truncated on each try
                    for chunk in stream:
                        f.write(chunk)
                return None

        out.append(_file_op(handle, live, "download", item.path, read))
    return out


def _file_op(handle: SandboxHandle, live: _Live, op: str, path: str, fn: Any) -> FileResult:
    """One idempotent file transfer, retried through rate limits and 5xx; per-file errors become results."""
    from ._client import retrying, translate

    try:
        content = retrying(fn)
    except Exception as exc:
        code = _file_code(exc)
        if code is None:
            raise translate(exc, op, handle.sandbox_id, retry_safe=True, s=live.settings) from exc
        return FileResult(path, error=code)  # type: ignore[arg-type]
    return FileResult(path, content=content) if content is not None else FileResult(path)


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    from ._client import retrying, sdk, translated

    if isinstance(handle.native, _Live):
        handle.native.stop()  # no renewal after this: if the kill fails, the lease ends the sandbox
    s = settings(handle.options)
    with translated("destroy", handle.sandbox_id, retry_safe=True, s=s):
        return bool(retrying(lambda: sdk().Sandbox.kill(handle.sandbox_id, **s.api_params()), attempts=REST_ATTEMPTS))


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    from ._client import retrying, sdk, translated

    e2b = sdk()
    s = settings(options)
    require_key(s)
    query = e2b.SandboxQuery(metadata=dict(labels) or None, state=[e2b.SandboxState.RUNNING])

    def every_page() -> list[Any]:
        found: list[Any] = []
        pages = e2b.Sandbox.list(query=query, limit=100, **s.api_params())
        while pages.has_next:
            found.extend(pages.next_items())
        return found

    with translated("list", retry_safe=True, s=s):
        found = retrying(every_page, attempts=REST_ATTEMPTS)
    workdir = s.workdir or DEFAULT_WORKDIR
    return [
        SandboxHandle(NAME, info.sandbox_id, workdir=workdir, labels=dict(info.metadata or {}), options=dict(options))
        for info in found
        if all((info.metadata or {}).get(k) == v for k, v in labels.items())
    ]


__all__ = [
    "sandbox_capabilities",
    "sandbox_check_config",
    "sandbox_create",
    "sandbox_destroy",
    "sandbox_download",
    "sandbox_exec",
    "sandbox_exec_kill",
    "sandbox_list",
    "sandbox_upload",
]
