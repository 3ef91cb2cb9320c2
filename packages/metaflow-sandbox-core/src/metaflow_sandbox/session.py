"""The facade over a backend's plugin manager: contract checks, retries, timing, cleanup.

Retries live here, not in a pluggy wrapper (a new-style wrapper yields once). Only idempotent
operations retry, and only on ``TransientBackendError``: user code is never re-run silently.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import pluggy

from . import parse
from .errors import (
    BackendContractError,
    SandboxError,
    SandboxFileError,
    TransientBackendError,
    UnsupportedOptionError,
)
from .lifeline import OWNER_LABEL, Lifeline
from .limits_rate import hold_slot, limiter_for, release_slot
from .model import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_TTL_SECONDS,
    ENVIRONMENT_LABEL,
    LEASE_ENV,
    MARKER_LABEL,
    Capabilities,
    DownloadItem,
    EnvironmentSpec,
    ExecResult,
    FileResult,
    OutputCallback,
    PathLike,
    PreparedEnvironment,
    SandboxHandle,
    SandboxSpec,
    UploadItem,
    valid_sandbox_path,
)
from .plugins import get_plugin_manager
from .running import RunningCommand

log = logging.getLogger("metaflow_sandbox")

_EXPECTED: dict[str, Any] = {
    "sandbox_create": SandboxHandle,
    "sandbox_exec": ExecResult,
    "sandbox_upload": list,
    "sandbox_download": list,
    "sandbox_destroy": bool,
    "sandbox_list": list,
    "sandbox_capabilities": Capabilities,
    "sandbox_check_config": bool,
    "sandbox_exec_kill": bool,
    "sandbox_environment_prepare": PreparedEnvironment,
    "sandbox_environment_list": list,
    "sandbox_environment_remove": bool,
}


class Backend:
    """One selected backend: ``Backend("local").create(spec)`` gives a ``Sandbox``."""

    def __init__(
        self,
        name: str,
        pm: Optional[pluggy.PluginManager] = None,
        options: Optional[Mapping[str, Any]] = None,
        retries: int = 3,
        backoff: float = 0.25,
        lifeline: Optional[Lifeline] = None,
    ):
        self.name = name
        self.lifeline = lifeline
        self.pm = pm if pm is not None else get_plugin_manager(name)
        self.options = dict(options or {})
        self.retries = retries
        self.backoff = backoff
        self.timings: dict[str, list[float]] = defaultdict(list)
        self._capabilities: Optional[Capabilities] = None

    def implements(self, hook: str) -> bool:
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    def call(self, hook: str, *, idempotent: bool, sandbox_id: Optional[str] = None, **kwargs: Any) -> Any:
        """Call ``hook``, check the answer, retry transient failures of idempotent ops, time it."""
        attempt = 0
        while True:
            start = time.perf_counter()
            try:
                result = getattr(self.pm.hook, hook)(**kwargs)
            except TransientBackendError as exc:
                attempt += 1
                if not idempotent or attempt > self.retries:
                    exc.backend, exc.op = exc.backend or self.name, exc.op or hook
                    exc.sandbox_id = exc.sandbox_id or sandbox_id
                    raise
                delay = self.backoff * (2 ** (attempt - 1))
                log.warning("%s: %s failed transiently (%s); retry %d in %.2fs", self.name, hook, exc.message, attempt, delay)
                time.sleep(delay)
                continue
            except SandboxError as exc:
                exc.backend = exc.backend or self.name
                exc.op = exc.op or hook
                exc.sandbox_id = exc.sandbox_id or sandbox_id
                raise
            except Exception as exc:
                raise SandboxError(
                    "%s raised %s: %s" % (hook, type(exc).__name__, exc),
                    hint="this is a bug in the '%s' backend; report it with this traceback" % self.name,
                    backend=self.name,
                    op=hook,
                    sandbox_id=sandbox_id,
                ) from exc
            finally:
                self.timings[hook].append(time.perf_counter() - start)
            return self._checked(hook, result)

    def _checked(self, hook: str, result: Any) -> Any:
        expected = _EXPECTED[hook]
        if result is None or not isinstance(result, expected):
            raise BackendContractError(
                "backend '%s' returned %r from %s(); it must return a %s"
                % (self.name, type(result).__name__ if result is not None else None, hook, expected.__name__),
                hint="fix the backend's %s implementation (see docs/adding-a-backend.md)" % hook,
                backend=self.name,
                op=hook,
            )
        return result

    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            if self.implements("sandbox_capabilities"):
                self._capabilities = self.call("sandbox_capabilities", idempotent=True, options=self.options)
            else:
                self._capabilities = Capabilities()
        return self._capabilities

    def check_config(self) -> bool:
        """Raise ``BackendNotConfiguredError`` if credentials are missing; no network call."""
        limiter_for(self.name, self.capabilities(), self.options)  # a bad concurrency/create_rate/limit_wait fails at launch
        if not self.implements("sandbox_check_config"):
            return True
        return bool(self.call("sandbox_check_config", idempotent=True, options=self.options))

    def validate(self, spec: SandboxSpec) -> None:
        """Refuse what the backend cannot honour instead of silently ignoring it."""
        try:
            parse.check_spec(spec)  # finite, positive numbers, valid env names and size: before any capability
        except parse.InvalidInputError as err:
            err.backend, err.op = self.name, "sandbox_create"
            raise
        caps, res, name = self.capabilities(), spec.resources, self.name

        def refuse(what: str, hint: str) -> None:
            raise UnsupportedOptionError("backend '%s' %s" % (name, what), hint=hint, backend=name, op="sandbox_create")

        if (res.gpu or res.gpu_type) and not caps.gpu:
            refuse("has no GPUs, but %s GPU(s) were requested" % (res.gpu or res.gpu_type), "remove gpu=... or choose a backend with GPUs")
        if res.cpu and caps.max_cpu and res.cpu > caps.max_cpu:
            refuse("offers at most %s CPUs, but cpu=%s was requested" % (caps.max_cpu, res.cpu), "lower cpu= (or @resources(cpu=...))")
        if res.memory_mb and caps.max_memory_mb and res.memory_mb > caps.max_memory_mb:
            refuse(
                "offers at most %s MB of memory, but memory=%s was requested" % (caps.max_memory_mb, res.memory_mb),
                "lower memory= (or @resources(memory=...))",
            )
        if spec.ttl_seconds and caps.max_ttl_seconds and spec.ttl_seconds > caps.max_ttl_seconds:
            refuse(
                "keeps a sandbox alive at most %ds, but %ds were requested" % (caps.max_ttl_seconds, spec.ttl_seconds),
                "lower @timeout for this step, or use a backend/plan with a longer sandbox lifetime",
            )
        if not spec.network and not caps.network_toggle:
            refuse("cannot cut the network", "remove network=False or use the 'local' backend")
        if spec.binds and not caps.binds:
            refuse("cannot mount launcher directories", "use a remote datastore (S3, GCS, Azure) with this backend")
        if spec.image and not caps.images:
            refuse("does not support choosing an image", "remove image=...")

    def create(self, spec: Optional[SandboxSpec] = None) -> Sandbox:
        """Every sandbox carries the marker label (so list/gc/kill find it) and a TTL, bare API included."""
        spec = spec or SandboxSpec()
        if self.options and not spec.options:
            spec = dataclasses.replace(spec, options=self.options)
        if spec.lease_seconds is None:
            spec = dataclasses.replace(spec, lease_seconds=default_lease_seconds())
        if spec.ttl_seconds is None:
            cap = self.capabilities().max_ttl_seconds
            spec = dataclasses.replace(spec, ttl_seconds=min(DEFAULT_TTL_SECONDS, cap) if cap else DEFAULT_TTL_SECONDS)
        if spec.labels.get(MARKER_LABEL) != "1":
            spec = dataclasses.replace(spec, labels={**spec.labels, MARKER_LABEL: "1"})
        self.validate(spec)
        owner = None
        if self.lifeline is not None:  # tell the reaper before the create, so a kill mid-create is covered
            owner = self.lifeline.intent(self.name, spec.options)
            spec = dataclasses.replace(spec, labels={**spec.labels, OWNER_LABEL: owner})
        slot = limiter_for(self.name, self.capabilities(), spec.options).acquire()  # provider quotas, across processes
        try:
            handle = self.call("sandbox_create", idempotent=bool(spec.idempotency_key), spec=spec)
        except BaseException:
            slot.release()
            raise
        hold_slot(self.name, handle.sandbox_id, slot)
        if owner is not None and self.lifeline is not None:
            self.lifeline.own(owner, handle.sandbox_id, handle.workdir, handle.labels)
        return Sandbox(self, handle, owner)

    def list(self, labels: Optional[Mapping[str, str]] = None) -> list[Sandbox]:
        if not self.implements("sandbox_list"):
            raise UnsupportedOptionError(
                "backend '%s' cannot list its sandboxes" % self.name,
                hint="clean up with the provider's console; ask the backend's authors to implement sandbox_list",
                backend=self.name,
            )
        handles = self.call("sandbox_list", idempotent=True, labels=dict(labels or {}), options=self.options)
        return [Sandbox(self, h) for h in handles]

    def prepares_environments(self) -> bool:
        """True when the backend builds environments ahead of tasks (``sandbox_environment_prepare``)."""
        return self.implements("sandbox_environment_prepare")

    def prepare_environment(self, environment: EnvironmentSpec, on_log: Optional[OutputCallback] = None) -> PreparedEnvironment:
        """Find or build ``environment`` (idempotent by its key, so transient failures retry)."""
        self._need("sandbox_environment_prepare", "prepare environments")
        labels = {**environment.labels, MARKER_LABEL: "1", ENVIRONMENT_LABEL: environment.key}
        if self.options and not environment.options:
            environment = dataclasses.replace(environment, options=self.options)
        environment = dataclasses.replace(environment, labels=labels)
        return self.call("sandbox_environment_prepare", idempotent=True, environment=environment, on_log=on_log)

    def environments(self) -> builtins.list[PreparedEnvironment]:
        self._need("sandbox_environment_list", "list prepared environments")
        return self.call("sandbox_environment_list", idempotent=True, options=self.options)

    def remove_environment(self, ref: str) -> bool:
        self._need("sandbox_environment_remove", "remove prepared environments")
        return self.call("sandbox_environment_remove", idempotent=True, ref=ref, options=self.options)

    def _need(self, hook: str, what: str) -> None:
        if not self.implements(hook):
            raise UnsupportedOptionError(
                "backend '%s' cannot %s" % (self.name, what),
                hint="turn prepared environments off for it (METAFLOW_SANDBOX_PREPARE=0), or ask its authors to implement %s" % hook,
                backend=self.name,
            )


class Sandbox:
    """A live sandbox. As a context manager it is always destroyed, whatever happens inside."""

    def __init__(self, backend: Backend, handle: SandboxHandle, owner: Optional[str] = None):
        self.backend = backend
        self.handle = handle
        self.destroyed = False
        self.owner = owner  # the lifeline key; released once the sandbox is destroyed
        self._running: dict[str, RunningCommand] = {}
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.handle.sandbox_id

    def _call(self, hook: str, idempotent: bool, **kwargs: Any) -> Any:
        return self.backend.call(hook, idempotent=idempotent, sandbox_id=self.id, handle=self.handle, **kwargs)

    def exec(
        self,
        command: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        exec_id: Optional[str] = None,
    ) -> ExecResult:
        """Run ``command``; past ``timeout`` seconds it is killed and ``SandboxTimeoutError`` raised.

        ``cancel()`` from another thread (or Ctrl-C/SIGTERM in this one) stops it too. ``exec_id`` names
        the command for ``cancel(exec_id)``; one is made up when not given.
        """
        if isinstance(command, str):
            raise TypeError("command must be an argv list, e.g. ['bash', '-c', %r]" % command)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf")):
            err = parse.InvalidInputError("timeout", timeout, "a positive number of seconds (or None)", hint="pass e.g. timeout=60")
            err.backend, err.op = self.backend.name, "sandbox_exec"
            raise err
        running = RunningCommand(self, exec_id)
        with self._lock:
            self._running[running.exec_id] = running
        try:
            return running.run(timeout, command=list(command), env=dict(env or {}), cwd=cwd, on_stdout=on_stdout, on_stderr=on_stderr)
        finally:
            with self._lock:
                self._running.pop(running.exec_id, None)

    def cancel(self, exec_id: Optional[str] = None) -> int:
        """Stop the running command ``exec_id`` (every running command if None), from any thread.

        Returns how many were asked to stop; each one's ``exec`` raises ``SandboxCancelledError`` once
        it is gone. The sandbox stays usable when the backend implements ``sandbox_exec_kill``.
        """
        with self._lock:
            targets = [r for i, r in self._running.items() if exec_id is None or i == exec_id]
        for running in targets:
            running.cancel()
        return len(targets)

    def run(self, command: Sequence[str], **kw: Any) -> tuple[int, str, str]:
        """Convenience: exec and collect output; returns (exit_code, stdout, stderr)."""
        out: list[str] = []
        err: list[str] = []
        result = self.exec(command, on_stdout=out.append, on_stderr=err.append, **kw)
        return result.exit_code, "".join(out), "".join(err)

    def upload(self, files: Sequence[UploadItem]) -> list[FileResult]:
        return self._file_op("sandbox_upload", files)

    def download(self, files: Sequence[DownloadItem]) -> list[FileResult]:
        return self._file_op("sandbox_download", files)

    def _file_op(self, hook: str, items: Sequence[Union[UploadItem, DownloadItem]]) -> list[FileResult]:
        """Invalid paths are answered here, the same for every backend; the rest go to the backend, in order."""
        items = list(items)
        invalid = {i for i, item in enumerate(items) if not valid_sandbox_path(item.path)}
        valid = [item for i, item in enumerate(items) if i not in invalid]
        answers = iter(self._checked_files(self._call(hook, idempotent=True, files=valid), valid) if valid else [])
        return [FileResult(item.path, error="invalid_path") if i in invalid else next(answers) for i, item in enumerate(items)]

    def _checked_files(self, results: list[FileResult], items: Sequence[Union[UploadItem, DownloadItem]]) -> list[FileResult]:
        if len(results) != len(items) or not all(isinstance(r, FileResult) for r in results):
            raise BackendContractError(
                "backend '%s' returned %d results for %d files; return one FileResult per file, in order"
                % (self.backend.name, len(results), len(items)),
                backend=self.backend.name,
            )
        return results

    def write_file(self, path: str, content: Optional[bytes] = None, source: Optional[PathLike] = None) -> None:
        (result,) = self.upload([UploadItem(path, content=content, source=source)])
        self._raise_for(result)

    def read_file(self, path: str, destination: Optional[PathLike] = None) -> Optional[bytes]:
        (result,) = self.download([DownloadItem(path, destination=destination)])
        self._raise_for(result)
        return result.content

    def _raise_for(self, result: FileResult) -> None:
        if result.error:
            raise SandboxFileError(result.path, result.error, backend=self.backend.name, sandbox_id=self.id)

    def destroy(self) -> bool:
        """Idempotent; True only the first time the sandbox is actually destroyed."""
        gone = self._call("sandbox_destroy", idempotent=True)
        self.destroyed = True
        release_slot(self.backend.name, self.id)
        if self.owner is not None and self.backend.lifeline is not None:
            self.backend.lifeline.release(self.owner)
        return gone

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.destroy()
        except SandboxError as err:
            log.error("could not destroy sandbox %s: %s", self.id, err)
            if exc[0] is None:
                raise


def default_lease_seconds() -> float:
    """``METAFLOW_SANDBOX_LEASE_SECONDS`` (at least 60), else ``DEFAULT_LEASE_SECONDS``."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (60 <= value <= 86400):
        raise SandboxError(
            "%s=%r is not a number of seconds between 60 and 86400" % (LEASE_ENV, raw),
            hint="set %s to e.g. 300 (the default), or unset it" % LEASE_ENV,
        )
    return value


def open_sandbox(backend: str, spec: Optional[SandboxSpec] = None, options: Optional[Mapping[str, Any]] = None) -> Sandbox:
    """``with open_sandbox("local") as sb: sb.exec(["echo", "hi"])``"""
    return Backend(backend, options=options).create(spec)


def line_splitter(callback: Callable[[str], None]) -> tuple[Callable[[str], None], Callable[[], None]]:
    """Turn a chunk callback into a line callback; returns (feed, flush)."""
    pending: list[str] = []

    def feed(chunk: str) -> None:
        pending.append(chunk)
        if "\n" not in chunk:
            return
        text = "".join(pending)
        *lines, rest = text.split("\n")
        pending[:] = [rest] if rest else []
        for line in lines:
            callback(line + "\n")

    def flush() -> None:
        if pending:
            text = "".join(pending)
            pending.clear()
            if text:
                callback(text)

    return feed, flush
