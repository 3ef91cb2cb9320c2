"""Run one command in its own Daytona session, streaming its logs while it runs.

Why a session per command: deleting the session is Daytona's only way to kill a command, so ``kill``
(the facade's ``sandbox_exec_kill``, at a timeout, a cancel or Ctrl-C) ends exactly this command and
nothing else. The session is named after the facade's exec id. Deadlines are the facade's, not ours.
The command runs as ``bash -c '...'`` in a child of the session shell, so ``exit``/``set -e`` never
kill the session shell itself.

Logs arrive over the SDK's WebSocket stream (``get_session_command_logs_async``). If that stream
fails or closes early (seen with real daemons) we reconnect (it replays; what was sent is skipped),
then fall back to polling the plain logs endpoint; and we always reconcile with the final logs, so
output is complete or the call raises.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shlex
import threading
import time
import uuid
from typing import Any, Mapping, NoReturn, Sequence

from metaflow_sandbox import (
    ExecResult,
    SandboxError,
    SandboxHandle,
    SandboxNotFoundError,
)

from . import _client, _retry
from ._client import NAME, translate

log = logging.getLogger("metaflow_sandbox.daytona")

STREAM_RECONNECTS = 3
POLL_MIN = 0.05
POLL_MAX = 1.0
#: The lease is renewed this many times per lease period while a command runs.
RENEWALS_PER_LEASE = 3


def wrap(command: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str:
    """The shell line for the session: a quoted ``bash -c`` child with its own env and cwd."""
    inner = ""
    if cwd:
        inner += "cd %s && " % shlex.quote(cwd)
    inner += "exec "
    if env:
        inner += "env %s " % " ".join(shlex.quote("%s=%s" % (k, v)) for k, v in env.items())
    inner += shlex.join(list(command))
    return "bash -c %s" % shlex.quote(inner)


class _Sink:
    """Delivers text to the caller's callbacks exactly once, whichever path (stream or poll) saw it."""

    def __init__(self, on_stdout: Any, on_stderr: Any):
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self.sent = {"stdout": 0, "stderr": 0}
        self.lock = threading.Lock()
        self.closed = False
        self.killed = False

    def at(self, kind: str, start: int, text: str) -> None:
        """Text a stream saw at offset ``start`` of its stream; a replay (reconnected stream) skips what was sent."""
        with self.lock:
            if self.closed:
                return
            skip = self.sent[kind] - start
            if skip >= len(text):
                return
            text = text[max(0, skip) :]
            self.sent[kind] += len(text)
            callback = self.callbacks[kind]
        if callback:
            callback(text)

    def catch_up(self, kind: str, full: str | None) -> None:
        """Emit the part of the full log the caller has not seen yet."""
        with self.lock:
            rest = (full or "")[self.sent[kind] :]
            self.sent[kind] += len(rest)
            callback = self.callbacks[kind]
        if rest and callback:
            callback(rest)


class _Stream(threading.Thread):
    """One connection of the SDK's log WebSocket (which replays from the start), in its own thread so our
    deadline never waits on it."""

    def __init__(self, process: Any, session: str, cmd_id: str, sink: _Sink):
        super().__init__(daemon=True, name="daytona-logs-%s" % cmd_id[:8])
        self.process, self.session, self.cmd_id, self.sink = process, session, cmd_id, sink
        self.pos = {"stdout": 0, "stderr": 0}
        self.error: BaseException | None = None

    def _on(self, kind: str, text: str) -> None:
        start = self.pos[kind]
        self.pos[kind] += len(text)
        self.sink.at(kind, start, text)

    def run(self) -> None:
        try:
            asyncio.run(
                self.process.get_session_command_logs_async(
                    self.session,
                    self.cmd_id,
                    lambda text: self._on("stdout", text),
                    lambda text: self._on("stderr", text),
                )
            )
        except BaseException as exc:  # reported through .error; reconnect or polling takes over
            self.error = exc


#: exec id -> the running command's output sink: what ``kill`` marks before deleting its session.
_running: dict[str, _Sink] = {}
_running_lock = threading.Lock()


def session_name(exec_id: str) -> str:
    """The command's own session: known from its exec id alone, so ``kill`` needs nothing else."""
    return "mf-" + exec_id[:16]


