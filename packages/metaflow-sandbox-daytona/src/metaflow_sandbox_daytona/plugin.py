"""The ``daytona`` backend: the hook functions. The SDK is imported lazily (see ``_client``)."""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Sequence

from metaflow_sandbox import (
    MARKER_LABEL,
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    SandboxError,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    UnsupportedOptionError,
    UploadItem,
    hookimpl,
)

from . import _client, _exec, _files
from ._client import NAME, translate

log = logging.getLogger("metaflow_sandbox.daytona")

#: Daytona's documented per-sandbox caps for a default organisation (raise with options max_cpu / max_memory_mb).
DEFAULT_MAX_CPU = 4.0
DEFAULT_MAX_MEMORY_MB = 8 * 1024
#: Resources of Daytona's default snapshot (server defaults: 1 vCPU, 1 GiB, 3 GiB disk).
DEFAULT_SNAPSHOT_RESOURCES = {"cpu": 1.0, "memory": 1, "disk": 3}
#: Lifetime when the caller gives no ttl: long enough for a long step, short enough that an orphan dies.
DEFAULT_TTL_MINUTES = 24 * 60
CREATE_TIMEOUT = 300.0


def _float_opt(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    return float(value) if value not in (None, "") else default


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        gpu=True,
        max_cpu=_float_opt(options, "max_cpu", DEFAULT_MAX_CPU),
        max_memory_mb=int(_float_opt(options, "max_memory_mb", DEFAULT_MAX_MEMORY_MB)),
        network_toggle=True,
        binds=False,
        images=True,
        shares_host_filesystem=False,
        config_env=_client.ENV_VARS,
    )


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    _client.resolve_config(options)
    return True


def _gib(mb: int, what: str) -> int:
    gib = max(1, math.ceil(mb / 1024))
    if gib * 1024 != mb:
        log.info("daytona: %s=%d MB rounded up to %d GiB (Daytona sizes %s in whole GiB)", what, mb, gib, what)
    return gib


def _resources(spec: SandboxSpec) -> dict[str, Any]:
    res = spec.resources
    out: dict[str, Any] = {}
    if res.cpu:
        out["cpu"] = max(1, math.ceil(res.cpu))
    if res.memory_mb:
        out["memory"] = _gib(res.memory_mb, "memory")
    if res.disk_mb:
        out["disk"] = _gib(res.disk_mb, "disk")
    if res.gpu:
        out["gpu"] = int(res.gpu)
    return out


def _check_snapshot_fits(daytona: Any, snapshot: str | None, wanted: dict[str, Any], strict: bool) -> None:
    """A snapshot's size is fixed (Daytona refuses resources on snapshot creates): say so when it is smaller
    than what the step asks for. A warning by default, since Metaflow always passes default cpu/memory;
    an error with ``strict_resources``."""
    if snapshot:
        snap = _snapshot(daytona, snapshot)
        have = {"cpu": snap.cpu, "memory": snap.mem, "disk": snap.disk, "gpu": snap.gpu or 0}
    else:
        have = dict(DEFAULT_SNAPSHOT_RESOURCES, gpu=0)
    short = {k: v for k, v in wanted.items() if v > (have.get(k) or 0)}
    if not short:
        return
    what = "snapshot %r" % snapshot if snapshot else "Daytona's default snapshot"
    message = "%s provides %s (memory/disk in GiB), less than the requested %s" % (what, have, short)
    hint = (
        "set image=... (Daytona builds it with the requested resources; slow the first time), or create a snapshot "
        "with these resources and set snapshot=... (METAFLOW_SANDBOX_DAYTONA_SNAPSHOT)"
    )
    if strict:
        raise UnsupportedOptionError(message, hint=hint, backend=NAME, op="sandbox_create")
    log.warning("daytona: %s; the sandbox gets the snapshot's size. Fix: %s", message, hint)


_snapshots: dict[tuple[int, str], Any] = {}


def _snapshot(daytona: Any, name: str) -> Any:
    """Snapshot sizes, cached per process (one lookup per task at most)."""
    key = (id(daytona), name)
    if key not in _snapshots:
        try:
            _snapshots[key] = daytona.snapshot.get(name)
        except Exception as exc:
            _recover_named(daytona, _Named(name), exc)
    return _snapshots[key]


class _Named:
    """Stand-in params for error reporting before any create was sent."""

    def __init__(self, snapshot: str):
        self.snapshot, self.name = snapshot, None


def _name(key: str) -> str:
    return "mf-" + re.sub(r"[^a-zA-Z0-9-]+", "-", key).strip("-")[:60]


