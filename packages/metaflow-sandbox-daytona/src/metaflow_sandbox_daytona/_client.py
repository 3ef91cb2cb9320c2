"""The only module that touches the Daytona SDK, always lazily (inside functions).

It resolves credentials, caches one SDK client per (key, url, target), picks SDK timeouts that
never clobber someone else's SIGALRM, and translates SDK errors into metaflow_sandbox errors.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Mapping, NoReturn

from metaflow_sandbox import (
    BackendNotConfiguredError,
    SandboxError,
    SandboxNotFoundError,
    SandboxTimeoutError,
    TransientBackendError,
)

NAME = "daytona"
ENV_VARS = ("DAYTONA_API_KEY", "DAYTONA_API_URL", "DAYTONA_TARGET")

_clients: dict[tuple[str, str | None, str | None], Any] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Config:
    api_key: str
    api_url: str | None
    target: str | None


def _opt(options: Mapping[str, Any], key: str) -> str | None:
    for k in (key, key.upper(), "daytona_" + key, ("daytona_" + key).upper()):
        value = options.get(k)
        if value not in (None, ""):
            return str(value)
    return None


def resolve_config(options: Mapping[str, Any]) -> Config:
    """Options (``api_key``/``api_url``/``target``) win over DAYTONA_* env vars; no network call."""
    key = _opt(options, "api_key") or os.environ.get("DAYTONA_API_KEY")
    if not key:
        raise BackendNotConfiguredError(NAME, "DAYTONA_API_KEY")
    url = _opt(options, "api_url") or os.environ.get("DAYTONA_API_URL") or None
    target = _opt(options, "target") or os.environ.get("DAYTONA_TARGET") or None
    return Config(key, url, target)


def client(options: Mapping[str, Any]) -> Any:
    """One cached ``daytona.Daytona`` per configuration (building one opens a socket.io attempt)."""
    cfg = resolve_config(options)
    cache_key = (cfg.api_key, cfg.api_url, cfg.target)
    with _lock:
        found = _clients.get(cache_key)
        if found is None:
            from daytona import Daytona, DaytonaConfig

            try:
                found = Daytona(DaytonaConfig(api_key=cfg.api_key, api_url=cfg.api_url, target=cfg.target))
            except Exception as exc:
                translate(exc, op="connect")
            _clients[cache_key] = found
        return found


def sdk_timeout(seconds: float) -> float:
    """Timeout to hand a ``@with_timeout`` SDK method.

    On the main thread those methods arm SIGALRM and cancel any alarm already pending when they
    leave (see docs/backends/daytona.md, "timeouts"). If the caller already has an alarm armed
    (e.g. Metaflow's ``@timeout``), pass 0 (= no SDK timeout) rather than clobber it.
    """
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
                return 0
        except (AttributeError, ValueError):
            return 0
    return seconds


def translate(exc: BaseException, *, op: str, sandbox_id: str | None = None, retry_safe: bool = True) -> NoReturn:
    """Raise the metaflow_sandbox error matching an SDK exception (always raises).

    ``retry_safe`` says whether the server certainly did nothing (then 429/5xx/connection
    errors are transient); pass False for calls whose effect is unknown after a dropped reply.
    """
    from daytona.common import errors

    if isinstance(exc, SandboxError):
        raise exc
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    status = getattr(exc, "status_code", None)
    kw: dict[str, Any] = {"backend": NAME, "op": op, "sandbox_id": sandbox_id}
    if isinstance(exc, errors.DaytonaAuthenticationError) or status == 401:
        raise SandboxError(
            "Daytona rejected the API key: %s" % message,
            hint="check DAYTONA_API_KEY (or METAFLOW_SANDBOX_DAYTONA_API_KEY) and DAYTONA_API_URL",
            **kw,
        ) from exc
    if isinstance(exc, errors.DaytonaNotFoundError) or status == 404:
        raise SandboxNotFoundError(
            "Daytona sandbox not found: %s" % message,
            hint="the sandbox was deleted or expired (ttl/auto-delete); rerun the task",
            **kw,
        ) from exc
    transient_types = (
        errors.DaytonaRateLimitError,
        errors.DaytonaServiceUnavailableError,
        errors.DaytonaBadGatewayError,
        errors.DaytonaInternalServerError,
    )
    refused = isinstance(exc, (errors.DaytonaRateLimitError, errors.DaytonaServiceUnavailableError)) or status in (
        429,
        503,
    )
    if isinstance(exc, transient_types) or status in (500, 502, 503, 504) or _is_connection_error(exc):
        # 429/503 mean the server refused the call, so even a non-idempotent one did not happen.
        if retry_safe or refused:
            raise TransientBackendError("Daytona is unavailable or throttling (%s): %s" % (status or "connection", message), **kw) from exc
        raise SandboxError(
            "Daytona failed during %s (%s): %s" % (op, status or "connection", message),
            hint="the outcome is unknown; check `metaflow-sandbox list --backend daytona` and retry the run",
            **kw,
        ) from exc
    if isinstance(exc, errors.DaytonaTimeoutError):
        raise SandboxTimeoutError("Daytona %s timed out: %s" % (op, message), hint="raise the timeout or retry later", **kw) from exc
    if isinstance(exc, errors.DaytonaForbiddenError) or status == 403:
        hint = "your Daytona plan or organisation limits refuse this; lower cpu/memory/disk or ask Daytona to raise limits"
    elif status == 400 or isinstance(exc, errors.DaytonaBadRequestError):
        hint = "Daytona refused the request; check the daytona options (snapshot, image, resources)"
    else:
        hint = "see the Daytona message above; if it persists, report it with the sandbox id"
    raise SandboxError("Daytona %s failed: %s" % (op, message), hint=hint, **kw) from exc


def _is_connection_error(exc: BaseException) -> bool:
    from daytona.common import errors

    if isinstance(exc, errors.DaytonaConnectionError):
        return True
    try:
        import httpx
        import urllib3

        return isinstance(exc, (urllib3.exceptions.HTTPError, httpx.TransportError, ConnectionError))
    except ImportError:  # pragma: no cover - both ship with the SDK
        return isinstance(exc, ConnectionError)