def run(
    handle: SandboxHandle,
    sandbox: Any,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    on_stdout: Any,
    on_stderr: Any,
    exec_id: str | None = None,
) -> ExecResult:
    """Run until the command ends or ``kill`` deletes its session; the facade keeps the deadline."""
    from daytona import SessionExecuteRequest

    exec_id = exec_id or uuid.uuid4().hex
    sid = handle.sandbox_id
    process = sandbox.process
    session = session_name(exec_id)
    policy = _retry.Policy.from_options(handle.options)
    sink = _Sink(on_stdout, on_stderr)
    with _running_lock:
        _running[exec_id] = sink
    renewer = _LeaseRenewer(handle, sandbox)
    try:
        _create_session(handle, process, session, policy)
        request = SessionExecuteRequest(command=wrap(command, env, cwd), run_async=True)
        cmd_id = _start(handle, process, session, request, policy)
        renewer.start()
        reconnects = 0
        while True:
            stream = _Stream(process, session, cmd_id, sink)
            stream.start()
            while stream.is_alive() and not sink.killed:
                stream.join(POLL_MAX)
            _raise_if_killed(handle, sink)
            exit_code = _call(handle, "read exit code", lambda: process.get_session_command(session, cmd_id)).exit_code
            if exit_code is not None:
                break
            if reconnects < STREAM_RECONNECTS:  # the stream ended early: it replays, the sink skips what was sent
                reconnects += 1
                log.info("daytona: log stream of %s ended early (%s); reconnecting", sid, stream.error or "closed")
                continue
            log.warning("daytona: log stream of %s keeps failing (%s); polling the logs instead", sid, stream.error)
            exit_code = _wait_exit(handle, process, session, cmd_id, sink)
            break
        logs = _call(handle, "read logs", lambda: process.get_session_command_logs(session, cmd_id))
        sink.catch_up("stdout", logs.stdout)
        sink.catch_up("stderr", logs.stderr)
        sink.closed = True
        if exit_code is None or exit_code < 0:
            raise SandboxError(
                "Daytona reported exit code %s for the command: the sandbox failed to run it" % exit_code,
                hint="an infrastructure failure, not your code's exit status; it was not re-run. Retry the task "
                "(@retry) or check the sandbox in the Daytona dashboard",
                backend=NAME,
                sandbox_id=sid,
            )
        return ExecResult(exit_code=int(exit_code))
    except SandboxError:
        _raise_if_killed(handle, sink)  # a killed command's session is gone: that is the kill, not a failure
        raise
    finally:
        renewer.stop()
        with _running_lock:
            _running.pop(exec_id, None)
        if not sink.killed:
            _delete_session(process, session)


def kill(handle: SandboxHandle, sandbox: Any, exec_id: str) -> bool:
    """Deleting the command's session kills every process it started; False if ``exec_id`` is not running here."""
    with _running_lock:
        sink = _running.get(exec_id)
    if sink is None:
        return False
    sink.closed = sink.killed = True  # no more output once the kill is asked for
    try:
        _retry.call(
            lambda: sandbox.process.delete_session(session_name(exec_id)), "kill the command", _retry.Policy.from_options(handle.options)
        )
    except Exception as exc:
        from daytona.common.errors import DaytonaNotFoundError

        if not isinstance(exc, DaytonaNotFoundError):  # a 404: the session (or the command's start) is not there yet
            translate(exc, op="sandbox_exec_kill", sandbox_id=handle.sandbox_id, retry_safe=False)
    return True


def _raise_if_killed(handle: SandboxHandle, sink: _Sink) -> None:
    if sink.killed:
        raise SandboxError("the command was killed (its session deleted)", backend=NAME, sandbox_id=handle.sandbox_id)


def _wait_exit(handle: SandboxHandle, process: Any, session: str, cmd_id: str, sink: _Sink) -> int | None:
    """Exit code once known; while the command still runs (the stream died), poll its logs."""
    delay = POLL_MIN
    while True:
        cmd = _call(handle, "read exit code", lambda: process.get_session_command(session, cmd_id))
        if cmd.exit_code is not None:
            return cmd.exit_code
        logs = _call(handle, "read logs", lambda: process.get_session_command_logs(session, cmd_id))
        sink.catch_up("stdout", logs.stdout)
        sink.catch_up("stderr", logs.stderr)
        _raise_if_killed(handle, sink)
        time.sleep(delay)
        delay = min(POLL_MAX, delay * 1.5)


def _delete_session(process: Any, session: str) -> None:
    try:
        process.delete_session(session)
    except Exception:  # already gone (killed, or the sandbox vanished): nothing left to clean
        pass


