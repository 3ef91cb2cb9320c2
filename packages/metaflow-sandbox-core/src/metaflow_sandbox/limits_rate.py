"""Provider quotas kept across processes: a slot semaphore and a create-rate token bucket.

Every Metaflow task is its own trampoline process, so an in-process semaphore cannot keep a wide
foreach inside a provider's quota. Both limits therefore live in files, under a per-user directory
(0700) in ``$XDG_RUNTIME_DIR`` or the temp dir:

- **slots**: ``slot-<i>.lock`` for i < N. A create takes one with ``flock`` and holds it until the
  sandbox is destroyed; the kernel frees it when the holder dies, however it dies, so a killed task
  never leaks a slot.
- **creates per minute**: a token bucket (one second's worth of burst) whose state is a small JSON
  file rewritten under ``flock``.

A backend declares its provider's numbers in ``Capabilities.max_concurrent_sandboxes`` and
``max_creates_per_minute``; options ``concurrency`` and ``create_rate`` override them (0 = no limit),
``limit_wait`` bounds how long a create waits (default 15 minutes). Waiting prints nothing: a wide
foreach simply runs N at a time.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import SandboxError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: limits are off there
    fcntl = None  # type: ignore[assignment]

#: Seconds a create waits for a slot or a token before it fails with a fix.
DEFAULT_WAIT = 900.0
_POLL_MIN, _POLL_MAX = 0.02, 0.5


def runtime_dir(backend: str) -> str:
    """This user's private directory for ``backend``'s limit files (created 0700, checked to be ours)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not (base and os.path.isdir(base) and os.access(base, os.W_OK)):
        base = tempfile.gettempdir()
    top = os.path.join(base, "metaflow-sandbox-limits-%d" % os.getuid())  # not the local backend's root (0711)
    path = os.path.join(top, "limits", backend)
    os.makedirs(top, mode=0o700, exist_ok=True)  # makedirs gives intermediate dirs the default mode
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(top)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SandboxError(
            "%s is not private to this user (owner uid %d, mode %o)" % (top, st.st_uid, st.st_mode & 0o777),
            hint="remove it, or set XDG_RUNTIME_DIR (or TMPDIR) to a directory only you can write",
        )
    return path


class Slot:
    """One held slot; ``release()`` is idempotent (process death releases it too)."""

    def __init__(self, fd: Optional[int] = None, index: int = -1):
        self.fd, self.index = fd, index

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock


@dataclass(frozen=True)
class Limiter:
    """``concurrency`` sandboxes at once and ``per_minute`` creates, for one backend, across processes."""

    backend: str
    concurrency: Optional[int] = None
    per_minute: Optional[float] = None
    wait: float = DEFAULT_WAIT

    def acquire(self) -> Slot:
        """A slot (when limited), then a create token (when limited); waits at most ``wait`` seconds."""
        if fcntl is None or not (self.concurrency or self.per_minute):
            return Slot()
        deadline = time.monotonic() + self.wait
        path = runtime_dir(self.backend)
        slot = self._slot(path, deadline) if self.concurrency else Slot()
        try:
            if self.per_minute:
                self._token(path, deadline)
        except BaseException:
            slot.release()
            raise
        return slot

    def _slot(self, path: str, deadline: float) -> Slot:
        n = int(self.concurrency or 0)
        delay = _POLL_MIN
        while True:
            start = random.randrange(n)  # spread the probes of many waiting processes
            for k in range(n):
                i = (start + k) % n
                fd = os.open(os.path.join(path, "slot-%d.lock" % i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return Slot(fd, i)
                except BlockingIOError:
                    os.close(fd)
            self._sleep(delay, deadline, "all %d %s sandbox slots stayed in use" % (n, self.backend), "concurrency")
            delay = min(_POLL_MAX, delay * 1.5)

    def _token(self, path: str, deadline: float) -> None:
        rate = float(self.per_minute or 0) / 60.0  # tokens per second
        burst = max(1.0, rate)
        while True:
            fd = os.open(os.path.join(path, "bucket.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                state_path = os.path.join(path, "bucket.json")
                now = time.time()
                try:
                    with open(state_path) as f:
                        state = json.load(f)
                    tokens = min(burst, float(state["tokens"]) + max(0.0, now - float(state["t"])) * rate)
                except (OSError, ValueError, KeyError, TypeError):
                    tokens = burst
                took = tokens >= 1.0
                if took:
                    tokens -= 1.0
                tmp = "%s.%d" % (state_path, os.getpid())
                with open(tmp, "w") as f:
                    json.dump({"tokens": tokens, "t": now}, f)
                os.replace(tmp, state_path)
            finally:
                os.close(fd)
            if took:
                return
            what = "no %s create was allowed (%s per minute)" % (self.backend, self.per_minute)
            self._sleep((1.0 - tokens) / rate, deadline, what, "create_rate")

    def _sleep(self, seconds: float, deadline: float, what: str, option: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            env = "METAFLOW_SANDBOX_%s_" % self.backend.upper().replace("-", "_")
            raise SandboxError(
                "%s for %.0fs, so this sandbox was not created" % (what, self.wait),
                hint="lower --max-workers, raise %s%s if your provider quota allows it, or wait longer with %sLIMIT_WAIT"
                % (env, option.upper(), env),
                backend=self.backend,
                op="sandbox_create",
            )
        time.sleep(min(seconds, left) * random.uniform(0.8, 1.2))


def _number(options: Mapping[str, Any], key: str, backend: str, default: Optional[float], positive: bool = False) -> Optional[float]:
    raw = options.get(key)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not (0 <= value < float("inf")) or (positive and value == 0):
        raise SandboxError(
            "%s option %s=%r is not a %s number" % (backend, key, raw, "positive" if positive else "non-negative"),
            hint="set METAFLOW_SANDBOX_%s_%s to a number%s, or unset it"
            % (backend.upper().replace("-", "_"), key.upper(), "" if positive else " (0 turns the limit off)"),
            backend=backend,
        )
    return value


def limiter_for(backend: str, capabilities: Any, options: Mapping[str, Any]) -> Limiter:
    """The limiter a backend's declared quotas and its ``concurrency``/``create_rate``/``limit_wait`` options give."""
    concurrency = _number(options, "concurrency", backend, getattr(capabilities, "max_concurrent_sandboxes", None))
    per_minute = _number(options, "create_rate", backend, getattr(capabilities, "max_creates_per_minute", None))
    wait = _number(options, "limit_wait", backend, DEFAULT_WAIT, positive=True)
    return Limiter(backend, int(concurrency) if concurrency else None, per_minute or None, float(wait or DEFAULT_WAIT))


_held: dict[tuple[str, str], Slot] = {}


def hold_slot(backend: str, sandbox_id: str, slot: Slot) -> None:
    """Remember the slot a created sandbox holds, until ``release_slot``."""
    if slot.fd is not None:
        _held[(backend, sandbox_id)] = slot


def release_slot(backend: str, sandbox_id: str) -> None:
    """Give back the slot of a destroyed sandbox (no-op when it held none)."""
    slot = _held.pop((backend, sandbox_id), None)
    if slot is not None:
        slot.release()
