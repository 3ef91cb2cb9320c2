"""Prepared environments on Daytona: one snapshot per environment key and resource class.

A snapshot is built once by Daytona from a declarative image (``Image.debian_slim(python)`` or
``Image.base(image)``, then ``pip_install(requirements)``) and named ``mfsb-env-<key>-c<cpu>m<GiB>d<GiB>``:
a snapshot fixes its sandboxes' size (Daytona refuses resources on a create from a snapshot), so each
resource class gets its own. Snapshots carry no labels in Daytona, so ours are found by the
``mfsb-env-`` name prefix. Two launchers building the same name end with one snapshot: the second
create answers 409 and that launcher waits for the first one's build.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.request
from datetime import datetime
from typing import Any, Callable, Mapping, Optional

from metaflow_sandbox import (
    EnvironmentBuildError,
    EnvironmentSpec,
    PreparedEnvironment,
    Resources,
    UnsupportedOptionError,
)

from . import _client, _retry
from ._client import NAME, translate

log = logging.getLogger("metaflow_sandbox.daytona")

#: What every ``EnvironmentSpec.name`` starts with: how ours are told apart from the user's snapshots.
ENVIRONMENT_PREFIX = "mfsb-env-"
#: How long a build (ours or another launcher's) may take before we give up on it (option build_timeout).
DEFAULT_BUILD_TIMEOUT = 1800.0
BUILDING = ("pending", "building", "pulling", "snapshotting")
FAILED = ("error", "build_failed")
TAIL_LINES = 40
FIX = (
    "fix the requirement (the step's packages= / requirements_file=, or the base image=) and rerun; "
    "the build log is above. To skip building, set @sandbox(prepare=False) or METAFLOW_SANDBOX_PREPARE=0"
)

OnLog = Optional[Callable[[str], None]]


def size_class(resources: Resources) -> dict[str, int]:
    """The snapshot's size: Daytona's units (whole vCPUs, GiB), its defaults when the step names none."""
    size = {
        "cpu": max(1, math.ceil(resources.cpu)) if resources.cpu else 1,
        "memory": max(1, math.ceil(resources.memory_mb / 1024)) if resources.memory_mb else 1,
        "disk": max(1, math.ceil(resources.disk_mb / 1024)) if resources.disk_mb else 3,
    }
    if resources.gpu:
        size["gpu"] = int(resources.gpu)
    return size


def snapshot_name(environment: EnvironmentSpec) -> str:
    size = size_class(environment.resources)
    suffix = "c%(cpu)dm%(memory)dd%(disk)d" % size + ("g%d" % size["gpu"] if "gpu" in size else "")
    return "%s-%s" % (environment.name, suffix)


def key_of(name: str) -> str:
    """The environment key in one of our snapshot names (``mfsb-env-<key>-<size>``)."""
    return name[len(ENVIRONMENT_PREFIX) :].split("-", 1)[0]


def _state(snapshot: Any) -> str:
    state = getattr(snapshot, "state", "")
    return str(getattr(state, "value", state)).lower()


def _epoch(value: Any) -> Optional[float]:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _prepared(snapshot: Any, built: bool) -> PreparedEnvironment:
    state = _state(snapshot)
    size = getattr(snapshot, "size", None)
    return PreparedEnvironment(
        backend=NAME,
        ref=str(snapshot.name),
        key=key_of(str(snapshot.name)),
        state="ready" if state == "active" else "failed" if state in FAILED else "building",
        built=built,
        created_at=_epoch(getattr(snapshot, "created_at", None)),
        last_used_at=_epoch(getattr(snapshot, "last_used_at", None)),
        size_bytes=int(size * 1e9) if isinstance(size, (int, float)) else None,
        detail="%s; cpu=%s mem=%sGiB disk=%sGiB%s" % (state, snapshot.cpu, snapshot.mem, snapshot.disk, _reason(snapshot)),
    )


def _reason(snapshot: Any) -> str:
    reason = getattr(snapshot, "error_reason", None)
    return "; %s" % reason if reason else ""


def _find(daytona: Any, name: str, policy: _retry.Policy) -> Any:
    """The snapshot by name, or None."""
    from daytona.common.errors import DaytonaNotFoundError

    try:
        return _retry.call(lambda: daytona.snapshot.get(name), "snapshot lookup", policy)
    except DaytonaNotFoundError:
        return None
    except Exception as exc:
        translate(exc, op="sandbox_environment_prepare")


def _image(environment: EnvironmentSpec) -> Any:
    from daytona import Image

    base = Image.base(environment.image) if environment.image else Image.debian_slim(environment.python_version)  # type: ignore[arg-type]
    requirements = sorted(set(environment.requirements))
    return base.pip_install(requirements) if requirements else base


def prepare(environment: EnvironmentSpec, on_log: OnLog) -> PreparedEnvironment:
    """Find the snapshot by name or build it; block until it is active (see the module docstring)."""
    from daytona.common.errors import DaytonaConflictError

    options = environment.options
    _client.resolve_config(options)
    policy = _retry.Policy.from_options(options)
    timeout = _retry.number_option(options, "build_timeout", DEFAULT_BUILD_TIMEOUT, 1)
    daytona = _client.client(options)
    name = snapshot_name(environment)
    rebuilt = reactivated = False
    while True:
        found = _find(daytona, name, policy)
        if found is None:
            try:
                return _prepared(_build(daytona, environment, name, on_log, timeout), built=True)
            except DaytonaConflictError:  # another launcher started the same build a moment ago
                found = _find(daytona, name, policy)
                if found is None:
                    continue
        if _state(found) == "inactive" and not reactivated:  # unused for 14 days: Daytona deactivated it
            reactivated = True
            _say(on_log, "reactivating Daytona snapshot %s (inactive after 14 days unused)" % name)
            try:
                _retry.call(lambda: daytona.snapshot.activate(name), "snapshot activate", policy)
            except Exception as exc:
                translate(exc, op="sandbox_environment_prepare")
            continue
        if _state(found) in BUILDING:
            found = _wait(daytona, name, on_log, timeout, policy)
        state = _state(found)
        if state == "active":
            return _prepared(found, built=False)
        if state in FAILED and not rebuilt:  # a stale failure (ours are deleted): try once more
            rebuilt = True
            _say(on_log, "snapshot %s is %s (%s); removing it and building again" % (name, state, found.error_reason))
            _delete(daytona, name, policy)
            continue
        raise _build_error(daytona, found, name, [])


def _build(daytona: Any, environment: EnvironmentSpec, name: str, on_log: OnLog, timeout: float) -> Any:
    """Create the snapshot, streaming Daytona's build log; a failed build is deleted and raised."""
    from daytona import CreateSnapshotParams
    from daytona import Resources as DaytonaResources
    from daytona.common.errors import DaytonaConflictError

    lines: list[str] = []

    def logs(chunk: str) -> None:
        lines.extend(chunk.splitlines())
        _say(on_log, chunk)

    size = size_class(environment.resources)
    params = CreateSnapshotParams(name=name, image=_image(environment), resources=DaytonaResources(**size))  # type: ignore[arg-type]
    start = time.monotonic()
    _say(on_log, "building Daytona snapshot %s (%s)" % (name, ", ".join(sorted(set(environment.requirements))) or "no packages"))
    try:
        snapshot = daytona.snapshot.create(params, on_logs=logs, timeout=_client.sdk_timeout(timeout))
    except DaytonaConflictError:
        raise
    except Exception as exc:
        snapshot = _after_failed_create(daytona, name, lines, exc, on_log, timeout)
    _say(on_log, "built Daytona snapshot %s in %.1fs" % (name, time.monotonic() - start))
    return snapshot


