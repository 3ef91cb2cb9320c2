"""The only module that imports the e2b SDK (lazily, from inside functions), and its error translation."""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import time
from typing import Any, Callable, Iterator, TypeVar

from metaflow_sandbox import (
    SandboxError,
    SandboxNotFoundError,
    SandboxTimeoutError,
    TransientBackendError,
    UnsupportedOptionError,
)

from .settings import NAME

T = TypeVar("T")
_KEY_OK = re.compile(r"^[a-z0-9-]{1,255}$")


def sdk() -> Any:
    import e2b

    return e2b


def idempotency_key(key: str | None) -> str | None:
    """E2B accepts ``[a-z0-9-]{1,255}``; other keys are folded to that, deterministically and collision-safe."""
    if not key or _KEY_OK.match(key):
        return key
    readable = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")[:180]
    return "%s-%s" % (readable, hashlib.sha256(key.encode()).hexdigest()[:32]) if readable else hashlib.sha256(key.encode()).hexdigest()


def is_gone(exc: BaseException) -> bool:
    e2b = sdk()
    gone = (e2b.SandboxNotFoundException, e2b.SandboxNotRunningException)
    return isinstance(exc, gone) or "was not found" in str(exc)


#: Ops that talk to envd (the sandbox), not to the REST API: their URL setting is E2B_SANDBOX_URL.
ENVD_OPS = frozenset({"exec", "upload", "download", "workdir", "kill command"})
_STATUS_PREFIX = re.compile(r"^(\d{3}): ")
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind an SDK error: its ``status_code``, or envd's ``"503: ..."`` message prefix."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    match = _STATUS_PREFIX.match(str(exc))
    return int(match.group(1)) if match else None


def is_transient(exc: BaseException) -> bool:
    """A rate limit, a 5xx or an unreachable sandbox: the same idempotent call may succeed if repeated."""
    e2b = sdk()
    if is_gone(exc):
        return False
    if isinstance(exc, (e2b.RateLimitException, e2b.ServiceBusyException, e2b.SandboxUnreachableException)):
        return True
    return status_of(exc) in _RETRY_STATUSES


def is_unreachable(exc: BaseException) -> bool:
    """No answer at all (refused, DNS, TLS): usually a wrong URL setting, or the provider is down."""
    import httpx

    return isinstance(exc, (httpx.TransportError, OSError)) and not isinstance(exc, httpx.TimeoutException)


def _where(op: str, s: Any) -> tuple[str, str]:
    """(URL, the settings that choose it) for an op, for messages that name what to check."""
    if op in ENVD_OPS:
        return (s.sandbox_endpoint if s else "the sandbox URL"), "E2B_SANDBOX_URL or E2B_DOMAIN"
    return (s.api_endpoint if s else "the API URL"), "E2B_API_URL or E2B_DOMAIN"