def _params(spec: SandboxSpec, daytona: Any) -> Any:
    from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources

    opts = spec.options
    ttl = spec.ttl_seconds
    common: dict[str, Any] = dict(
        labels={MARKER_LABEL: "1", **{str(k): str(v) for k, v in spec.labels.items()}},
        env_vars={str(k): str(v) for k, v in spec.env.items()},
        # Processes inside a sandbox do not count as activity: never auto-stop a running step.
        auto_stop_interval=0,
        # Ephemeral: deleted as soon as it stops; ttl_minutes is the hard wall-clock lifetime.
        auto_delete_interval=0,
        ttl_minutes=max(1, math.ceil(ttl / 60)) if ttl else int(_float_opt(opts, "ttl_minutes", DEFAULT_TTL_MINUTES)),
        network_block_all=True if not spec.network else None,
        name=_name(spec.idempotency_key) if spec.idempotency_key else None,
    )
    if opts.get("target"):
        common["target"] = str(opts["target"])
    wanted = _resources(spec)
    if spec.image:
        resources = Resources(**wanted) if wanted else None
        if spec.resources.gpu_type:
            log.warning("daytona: gpu_type=%s is not passed (use a snapshot with that GPU)", spec.resources.gpu_type)
        return CreateSandboxFromImageParams(image=spec.image, resources=resources, **common)
    snapshot = opts.get("snapshot") or None
    if wanted:
        strict = str(opts.get("strict_resources", "")).lower() in ("1", "true", "yes")
        _check_snapshot_fits(daytona, snapshot, wanted, strict)
    return CreateSandboxFromSnapshotParams(snapshot=snapshot, **common)


@hookimpl
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    _client.resolve_config(spec.options)  # missing key: fail before anything else happens
    daytona = _client.client(spec.options)
    params = _params(spec, daytona)
    timeout = _client.sdk_timeout(_float_opt(spec.options, "create_timeout", CREATE_TIMEOUT))
    try:
        sandbox = daytona.create(params, timeout=timeout)
    except Exception as exc:
        sandbox = _recover_named(daytona, params, exc)
    workdir = _workdir(sandbox)
    return _handle(sandbox, spec.options, workdir)


def _recover_named(daytona: Any, params: Any, exc: Exception) -> Any:
    """With an idempotency key the name is unique, so a retried create finds the first one."""
    from daytona.common.errors import DaytonaConflictError, DaytonaNotFoundError

    if isinstance(exc, DaytonaNotFoundError):
        what = "snapshot %r" % params.snapshot if getattr(params, "snapshot", None) else "the default snapshot"
        raise SandboxError(
            "Daytona could not create a sandbox from %s: %s" % (what, getattr(exc, "message", exc)),
            hint="set an existing snapshot with the snapshot option (METAFLOW_SANDBOX_DAYTONA_SNAPSHOT), "
            "see `daytona snapshot list`, or set image=...",
            backend=NAME,
            op="sandbox_create",
        ) from exc
    if params.name and isinstance(exc, DaytonaConflictError):
        try:
            found = daytona.get(params.name)
            if (found.labels or {}).get(MARKER_LABEL) == "1":
                if not str(found.state).lower().endswith("started"):
                    found.wait_for_sandbox_start(timeout=_client.sdk_timeout(CREATE_TIMEOUT))
                return found
        except Exception as exc2:
            translate(exc2, op="sandbox_create")
    orphan = getattr(exc, "sandbox_id", None)
    if orphan:  # created, but not started in time: do not leave it to the ttl
        try:
            _delete_quietly(daytona.get(orphan))
        except Exception:
            pass
    translate(exc, op="sandbox_create", sandbox_id=orphan, retry_safe=False)


def _workdir(sandbox: Any) -> str:
    try:
        return str(sandbox.get_work_dir())
    except Exception as exc:
        _delete_quietly(sandbox)
        translate(exc, op="sandbox_create", sandbox_id=sandbox.id, retry_safe=False)


def _handle(sandbox: Any, options: Mapping[str, Any], workdir: str) -> SandboxHandle:
    labels = dict(sandbox.labels or {})
    return SandboxHandle(NAME, sandbox.id, workdir=workdir, labels=labels, options=dict(options), native=sandbox)


def sdk_sandbox(handle: SandboxHandle) -> Any:
    """The SDK Sandbox for a handle (a handle rebuilt from an id costs one GET)."""
    if handle.native is not None:
        return handle.native
    try:
        return _client.client(handle.options).get(handle.sandbox_id)
    except Exception as exc:
        translate(exc, op="get", sandbox_id=handle.sandbox_id)


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
    return _exec.run(handle, sdk_sandbox(handle), command, env, cwd, timeout, on_stdout, on_stderr)


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    return _files.upload(handle, sdk_sandbox(handle), files)


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    return _files.download(handle, sdk_sandbox(handle), files)


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    try:
        sandbox = sdk_sandbox(handle)
    except SandboxNotFoundError:
        return False
    if str(getattr(sandbox, "state", "")).lower().endswith(("destroyed", "destroying")):
        return False
    try:
        sandbox.delete(timeout=_client.sdk_timeout(60))
    except Exception as exc:
        from daytona.common.errors import DaytonaNotFoundError

        if isinstance(exc, DaytonaNotFoundError):
            return False
        translate(exc, op="sandbox_destroy", sandbox_id=handle.sandbox_id)
    return True


def _delete_quietly(sandbox: Any) -> None:
    try:
        sandbox.delete(timeout=_client.sdk_timeout(60))
    except Exception as exc:  # best effort: ttl/auto-delete still reap it
        log.warning("daytona: could not delete sandbox %s: %s", sandbox.id, exc)


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    from daytona import ListSandboxesQuery

    daytona = _client.client(options)
    query = ListSandboxesQuery(labels={MARKER_LABEL: "1", **{str(k): str(v) for k, v in labels.items()}})
    try:
        found = list(daytona.list(query))
    except Exception as exc:
        translate(exc, op="sandbox_list")
    live = [s for s in found if not str(s.state).lower().endswith(("destroyed", "destroying"))]
    return [_handle(s, options, "/home/daytona") for s in live]