def _after_failed_create(daytona: Any, name: str, lines: list[str], exc: Exception, on_log: OnLog, timeout: float) -> Any:
    """The create raised: a failed build (deleted, raised with its log), a build the SDK lost track of
    (a dropped poll: followed to its end), a timeout, or nothing made (the API error, translated)."""
    from daytona.common.errors import DaytonaTimeoutError

    policy = _retry.Policy()
    try:
        found = _find(daytona, name, policy)
    except Exception:  # the API is unreachable: report the create's own error
        found = None
    if found is not None and _state(found) in BUILDING:
        if isinstance(exc, DaytonaTimeoutError):
            raise EnvironmentBuildError(
                "Daytona snapshot %s is still %s after %.0fs" % (name, _state(found), timeout),
                build_log="\n".join(lines[-TAIL_LINES:]),
                hint="rerun later to use it once built (it is left building), or allow longer builds with "
                "METAFLOW_SANDBOX_DAYTONA_BUILD_TIMEOUT (seconds)",
                backend=NAME,
                op="sandbox_environment_prepare",
            ) from exc
        found = _wait(daytona, name, on_log, timeout, policy)
    if found is not None and _state(found) == "active":
        return found
    if found is not None and _state(found) in FAILED:
        error = _build_error(daytona, found, name, lines, str(getattr(exc, "message", None) or exc))
        _delete(daytona, name, policy)  # nothing half-built is left, or taken for a ready one
        raise error from exc
    if found is not None:
        _delete(daytona, name, policy)
    translate(exc, op="sandbox_environment_prepare")


