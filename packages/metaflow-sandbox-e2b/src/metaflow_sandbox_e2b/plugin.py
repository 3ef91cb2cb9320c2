"""The E2B backend's hooks. Importing this module is cheap and offline: the SDK loads on first use."""

from __future__ import annotations

import io
import math
import shlex
import threading
import time
from typing import Any, Mapping, Sequence

from metaflow_sandbox import (
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    SandboxError,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
    UnsupportedOptionError,
    UploadItem,
    hookimpl,
)

from .settings import NAME, Settings, require_key, settings
from .templates import largest, pick_template

DEFAULT_WORKDIR = "/home/user"
#: Extra seconds on top of our own exec timeout for the SDK/envd deadline (a backstop if kill fails).
BACKSTOP_SECONDS = 30.0
CONFIG_ENV = ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN")


class _Live:
    """What travels in ``handle.native``: the SDK sandbox and its lifetime lease."""

    def __init__(self, sbx: Any, s: Settings, deadline: float, lease_until: float):
        self.sbx = sbx
        self.settings = s
        self.deadline = deadline
        self.lease_until = lease_until
        self.lock = threading.Lock()

    def renew(self, force: bool = False) -> None:
        """Push the sandbox's timeout to min(lease, time left) when less than half a lease is left."""
        now = time.time()
        with self.lock:
            if not force and self.lease_until - now > self.settings.lease_seconds / 2:
                return
            left = self.deadline - now
            if left <= 1:
                return
            seconds = int(min(self.settings.lease_seconds, left))
            self.sbx.set_timeout(seconds)
            self.lease_until = now + seconds


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
    )


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
    template = pick_template(spec.resources, spec.image, spec.options)
    key = idempotency_key(spec.idempotency_key)
    now = time.time()
    lease = int(math.ceil(min(ttl, s.lease_seconds)))
    with translated("create", retry_safe=bool(key)):
        sbx = sdk().Sandbox.create(
            template=template,
            timeout=lease,
            metadata={str(k): str(v) for k, v in spec.labels.items()},
            envs={str(k): str(v) for k, v in spec.env.items()},
            allow_internet_access=None if spec.network else False,
            idempotency_key=key,
            **s.api_params(),
        )
    try:
        workdir = s.workdir or _home(sbx)
    except BaseException:
        _kill_quietly(sbx.sandbox_id, s)
        raise
    live = _Live(sbx, s, deadline=now + ttl, lease_until=now + lease)
    return SandboxHandle(NAME, sbx.sandbox_id, workdir=workdir, labels=dict(spec.labels), options=spec.options, native=live)


def _home(sbx: Any) -> str:
    """The sandbox user's home, as envd resolves it (``/home/user`` on E2B)."""
    from ._client import translated

    with translated("create", sbx.sandbox_id):
        return sbx.files.get_info(".").path or DEFAULT_WORKDIR


def _kill_quietly(sandbox_id: str, s: Settings) -> None:
    from ._client import sdk

    try:
        sdk().Sandbox.kill(sandbox_id, **s.api_params())
    except Exception:  # best effort: the sandbox dies at its timeout anyway
        pass


def _live(handle: SandboxHandle) -> _Live:
    """The handle's SDK sandbox; handles from ``sandbox_list`` reconnect on first use."""
    if isinstance(handle.native, _Live):
        return handle.native
    from ._client import sdk, translated

    s = settings(handle.options)
    with translated("connect", handle.sandbox_id, retry_safe=True):
        sbx = sdk().Sandbox.connect(handle.sandbox_id, timeout=s.lease_seconds, **s.api_params())
    now = time.time()
    live = _Live(sbx, s, deadline=now + s.plan.max_ttl_seconds, lease_until=now + s.lease_seconds)
    object.__setattr__(handle, "native", live)
    return live