def _call(handle: SandboxHandle, what: str, fn: Any) -> Any:
    """Run one idempotent toolbox call (retried); a 404 means the sandbox (or our session in it) is gone."""
    try:
        return _retry.call(fn, what, _retry.Policy.from_options(handle.options))
    except Exception as exc:
        _failed(handle, what, exc)


def _failed(handle: SandboxHandle, what: str, exc: Exception) -> NoReturn:
    from daytona.common.errors import DaytonaNotFoundError

    if isinstance(exc, DaytonaNotFoundError):
        _raise_gone(handle, what, exc)
    translate(exc, op="sandbox_exec (%s)" % what, sandbox_id=handle.sandbox_id, retry_safe=False)


def _raise_gone(handle: SandboxHandle, what: str, exc: Exception) -> NoReturn:
    gone = True
    try:
        daytona = _client.client(handle.options)
        state = str(_retry.call(lambda: daytona.get(handle.sandbox_id), "get", _retry.Policy.from_options(handle.options)).state).lower()
        gone = state.endswith(("destroyed", "destroying", "error"))
    except Exception:
        gone = True
    if gone:
        raise SandboxNotFoundError(
            "the Daytona sandbox disappeared while trying to %s" % what,
            hint="it was deleted or expired (ttl/auto-delete); the command's outcome is unknown and it was not re-run",
            backend=NAME,
            sandbox_id=handle.sandbox_id,
        ) from exc
    raise SandboxError(
        "Daytona lost the command session while trying to %s: %s" % (what, exc),
        hint="the command's outcome is unknown and it was not re-run; retry the task (@retry)",
        backend=NAME,
        sandbox_id=handle.sandbox_id,
    ) from exc


def _create_session(handle: SandboxHandle, process: Any, session: str, policy: _retry.Policy) -> None:
    """Create our private session, retried; a 409 on a retry means an earlier attempt made it."""
    from daytona.common.errors import DaytonaConflictError

    tries = {"n": 0}

    def attempt() -> None:
        tries["n"] += 1
        try:
            process.create_session(session)
        except DaytonaConflictError:
            if tries["n"] == 1:
                raise

    _call(handle, "create session", attempt)


def _start(handle: SandboxHandle, process: Any, session: str, request: Any, policy: _retry.Policy) -> str:
    """Start the command exactly once. Its start is never retried blindly: when the answer is lost, the
    session (ours alone, fresh) tells whether it started. One command in it: that is ours; none: it did
    not start, so starting again cannot run the user's code twice."""
    attempts = 0
    started = time.monotonic()
    while True:
        attempts += 1
        try:
            return str(process.execute_session_command(session, request).cmd_id)
        except Exception as exc:
            if not _retry.is_transient(exc):
                _failed(handle, "start command", exc)
            if attempts >= policy.attempts or time.monotonic() - started > policy.seconds:
                exc.retry_attempts_made, exc.retry_seconds_spent = attempts, time.monotonic() - started  # type: ignore[attr-defined]
                translate(exc, op="sandbox_exec (start command)", sandbox_id=handle.sandbox_id, retry_safe=False)
            time.sleep(random.uniform(0, min(_retry.MAX_DELAY, _retry.BASE_DELAY * 2**attempts)) + (_retry.retry_after(exc) or 0))
            commands = _call(handle, "look for the started command", lambda: process.get_session(session)).commands or []
            if commands:
                log.info("daytona: the start of a command in %s lost its answer; found it running", handle.sandbox_id)
                return str(commands[0].id)


class _LeaseRenewer(threading.Thread):
    """Renews the sandbox's lease (``refresh_activity``) while a command runs: Daytona does not count processes
    inside a sandbox as activity, so without this a step longer than the lease would be stopped and deleted."""

    def __init__(self, handle: SandboxHandle, sandbox: Any):
        super().__init__(daemon=True, name="daytona-lease-%s" % handle.sandbox_id[:8])
        self.sandbox = sandbox
        lease_minutes = getattr(sandbox, "auto_stop_interval", None) or 0
        every = _retry.number_option(handle.options, "lease_renew_seconds", lease_minutes * 60.0 / RENEWALS_PER_LEASE, 0)
        self.every = float(every)
        self.halt = threading.Event()

    def start(self) -> None:
        if self.every > 0:
            super().start()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            try:
                self.sandbox.refresh_activity()
            except Exception as exc:  # the next renewal (a third of the lease later) tries again
                log.info("daytona: could not renew the lease of %s: %s", self.sandbox.id, exc)

    def stop(self) -> None:
        self.halt.set()
