"""The ``daytona`` backend: the hook functions. The SDK is imported lazily (see ``_client``)."""

from __future__ import annotations

import logging
import math
import re
import uuid
from typing import Any, Mapping, NoReturn, Sequence

from metaflow_sandbox import (
    DEFAULT_LEASE_SECONDS,
    MARKER_LABEL,
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
)

from . import _client, _environments, _exec, _files, _retry
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
#: Daytona's published quotas (daytona.io/docs/en/rate-limits: "Sandbox Creation: 600 requests / 60 seconds";
#: daytona.io/docs/en/limits: Tier 1's compute pool holds 10 default-size sandboxes of 1 vCPU / 1 GiB / 3 GiB).
#: Override with options concurrency / create_rate (METAFLOW_SANDBOX_DAYTONA_CONCURRENCY / _CREATE_RATE).
DEFAULT_CONCURRENCY = 10
DEFAULT_CREATES_PER_MINUTE = 600.0


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
        # Daytona counts ttl_minutes (and the auto-stop lease) in whole minutes.
        min_ttl_seconds=60.0,
        max_concurrent_sandboxes=DEFAULT_CONCURRENCY,
        max_creates_per_minute=DEFAULT_CREATES_PER_MINUTE,
    )


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    """Credentials present and our numeric options valid: refused at launch, before any task, no network call."""
    _client.resolve_config(options)
    _retry.Policy.from_options(options)
    _retry.number_option(options, "lease_renew_seconds", 0, 0)
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
            _snapshots[key] = _retry.call(lambda: daytona.snapshot.get(name), "snapshot lookup", _retry.Policy())
        except Exception as exc:
            _recover_named(daytona, _Named(name), exc)
    return _snapshots[key]


class _Named:
    """Stand-in params for error reporting before any create was sent."""

    def __init__(self, snapshot: str):
        self.snapshot, self.name = snapshot, None


def _name(key: str | None) -> str:
    """Every sandbox gets a unique name, so a create whose answer was lost is found, never duplicated."""
    return "mf-" + re.sub(r"[^a-zA-Z0-9-]+", "-", key or uuid.uuid4().hex).strip("-")[:60]


def lease_minutes(spec: SandboxSpec) -> int:
    """The provider-side lease: auto-stop after this many idle minutes (then deleted), renewed while a command runs."""
    return max(1, math.ceil((spec.lease_seconds or DEFAULT_LEASE_SECONDS) / 60))


def _params(spec: SandboxSpec, daytona: Any) -> Any:
    from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources

    opts = spec.options
    ttl = spec.ttl_seconds
    common: dict[str, Any] = dict(
        labels={MARKER_LABEL: "1", **{str(k): str(v) for k, v in spec.labels.items()}},
        env_vars={str(k): str(v) for k, v in spec.env.items()},
        # The lease: stopped after this many minutes without API activity, and deleted as soon as it stops.
        # Processes inside a sandbox do not count as activity, so _exec renews it while a command runs.
        auto_stop_interval=lease_minutes(spec),
        auto_delete_interval=0,
        ttl_minutes=max(1, math.ceil(ttl / 60)) if ttl else int(_float_opt(opts, "ttl_minutes", DEFAULT_TTL_MINUTES)),
        network_block_all=True if not spec.network else None,
        name=_name(spec.idempotency_key),
    )
    if opts.get("target"):
        common["target"] = str(opts["target"])
    if spec.environment:  # a prepared snapshot, built for this step's size: no resources may be sent
        return CreateSandboxFromSnapshotParams(snapshot=spec.environment, **common)
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
    policy = _retry.Policy.from_options(spec.options)
    daytona = _client.client(spec.options)
    params = _params(spec, daytona)
    timeout = _client.sdk_timeout(_float_opt(spec.options, "create_timeout", CREATE_TIMEOUT))
    maybe_made: list[bool] = []
    try:
        sandbox = _create_once(daytona, params, timeout, policy, maybe_made)
    except Exception as exc:
        if maybe_made:  # a create that may have happened leaves nothing behind
            _delete_by_name(daytona, params.name, policy)
        _recover_named(daytona, params, exc)
    workdir = _workdir(sandbox, policy)
    return _handle(sandbox, spec.options, workdir)