@hookimpl
def sandbox_exec(
    handle: SandboxHandle,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    timeout: float | None,
    on_stdout: Any,
    on_stderr: Any,
) -> ExecResult:
    from ._client import is_gone, translated

    live = _live(handle)
    sid = handle.sandbox_id
    with translated("exec", sid):
        live.renew()
        # timeout=0 at the SDK level: its 60 s default would kill long steps. Our own limit is enforced
        # below (kill + SandboxTimeoutError); the SDK deadline is only a backstop should the kill fail.
        proc = live.sbx.commands.run(
            shlex.join(list(command)),
            background=True,
            envs={str(k): str(v) for k, v in env.items()} or None,
            cwd=cwd or handle.workdir,
            timeout=(timeout + BACKSTOP_SECONDS) if timeout else 0,
            retain_output=False,
        )
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        try:
            proc.kill()
        except Exception:  # the backstop deadline still ends the stream
            pass

    watchdog = threading.Timer(timeout, on_timeout) if timeout else None
    stop_heartbeat = threading.Event()
    heartbeat = threading.Thread(target=_heartbeat, args=(live, stop_heartbeat), daemon=True)
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    heartbeat.start()
    try:
        code = _wait(proc, on_stdout, on_stderr)
    except SandboxError:
        raise
    except Exception as exc:
        if timed_out.is_set():
            raise SandboxTimeoutError("command ran past its %ss timeout and was killed" % timeout, backend=NAME, sandbox_id=sid) from exc
        if is_gone(exc):
            raise SandboxNotFoundError(
                "E2B sandbox is gone (killed, or it reached its timeout): %s" % exc, backend=NAME, sandbox_id=sid
            ) from exc
        try:
            proc.kill()  # never leave a command running that nobody watches; it is not re-run either
        except Exception:
            pass
        raise SandboxError(
            "lost the command's output stream (%s: %s); the command was killed and NOT retried" % (type(exc).__name__, exc),
            hint="the network to E2B dropped mid-command; rerun the step (use @retry to do it automatically)",
            backend=NAME,
            op="sandbox_exec",
            sandbox_id=sid,
        ) from exc
    finally:
        if watchdog:
            watchdog.cancel()
        stop_heartbeat.set()
    if timed_out.is_set():
        raise SandboxTimeoutError("command ran past its %ss timeout and was killed" % timeout, backend=NAME, sandbox_id=sid)
    return ExecResult(exit_code=code)


def _wait(proc: Any, on_stdout: Any, on_stderr: Any) -> int:
    from ._client import sdk

    try:
        return int(proc.wait(on_stdout=on_stdout, on_stderr=on_stderr).exit_code)
    except sdk().CommandExitException as exc:  # a non-zero exit is a result, not an error
        return int(exc.exit_code)


def _heartbeat(live: _Live, stop: threading.Event) -> None:
    """Keep renewing the lease while a command runs (the step may outlive one lease)."""
    interval = max(5.0, live.settings.lease_seconds / 3)
    while not stop.wait(interval):
        try:
            live.renew()
        except Exception:  # a failed renewal is retried next tick; the command's own errors surface in exec
            pass


# -- files -------------------------------------------------------------------------------------
def _bad_path(path: str) -> bool:
    return not path.startswith("/") or ".." in path.split("/")


def _file_code(exc: BaseException) -> str | None:
    """Per-file error code for an SDK file exception, or None if it is not a per-file problem."""
    from ._client import is_gone, sdk

    e2b = sdk()
    text = str(exc).lower()
    if is_gone(exc):
        return None
    if isinstance(exc, e2b.FileNotFoundException) or "does not exist" in text or "no such file" in text:
        return "file_not_found"
    if "is a directory" in text:
        return "is_directory"
    if "permission denied" in text or "403" in text:
        return "permission_denied"
    if isinstance(exc, e2b.InvalidArgumentException) or "invalid path" in text:
        return "invalid_path"
    return None


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    from ._client import translate

    live = _live(handle)
    out = []
    for item in files:
        if _bad_path(item.path):
            out.append(FileResult(item.path, error="invalid_path"))
            continue
        # A file object makes the SDK stream an octet-stream body with no client deadline.
        data = open(item.source, "rb") if item.source is not None else io.BytesIO(item.content or b"")
        try:
            with data:
                live.sbx.files.write(item.path, data)
            out.append(FileResult(item.path))
        except Exception as exc:
            code = _file_code(exc)
            if code is None:
                raise translate(exc, "upload", handle.sandbox_id, retry_safe=True) from exc
            out.append(FileResult(item.path, error=code))  # type: ignore[arg-type]
    return out


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    from ._client import translate

    live = _live(handle)
    out = []
    for item in files:
        if _bad_path(item.path):
            out.append(FileResult(item.path, error="invalid_path"))
            continue
        try:
            stream = live.sbx.files.read(item.path, format="stream")
            with stream:
                if item.destination is not None:
                    with open(item.destination, "wb") as f:
                        for chunk in stream:
                            f.write(chunk)
                    out.append(FileResult(item.path))
                else:
                    out.append(FileResult(item.path, content=b"".join(stream)))
        except Exception as exc:
            code = _file_code(exc)
            if code is None:
                raise translate(exc, "download", handle.sandbox_id, retry_safe=True) from exc
            out.append(FileResult(item.path, error=code))  # type: ignore[arg-type]
    return out


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    from ._client import sdk, translated

    s = settings(handle.options)
    with translated("destroy", handle.sandbox_id, retry_safe=True):
        return bool(sdk().Sandbox.kill(handle.sandbox_id, **s.api_params()))


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    from ._client import sdk, translated

    e2b = sdk()
    s = settings(options)
    require_key(s)
    query = e2b.SandboxQuery(metadata=dict(labels) or None, state=[e2b.SandboxState.RUNNING])
    found = []
    with translated("list", retry_safe=True):
        pages = e2b.Sandbox.list(query=query, limit=100, **s.api_params())
        while pages.has_next:
            found.extend(pages.next_items())
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
    "sandbox_list",
    "sandbox_upload",
]