def _wait(daytona: Any, name: str, on_log: OnLog, timeout: float, policy: _retry.Policy) -> Any:
    """Another launcher is building it: poll until it ends (one line on the console, not one per poll)."""
    deadline = time.monotonic() + timeout
    _say(on_log, "waiting for Daytona snapshot %s, being built by another launcher" % name)
    while True:
        found = _find(daytona, name, policy)
        if found is None:
            raise EnvironmentBuildError(
                "Daytona snapshot %s disappeared while it was being built" % name,
                hint="another launcher removed it (metaflow-sandbox environments rm); rerun to build it again",
                backend=NAME,
                op="sandbox_environment_prepare",
            )
        if _state(found) not in BUILDING:
            return found
        if time.monotonic() > deadline:
            raise EnvironmentBuildError(
                "Daytona snapshot %s is still %s after %.0fs" % (name, _state(found), timeout),
                hint="wait and rerun, or allow longer builds with METAFLOW_SANDBOX_DAYTONA_BUILD_TIMEOUT (seconds)",
                backend=NAME,
                op="sandbox_environment_prepare",
            )
        time.sleep(1.0)


def _build_error(daytona: Any, snapshot: Any, name: str, lines: list[str], message: str = "") -> EnvironmentBuildError:
    reason = getattr(snapshot, "error_reason", None) or message or "the build failed"
    streamed = [line for line in lines if line.strip()]
    fetched = _fetch_log(daytona, snapshot) if snapshot is not None else []
    tail = "\n".join((fetched if len(fetched) > len(streamed) else streamed)[-TAIL_LINES:])
    return EnvironmentBuildError(
        "Daytona could not build snapshot %s: %s" % (name, reason),
        build_log=tail,
        hint=FIX,
        backend=NAME,
        op="sandbox_environment_prepare",
    )


def _fetch_log(daytona: Any, snapshot: Any) -> list[str]:
    """The whole build log, as the SDK itself reads it (build-logs-url, then a GET): best effort."""
    try:
        from daytona_api_client import SnapshotsApi

        api = SnapshotsApi(daytona._api_client)
        url = api.get_snapshot_build_logs_url(snapshot.id).url
        request = urllib.request.Request(url, headers=dict(api.api_client.default_headers))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(urllib.request.getproxies()))
        with opener.open(request, timeout=30) as response:
            return response.read().decode("utf-8", "replace").splitlines()
    except Exception as exc:  # the reason still names what failed
        log.debug("daytona: could not read the build log of %s: %s", getattr(snapshot, "name", "?"), exc)
        return []


def _delete(daytona: Any, name: str, policy: _retry.Policy) -> bool:
    from daytona.common.errors import DaytonaNotFoundError

    try:
        _retry.call(lambda: daytona.snapshot.delete(name), "snapshot delete", policy)
        return True
    except DaytonaNotFoundError:
        return False
    except Exception as exc:
        log.warning("daytona: could not delete snapshot %s (%s); `metaflow-sandbox environments rm` removes it", name, exc)
        return False


def _say(on_log: OnLog, text: str) -> None:
    if on_log is not None and text:
        on_log(text if text.endswith("\n") else text + "\n")


def list_all(options: Mapping[str, Any]) -> list[PreparedEnvironment]:
    """Our snapshots (by name prefix: Daytona snapshots carry no labels), every page."""
    daytona = _client.client(options)
    policy = _retry.Policy.from_options(options)
    found: list[PreparedEnvironment] = []
    page = 1
    while True:
        try:
            result = _retry.call(lambda n=page: daytona.snapshot.list(page=n, limit=200), "snapshot list", policy)  # type: ignore[misc]
        except Exception as exc:
            translate(exc, op="sandbox_environment_list")
        found += [_prepared(s, built=False) for s in result.items if str(s.name).startswith(ENVIRONMENT_PREFIX)]
        if page >= (result.total_pages or 1):
            return found
        page += 1


def remove(ref: str, options: Mapping[str, Any]) -> bool:
    if not ref.startswith(ENVIRONMENT_PREFIX):
        raise UnsupportedOptionError(
            "%s is not a prepared environment (they are named %s...)" % (ref, ENVIRONMENT_PREFIX),
            hint="see `metaflow-sandbox environments list --backend daytona`",
            backend=NAME,
            op="sandbox_environment_remove",
        )
    daytona = _client.client(options)
    from daytona.common.errors import DaytonaNotFoundError

    try:
        _retry.call(lambda: daytona.snapshot.delete(ref), "snapshot delete", _retry.Policy.from_options(options))
    except DaytonaNotFoundError:
        return False
    except Exception as exc:
        translate(exc, op="sandbox_environment_remove")
    return True