def _create_once(daytona: Any, params: Any, timeout: float, policy: _retry.Policy, maybe_made: list[bool]) -> Any:
    """POST the create, retrying what may be retried: the name is unique, so a create that happened
    although its answer was lost (5xx, reset, timeout) answers 409 the next time and is fetched by name.
    ``maybe_made`` gets an entry once an attempt failed in a way that does not rule out a sandbox."""
    from daytona.common.errors import DaytonaConflictError

    def attempt() -> Any:
        try:
            return daytona.create(params, timeout=timeout)
        except DaytonaConflictError:
            return _adopt(daytona, params.name, timeout, policy)
        except Exception as exc:
            if not (_retry.status_of(exc) in (400, 401, 403, 404, 429) or _retry.is_refused(exc)):
                maybe_made.append(True)
            raise

    return _retry.call(attempt, "create", policy)


def _adopt(daytona: Any, name: str, timeout: float, policy: _retry.Policy) -> Any:
    """The sandbox an earlier attempt of this very create made (ours only if it carries our marker)."""
    from daytona.common.errors import DaytonaConflictError

    found = _retry.call(lambda: daytona.get(name), "get %s" % name, policy)
    if (found.labels or {}).get(MARKER_LABEL) != "1":
        raise DaytonaConflictError("a sandbox named %s exists and was not made by metaflow-sandbox" % name, status_code=409)
    if not str(found.state).lower().endswith("started"):
        found.wait_for_sandbox_start(timeout=timeout)
    log.info("daytona: found sandbox %s (%s) made by an earlier attempt of this create", found.id, name)
    return found


def _delete_by_name(daytona: Any, name: str | None, policy: _retry.Policy) -> None:
    """Best effort after a failed create: delete what may have been made under ``name``; the lease covers the rest."""
    if not name:
        return
    from daytona.common.errors import DaytonaNotFoundError

    try:
        found = _retry.call(lambda: daytona.get(name), "get %s" % name, policy)
    except DaytonaNotFoundError:
        return
    except Exception as exc:
        log.warning("daytona: could not check for a half-made sandbox %s (%s); its lease deletes it", name, exc)
        return
    if (found.labels or {}).get(MARKER_LABEL) == "1":
        _delete_quietly(found, policy)


def _recover_named(daytona: Any, params: Any, exc: Exception) -> NoReturn:
    """Turn a failed create into the error that names its fix."""
    from daytona.common.errors import DaytonaNotFoundError

    if isinstance(exc, DaytonaNotFoundError):
        what = "snapshot %r" % params.snapshot if getattr(params, "snapshot", None) else "the default snapshot"
        raise SandboxError(
            "Daytona could not create a sandbox from %s: %s" % (what, getattr(exc, "message", exc)),
            hint="set an existing snapshot with the snapshot option (METAFLOW_SANDBOX_DAYTONA_SNAPSHOT), "
            "see `daytona snapshot list`, or set image=...",
            backend=NAME,
            op="sandbox_create",
        ) from exc
    translate(exc, op="sandbox_create", sandbox_id=getattr(exc, "sandbox_id", None))


def _workdir(sandbox: Any, policy: _retry.Policy) -> str:
    try:
        return str(_retry.call(sandbox.get_work_dir, "read the work dir", policy))
    except Exception as exc:
        _delete_quietly(sandbox, policy)
        translate(exc, op="sandbox_create", sandbox_id=sandbox.id, retry_safe=False)


def _handle(sandbox: Any, options: Mapping[str, Any], workdir: str) -> SandboxHandle:
    labels = dict(sandbox.labels or {})
    return SandboxHandle(NAME, sandbox.id, workdir=workdir, labels=labels, options=dict(options), native=sandbox)


