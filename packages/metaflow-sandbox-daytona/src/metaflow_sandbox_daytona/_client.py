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
    read_option,
)

NAME = "daytona"
ENV_VARS = ("DAYTONA_API_KEY", "DAYTONA_API_URL", "DAYTONA_TARGET")

DEFAULT_URL = "https://app.daytona.io/api"

_clients: dict[tuple[str, str | None, str | None], Any] = {}
_lock = threading.Lock()
_last_url: str | None = None


@dataclass(frozen=True)
class Config:
    api_key: str
    api_url: str | None
    target: str | None


def resolve_config(options: Mapping[str, Any]) -> Config:
    """Options (``api_key``/``api_url``/``target``, METAFLOW_SANDBOX_DAYTONA_*) win over DAYTONA_* env vars; no network call."""
    key = read_option(options, NAME, "api_key", ("DAYTONA_API_KEY",))
    if not key:
        raise BackendNotConfiguredError(NAME, "DAYTONA_API_KEY")
    return Config(
        key, read_option(options, NAME, "api_url", ("DAYTONA_API_URL",)), read_option(options, NAME, "target", ("DAYTONA_TARGET",))
    )


def client(options: Mapping[str, Any]) -> Any:
    """One cached ``daytona.Daytona`` per configuration (building one opens a socket.io attempt)."""
    global _last_url
    cfg = resolve_config(options)
    _last_url = cfg.api_url or DEFAULT_URL
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


URL_HINT = "check DAYTONA_API_URL (or METAFLOW_SANDBOX_DAYTONA_API_URL; default %s) and DAYTONA_API_KEY" % DEFAULT_URL
KEY_HINT = "check DAYTONA_API_KEY (or METAFLOW_SANDBOX_DAYTONA_API_KEY) and that DAYTONA_API_URL (%s) is the API it belongs to"


def api_url() -> str:
    """The API URL the last client was built for (for messages)."""
    return _last_url or os.environ.get("DAYTONA_API_URL") or DEFAULT_URL


def translate(exc: BaseException, *, op: str, sandbox_id: str | None = None, retry_safe: bool = True) -> NoReturn:
    """Raise the metaflow_sandbox error matching an SDK exception (always raises).

    ``retry_safe`` says whether the server certainly did nothing (then 429/5xx/connection
    errors are transient); pass False for calls whose effect is unknown after a dropped reply.
    A failure ``_retry.call`` already retried to its budget is final: not transient any more.
    """
    from daytona.common import errors

    from . import _retry

    if isinstance(exc, SandboxError):
        raise exc
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    status = _retry.status_of(exc)
    kw: dict[str, Any] = {"backend": NAME, "op": op, "sandbox_id": sandbox_id}
    url = api_url()
    if isinstance(exc, errors.DaytonaAuthenticationError) or status == 401:
        raise SandboxError("Daytona at %s rejected the API key (401): %s" % (url, message), hint=KEY_HINT % url, **kw) from exc
    if isinstance(exc, errors.DaytonaNotFoundError) or status == 404:
        raise SandboxNotFoundError(
            "Daytona sandbox not found: %s" % message,
            hint="the sandbox was deleted or expired (its lease, ttl or auto-delete); rerun the task",
            **kw,
        ) from exc
    attempts = getattr(exc, "retry_attempts_made", None)
    connection = _retry.is_connection_error(exc)
    if connection:
        what = "could not reach Daytona at %s" % url
        if attempts:
            what += " (%s)" % _tried(exc)
        cls = TransientBackendError if retry_safe and not attempts else SandboxError
        raise cls("%s: %s" % (what, _short(message)), hint=URL_HINT + "; is the network up?", **kw) from exc
    if _retry.is_transient(exc):
        if attempts:
            raise SandboxError(
                "Daytona kept failing during %s (%s, %s): %s" % (op, status, _tried(exc), message),
                hint="Daytona is unavailable or throttling; retry later, or allow more with METAFLOW_SANDBOX_DAYTONA_RETRY_SECONDS "
                "and fewer sandboxes at once with METAFLOW_SANDBOX_DAYTONA_CONCURRENCY",
                **kw,
            ) from exc
        # 429/503 mean the server refused the call, so even a non-idempotent one did not happen.
        if retry_safe or status in (429, 503):
            raise TransientBackendError("Daytona is unavailable or throttling (%s): %s" % (status, message), **kw) from exc
        raise SandboxError(
            "Daytona failed during %s (%s): %s" % (op, status, message),
            hint="the outcome is unknown; check `metaflow-sandbox list --backend daytona` and retry the run",
            **kw,
        ) from exc
    if isinstance(exc, errors.DaytonaTimeoutError):
        raise SandboxTimeoutError("Daytona %s timed out: %s" % (op, message), hint="raise the timeout or retry later", **kw) from exc
    if isinstance(exc, errors.DaytonaForbiddenError) or status == 403:
        hint = (
            "your Daytona plan or organisation limits refuse this (lower cpu/memory/disk or ask Daytona to raise them), "
            "or the key lacks the permission: " + KEY_HINT % url
        )
    elif status == 400 or isinstance(exc, errors.DaytonaBadRequestError):
        hint = "Daytona refused the request; check the daytona options (snapshot, image, resources)"
    elif status is None:
        raise SandboxError(
            "Daytona at %s gave an answer the SDK could not read during %s: %s" % (url, op, _short(message)),
            hint="is DAYTONA_API_URL the Daytona API (it ends in /api)? " + URL_HINT,
            **kw,
        ) from exc
    else:
        hint = "Daytona answered %s from %s; if it persists, report it with the sandbox id (%s)" % (status, url, URL_HINT)
    raise SandboxError("Daytona %s failed (%s): %s" % (op, status, message), hint=hint, **kw) from exc


def _tried(exc: BaseException) -> str:
    n = getattr(exc, "retry_attempts_made", 0)
    return "%d attempt%s over %.0fs" % (n, "" if n == 1 else "s", getattr(exc, "retry_seconds_spent", 0.0))


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
