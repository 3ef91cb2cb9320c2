"""The only module that imports the e2b SDK (lazily, from inside functions), and its error translation."""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any, Iterator

from metaflow_sandbox import (
    SandboxError,
    SandboxNotFoundError,
    SandboxTimeoutError,
    TransientBackendError,
    UnsupportedOptionError,
)

from .settings import NAME

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


def translate(exc: BaseException, op: str, sandbox_id: str | None = None, retry_safe: bool = False) -> SandboxError:
    """Map an SDK exception to our error tree. Transient only where a retry cannot re-run user code."""
    e2b = sdk()
    text = str(exc).strip() or type(exc).__name__
    kw: dict[str, Any] = {"backend": NAME, "op": op, "sandbox_id": sandbox_id}
    status = getattr(exc, "status_code", None)
    if is_gone(exc) or (isinstance(exc, e2b.NotFoundException) and op != "create"):
        return SandboxNotFoundError("E2B sandbox is gone (killed, or it reached its timeout): %s" % text, **kw)
    if isinstance(exc, e2b.AuthenticationException):
        return SandboxError("E2B rejected the credentials: %s" % text, hint="check E2B_API_KEY (or METAFLOW_SANDBOX_E2B_API_KEY)", **kw)
    busy = (e2b.RateLimitException, e2b.ServiceBusyException, e2b.SandboxUnreachableException)
    if isinstance(exc, busy) or (isinstance(status, int) and status >= 500):
        cls = TransientBackendError if retry_safe else SandboxError
        return cls(
            "E2B is busy or unreachable: %s" % text,
            hint="E2B limits concurrent sandboxes (Hobby 20, Pro 100) and creates per second; lower the fan-out "
            "(--max-workers) or retry later",
            **kw,
        )
    if isinstance(exc, e2b.TimeoutException):
        return SandboxTimeoutError(
            "an E2B request timed out: %s" % text,
            hint="raise METAFLOW_SANDBOX_E2B_REQUEST_TIMEOUT (seconds) if the network is slow",
            **kw,
        )
    if op == "create" and (status == 404 or "not found" in text.lower()):
        return UnsupportedOptionError(
            "E2B template not found: %s" % text,
            hint="build the templates for your account: python -m metaflow_sandbox_e2b.templates build [--base IMAGE]",
            **kw,
        )
    if op == "create" and status == 400:
        return UnsupportedOptionError("E2B refused the sandbox: %s" % text, hint="check the step's options", **kw)
    return SandboxError("%s failed: %s: %s" % (op, type(exc).__name__, text), **kw)


@contextlib.contextmanager
def translated(op: str, sandbox_id: str | None = None, retry_safe: bool = False) -> Iterator[None]:
    try:
        yield
    except SandboxError:
        raise
    except Exception as exc:
        raise translate(exc, op, sandbox_id, retry_safe) from exc
