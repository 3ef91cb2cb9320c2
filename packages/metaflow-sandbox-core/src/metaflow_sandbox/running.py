"""One command the facade runs: its deadline and its cancellation, for every backend alike.

Backends only run a command (``sandbox_exec``) and, optionally, kill one by id (``sandbox_exec_kill``).
The facade runs the hook in a worker thread and waits in the caller's thread, so a timeout, a
``Sandbox.cancel()`` from another thread, or Ctrl-C/SIGTERM (an exception raised in the waiting
thread) all reach the one place that stops the command: here. A backend without the kill hook
keeps enforcing ``timeout`` itself (the older contract); if its command still runs, the facade
destroys the sandbox, the only stop it has, and says so.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Optional

from .errors import SandboxCancelledError, SandboxError, SandboxTimeoutError
from .model import ExecResult

if TYPE_CHECKING:
    from .session import Sandbox

log = logging.getLogger("metaflow_sandbox")

#: How long a command may take to stop once the facade asked (kill hook, or the backend's own timeout)
#: before the facade destroys its sandbox instead.
KILL_GRACE_SECONDS = 5.0
#: The kill hook is called again this often until the command's ``sandbox_exec`` returns.
KILL_RETRY_SECONDS = 0.5
#: After Ctrl-C/SIGTERM, how long the interrupted caller waits for the command to stop before re-raising
#: (Metaflow SIGKILLs a trampoline 5 s after it forwarded a Ctrl-C; the sandbox's destroy comes next).
INTERRUPT_WAIT_SECONDS = 2.0
#: How often the waiting thread wakes: signal handlers run between these waits.
TICK_SECONDS = 0.2


class RunningCommand:
    """``sandbox_exec`` in a worker thread, and everything that may stop it."""

    def __init__(self, sandbox: Sandbox, exec_id: Optional[str] = None):
        self.sandbox = sandbox
        self.backend = sandbox.backend
        self.exec_id = exec_id or uuid.uuid4().hex
        self.killable = self.backend.implements("sandbox_exec_kill")
        self.done = threading.Event()
        self.wake = threading.Event()  # the command ended, or someone asked to cancel it
        self.cancelled = False
        self.outcome: Any = None
        self.error: Optional[BaseException] = None

    def run(self, timeout: Optional[float], **kwargs: Any) -> ExecResult:
        """Run the command; raise ``SandboxTimeoutError``/``SandboxCancelledError`` once it is stopped."""
        # A backend with the kill hook never sees the timeout; one without it enforces it (older contract).
        passed = None if self.killable else timeout
        worker = threading.Thread(
            target=self._target, kwargs=dict(kwargs, timeout=passed), name="sandbox-exec-" + self.exec_id[:8], daemon=True
        )
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout + (0.0 if self.killable else KILL_GRACE_SECONDS)
        worker.start()
        try:
            while not self.wake.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.wake.wait(TICK_SECONDS if left is None else min(TICK_SECONDS, left))
        except BaseException:  # Ctrl-C, or SIGTERM turned into an exception: stop the command, then go on unwinding
            self._stop_in_background(INTERRUPT_WAIT_SECONDS, destroy=False)
            raise
        if self.done.is_set():
            return self._result()
        if self.cancelled:
            destroyed = self.stop()
            raise SandboxCancelledError(
                "the command was cancelled and stopped" + (" by destroying its sandbox" if destroyed else ""),
                hint=self._hint(destroyed),
                backend=self.backend.name,
                op="sandbox_exec",
                sandbox_id=self.sandbox.id,
            )
        destroyed = self.stop()
        raise SandboxTimeoutError(
            "the command ran past its timeout of %ss and was killed%s"
            % (timeout, " (its sandbox was destroyed to stop it)" if destroyed else ""),
            hint="raise timeout= (or @timeout on the step)" + ("; " + self._hint(True) if destroyed else ""),
            backend=self.backend.name,
            op="sandbox_exec",
            sandbox_id=self.sandbox.id,
        )

    def cancel(self) -> None:
        """Ask the waiting thread to stop the command (callable from any thread)."""
        self.cancelled = True
        self.wake.set()

    def stop(self, wait: float = KILL_GRACE_SECONDS, destroy: bool = True) -> bool:
        """Kill the command through the backend; destroy the sandbox if that did not end it. True if destroyed.

        Without the kill hook there is nothing to wait for: a timeout already gave the backend's own
        deadline ``KILL_GRACE_SECONDS``, and a cancel has no other way.
        """
        end = time.monotonic() + wait
        while self.killable and not self.done.is_set() and time.monotonic() < end:
            try:
                self.backend.call(
                    "sandbox_exec_kill", idempotent=False, sandbox_id=self.sandbox.id, handle=self.sandbox.handle, exec_id=self.exec_id
                )
            except SandboxError as err:  # asked again at the next tick; the destroy below is the last resort
                log.warning("%s: could not kill command %s in sandbox %s: %s", self.backend.name, self.exec_id, self.sandbox.id, err)
            self.done.wait(max(0.0, min(KILL_RETRY_SECONDS, end - time.monotonic())))
        if self.done.is_set() or not destroy:
            return False
        log.warning(
            "%s: %s; destroying sandbox %s to stop it",
            self.backend.name,
            "the command did not stop within %ss of sandbox_exec_kill" % wait
            if self.killable
            else "the backend cannot kill one command (no sandbox_exec_kill)",
            self.sandbox.id,
        )
        try:
            self.sandbox.destroy()
        except SandboxError as err:
            log.error("could not destroy sandbox %s: %s", self.sandbox.id, err)
        self.done.wait(KILL_GRACE_SECONDS)
        return True

    def _stop_in_background(self, wait: float, destroy: bool) -> None:
        """Interrupted: kill from a helper thread (a slow provider must not hold the unwinding caller) and wait a little."""
        if self.done.is_set():
            return
        helper = threading.Thread(target=self.stop, kwargs={"wait": KILL_GRACE_SECONDS, "destroy": destroy}, daemon=True)
        helper.start()
        self.done.wait(wait)

    def _target(self, **kwargs: Any) -> None:
        try:
            self.outcome = self.backend.call(
                "sandbox_exec", idempotent=False, sandbox_id=self.sandbox.id, handle=self.sandbox.handle, exec_id=self.exec_id, **kwargs
            )
        except BaseException as err:  # handed to the waiting thread
            self.error = err
        finally:
            self.done.set()
            self.wake.set()

    def _result(self) -> ExecResult:
        if self.error is not None:
            raise self.error
        return self.outcome

    def _hint(self, destroyed: bool) -> str:
        if not destroyed:
            return "the sandbox is still usable"
        return "the sandbox is gone; backend '%s' should implement sandbox_exec_kill (docs/adding-a-backend.md)" % self.backend.name
