"""Retries for the Daytona calls that are safe to repeat (reads, session creation, deletes, file ops).

Exponential backoff with full jitter, never shorter than the server's ``Retry-After``, bounded in
attempts and in total time (options ``retry_attempts`` / ``retry_seconds``). What gave up carries
``retry_attempts_made`` so ``_client.translate`` says so and the facade does not retry it again.
Starting a command is never passed through here: that would run user code twice (see ``_exec``).
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TypeVar

log = logging.getLogger("metaflow_sandbox.daytona")
T = TypeVar("T")

#: Statuses worth another try: throttled, timed out, or a server/proxy failure.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_ATTEMPTS = 8
DEFAULT_SECONDS = 60.0
BASE_DELAY = 0.2
MAX_DELAY = 10.0
#: A refused connection (wrong URL, provider down) stops being retried sooner: usually a setting to fix.
REFUSED_SECONDS = 15.0


@dataclass(frozen=True)
class Policy:
    """How hard to try: at most ``attempts`` calls, and no new one after ``seconds``."""

    attempts: int = DEFAULT_ATTEMPTS
    seconds: float = DEFAULT_SECONDS
    base: float = BASE_DELAY
    cap: float = MAX_DELAY

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Policy:
        """``retry_attempts`` (>= 1) and ``retry_seconds`` (> 0) from the backend options."""
        return cls(
            attempts=int(number_option(options, "retry_attempts", DEFAULT_ATTEMPTS, 1)),
            seconds=number_option(options, "retry_seconds", DEFAULT_SECONDS, 0.001),
        )


def number_option(options: Mapping[str, Any], key: str, default: float, low: float) -> float:
    """A finite number >= ``low`` from the options, or an error naming the setting (metaflow_sandbox.read_number_option)."""
    from metaflow_sandbox import read_number_option

    return float(read_number_option(options, "daytona", key, default, low))  # type: ignore[arg-type]


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: Optional[BaseException] = exc
    while cur is not None and len(out) < 8:
        out.append(cur)
        reason = getattr(cur, "reason", None)  # urllib3's MaxRetryError keeps the real error here
        cur = cur.__cause__ or cur.__context__ or (reason if isinstance(reason, BaseException) else None)
    return out


def status_of(exc: BaseException) -> Optional[int]:
    """The HTTP status behind an SDK error (the SDK's httpx file calls keep it only in the cause)."""
    for cur in _chain(exc):
        status = getattr(cur, "status_code", None)
        if status is None:
            status = getattr(getattr(cur, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _headers(exc: BaseException) -> Mapping[str, Any]:
    for cur in _chain(exc):
        headers = getattr(cur, "headers", None) or getattr(getattr(cur, "response", None), "headers", None)
        if headers:
            return headers
    return {}


def is_connection_error(exc: BaseException) -> bool:
    """A refused, reset or timed-out connection anywhere in the exception's cause chain."""
    import httpx
    import urllib3
    from daytona.common import errors

    for cur in _chain(exc):
        if _throttled_out(cur):
            return False
        if isinstance(cur, (errors.DaytonaConnectionError, urllib3.exceptions.HTTPError, httpx.TransportError, ConnectionError)):
            return True
        if isinstance(cur, TimeoutError) and not isinstance(cur, errors.DaytonaError):
            return True
    text = str(exc)
    return "Max retries exceeded" in text or "Connection refused" in text or "Connection reset" in text


def _throttled_out(exc: BaseException) -> bool:
    """urllib3 itself gave up after waiting out several 429/503 ``Retry-After`` answers: throttling, not a lost connection."""
    import urllib3

    reason = getattr(exc, "reason", None)
    return isinstance(exc, urllib3.exceptions.ResponseError) or isinstance(reason, urllib3.exceptions.ResponseError)


def is_refused(exc: BaseException) -> bool:
    """The connection was never made (refused, unknown host): the server cannot have done anything."""
    import urllib3

    if any(isinstance(cur, (urllib3.exceptions.NewConnectionError, ConnectionRefusedError)) for cur in _chain(exc)):
        return True
    text = str(exc)
    return any(t in text for t in ("Connection refused", "Failed to establish a new connection", "Name or service not known"))


def is_transient(exc: BaseException) -> bool:
    from daytona.common import errors

    if status_of(exc) in RETRY_STATUSES or any(_throttled_out(cur) for cur in _chain(exc)):
        return True
    if isinstance(
        exc,
        (
            errors.DaytonaRateLimitError,
            errors.DaytonaServiceUnavailableError,
            errors.DaytonaBadGatewayError,
            errors.DaytonaInternalServerError,
        ),
    ):
        return True
    return is_connection_error(exc)


def retry_after(exc: BaseException) -> Optional[float]:
    """Seconds the server asked us to wait (``Retry-After``: seconds or an HTTP date), if any."""
    raw = next((v for k, v in _headers(exc).items() if str(k).lower() == "retry-after"), None)
    if raw in (None, ""):
        return None
    try:
        return max(0.0, float(raw))
    except (TypeError, ValueError):
        try:
            when = email.utils.parsedate_to_datetime(str(raw))
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def call(fn: Callable[[], T], what: str, policy: Policy, retry_if: Optional[Callable[[BaseException], bool]] = None) -> T:
    """``fn()``, retried on transient failures; the last failure is re-raised, marked with the attempts made."""
    check = retry_if or is_transient
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            elapsed = time.monotonic() - start
            if not check(exc):
                raise
            delay = random.uniform(0, min(policy.cap, policy.base * (2 ** (attempt - 1))))
            asked = retry_after(exc)
            if asked is not None:
                delay = max(delay, asked)
            budget = min(policy.seconds, REFUSED_SECONDS) if is_refused(exc) else policy.seconds
            if attempt >= policy.attempts or elapsed + delay > budget:
                exc.retry_attempts_made = attempt  # type: ignore[attr-defined]
                exc.retry_seconds_spent = elapsed  # type: ignore[attr-defined]
                raise
            log.info("daytona: %s failed (%s); retry %d in %.2fs", what, status_of(exc) or "connection", attempt, delay)
            time.sleep(delay)