def translate(exc: BaseException, op: str, sandbox_id: str | None = None, retry_safe: bool = False, s: Any = None) -> SandboxError:
    """Map an SDK exception to our error tree. Transient only where a retry cannot re-run user code."""
    e2b = sdk()
    text = str(exc).strip() or type(exc).__name__
    kw: dict[str, Any] = {"backend": NAME, "op": op, "sandbox_id": sandbox_id}
    status = status_of(exc)
    url, setting = _where(op, s)
    if is_unreachable(exc):
        cls = TransientBackendError if retry_safe else SandboxError
        return cls(
            "cannot reach E2B at %s (%s: %s)" % (url, type(exc).__name__, text),
            hint="check %s (unset them for E2B's cloud) and that E2B_API_KEY belongs to that endpoint; "
            "if they are right, E2B is down: retry later" % setting,
            **kw,
        )
    if is_gone(exc) or (isinstance(exc, e2b.NotFoundException) and op not in ("create", "list")):
        return SandboxNotFoundError("E2B sandbox is gone (killed, or it reached its timeout): %s" % text, **kw)
    if isinstance(exc, e2b.AuthenticationException):
        return SandboxError(
            "E2B at %s rejected the credentials: %s" % (url, text),
            hint="check E2B_API_KEY (or METAFLOW_SANDBOX_E2B_API_KEY), and %s if you point at another E2B" % setting,
            **kw,
        )
    busy = (e2b.RateLimitException, e2b.ServiceBusyException, e2b.SandboxUnreachableException)
    if isinstance(exc, e2b.SandboxUnreachableException):
        cls = TransientBackendError if retry_safe else SandboxError
        return cls(
            "cannot reach the E2B sandbox at %s: %s" % (url, text),
            hint="check %s (and that E2B_API_KEY belongs to that E2B); if they are right, the network to E2B dropped: retry later"
            % setting,
            **kw,
        )
    if isinstance(exc, busy) or (isinstance(status, int) and status >= 500):
        cls = TransientBackendError if retry_safe else SandboxError
        return cls("E2B at %s is busy or failing: %s" % (url, text), hint=_busy_hint(op, status), **kw)
    if isinstance(exc, e2b.TimeoutException):
        return SandboxTimeoutError(
            "an E2B request timed out: %s" % text,
            hint="raise METAFLOW_SANDBOX_E2B_REQUEST_TIMEOUT (seconds) if the network is slow",
            **kw,
        )
    if op == "create" and "mfsb-env-" in text and (status in (400, 404) or "not found" in text.lower()):
        return UnsupportedOptionError(
            "the step's prepared environment (an E2B template) is gone or not ready: %s" % text,
            hint="run the flow again (its environments are built at the start of the run), or build them ahead of time: "
            "metaflow-sandbox prepare FLOW.py --backend e2b",
            **kw,
        )
    if op == "create" and "template" in text.lower() and (status in (400, 404) or "not found" in text.lower()):
        return UnsupportedOptionError(
            "E2B template not found: %s" % text,
            hint="build the templates for your account: python -m metaflow_sandbox_e2b.templates build [--base IMAGE]",
            **kw,
        )
    if op == "create" and status == 400:
        return UnsupportedOptionError("E2B refused the sandbox: %s" % text, hint="check the step's options", **kw)
    if op == "create" and status == 413:
        return UnsupportedOptionError(
            "E2B refused the request as too large: %s" % text,
            hint="pass large values as files or Metaflow artifacts, not as environment variables or labels",
            **kw,
        )
    return SandboxError(
        "unexpected answer from E2B at %s to %s (%s: %s)" % (url, op, type(exc).__name__, text),
        hint="check %s and E2B_API_KEY; if they are right, this is an E2B outage or an SDK change: retry, or report it" % setting,
        **kw,
    )


def _busy_hint(op: str, status: int | None) -> str:
    if op == "destroy":
        return (
            "nothing to do now: the sandbox ends by itself when its lease runs out (METAFLOW_SANDBOX_LEASE_SECONDS, "
            "default 300 s); `metaflow-sandbox gc --backend e2b` removes it sooner once E2B answers again"
        )
    if status == 429 or op == "create":
        return (
            "E2B limits concurrent sandboxes (Hobby 20, Pro 100) and creates per second; lower the fan-out "
            "(--max-workers, METAFLOW_SANDBOX_E2B_CONCURRENCY) or retry later"
        )
    return "E2B kept failing after retries; rerun later (use @retry to do it automatically)"


@contextlib.contextmanager
def translated(op: str, sandbox_id: str | None = None, retry_safe: bool = False, s: Any = None) -> Iterator[None]:
    try:
        yield
    except SandboxError:
        raise
    except Exception as exc:
        raise translate(exc, op, sandbox_id, retry_safe, s) from exc


def retrying(fn: Callable[[], T], attempts: int = 6, base: float = 0.2, cap: float = 5.0) -> T:
    """Call an idempotent ``fn``, repeating it on a rate limit, a 5xx or an unreachable sandbox.

    REST calls already went through the SDK's own retries, which honour ``Retry-After``; envd's
    errors carry no headers, so this backs off exponentially (with jitter) instead.
    """
    unreachable = 0
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            if isinstance(exc, sdk().SandboxUnreachableException):
                unreachable += 1  # the SDK already retried the connection: a wrong URL should fail in seconds
                if unreachable >= 2:
                    raise
            time.sleep(min(cap, base * 2**attempt) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")