def sdk_sandbox(handle: SandboxHandle) -> Any:
    """The SDK Sandbox for a handle (a handle rebuilt from an id costs one GET)."""
    if handle.native is not None:
        return handle.native
    daytona = _client.client(handle.options)
    try:
        return _retry.call(lambda: daytona.get(handle.sandbox_id), "get", _retry.Policy.from_options(handle.options))
    except Exception as exc:
        translate(exc, op="get", sandbox_id=handle.sandbox_id)


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
    return _exec.run(handle, sdk_sandbox(handle), command, env, cwd, on_stdout, on_stderr, exec_id)


@hookimpl
def sandbox_exec_kill(handle: SandboxHandle, exec_id: str) -> bool:
    return _exec.kill(handle, sdk_sandbox(handle), exec_id)


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    return _files.upload(handle, sdk_sandbox(handle), files)


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    return _files.download(handle, sdk_sandbox(handle), files)


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    """Delete, retrying until it is gone (404 counts as gone); after the retry budget, say so and leave it to the lease."""
    from daytona.common.errors import DaytonaNotFoundError

    try:
        sandbox = sdk_sandbox(handle)
    except SandboxNotFoundError:
        return False
    if str(getattr(sandbox, "state", "")).lower().endswith(("destroyed", "destroying")):
        return False
    policy = _retry.Policy.from_options(handle.options)
    tries = [0]

    def delete() -> None:
        tries[0] += 1
        sandbox.delete(timeout=_client.sdk_timeout(60))

    try:
        _retry.call(delete, "delete", policy)
    except DaytonaNotFoundError:
        return tries[0] > 1  # gone on a retry: an earlier attempt deleted it, its answer was lost
    except Exception as exc:
        lease = getattr(sandbox, "auto_stop_interval", None) or "a few"
        raise SandboxError(
            "could not delete Daytona sandbox %s: %s" % (handle.sandbox_id, getattr(exc, "message", None) or exc),
            hint="nothing to do: its lease stops and deletes it within %s minutes (the lease is METAFLOW_SANDBOX_LEASE_SECONDS); "
            "`metaflow-sandbox list --backend daytona` shows it until then" % lease,
            backend=NAME,
            op="sandbox_destroy",
            sandbox_id=handle.sandbox_id,
        ) from exc
    return True


def _delete_quietly(sandbox: Any, policy: _retry.Policy | None = None) -> None:
    try:
        _retry.call(lambda: sandbox.delete(timeout=_client.sdk_timeout(60)), "delete", policy or _retry.Policy())
    except Exception as exc:  # best effort: the lease (auto-stop, then auto-delete) and the ttl still reap it
        log.warning("daytona: could not delete sandbox %s (%s); its lease deletes it", sandbox.id, exc)


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    from daytona import ListSandboxesQuery

    daytona = _client.client(options)
    query = ListSandboxesQuery(labels={MARKER_LABEL: "1", **{str(k): str(v) for k, v in labels.items()}})
    try:
        found = _retry.call(lambda: list(daytona.list(query)), "list", _retry.Policy.from_options(options))
    except Exception as exc:
        translate(exc, op="sandbox_list")
    live = [s for s in found if not str(s.state).lower().endswith(("destroyed", "destroying"))]
    return [_handle(s, options, "/home/daytona") for s in live]


@hookimpl
def sandbox_environment_prepare(environment: EnvironmentSpec, on_log: Any) -> PreparedEnvironment:
    """A snapshot per environment key and size, built by Daytona from a declarative image (``_environments``)."""
    return _environments.prepare(environment, on_log)


@hookimpl
def sandbox_environment_list(options: Mapping[str, Any]) -> list[PreparedEnvironment]:
    return _environments.list_all(options)


@hookimpl
def sandbox_environment_remove(ref: str, options: Mapping[str, Any]) -> bool:
    return _environments.remove(ref, options)
