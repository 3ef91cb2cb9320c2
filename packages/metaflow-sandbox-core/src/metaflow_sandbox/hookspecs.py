"""The backend contract: hook declarations only.

Exactly one backend answers each hook (the core builds one plugin manager per selected backend),
so every spec is ``firstresult=True`` and a backend must return a non-None value.
Specs evolve by adding keyword arguments (an implementation may accept a subset), never by renaming.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import pluggy

from .model import (
    Capabilities,
    DownloadItem,
    EnvironmentSpec,
    ExecResult,
    FileResult,
    OutputCallback,
    PreparedEnvironment,
    SandboxHandle,
    SandboxSpec,
    UploadItem,
)

PROJECT = "metaflow_sandbox"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    """Provision a sandbox and return its handle once it can run commands.

    :param spec: image, resources, env, labels, ttl, lease, network, binds and backend ``options``.
        The sandbox must carry ``spec.labels`` (the facade always adds the marker label, and the owner
        label the lifeline's reaper lists by) and must die by itself after ``spec.ttl_seconds`` even if
        nobody calls ``sandbox_destroy`` and the launcher is gone (the facade always sets a ttl).
        ``spec.env`` is the environment of every command, on top of the sandbox's own; never the
        launcher's ``os.environ``. Apply ``spec.resources`` when ``Capabilities.enforces_limits``
        says you do; otherwise they are advisory.
    Return ``SandboxHandle(backend, sandbox_id, workdir, labels, options)``: ``sandbox_destroy`` must
    work from exactly these, with ``native=None``, in another process.
    Raise ``BackendNotConfiguredError`` for missing credentials, ``TransientBackendError`` only
    when the create certainly did not happen (or ``spec.idempotency_key`` makes a retry safe).
    """


@hookspec(firstresult=True)
def sandbox_exec(
    handle: SandboxHandle,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Optional[str],
    timeout: Optional[float],
    on_stdout: Optional[OutputCallback],
    on_stderr: Optional[OutputCallback],
    exec_id: str,
) -> ExecResult:
    """Run ``command`` (an argv list) and return how it ended.

    :param env: variables added on top of the sandbox environment (``spec.env``) for this command
        only; they win over ``spec.env``.
    :param cwd: working directory; ``None`` means ``handle.workdir``.
    :param timeout: the facade keeps every deadline: with ``sandbox_exec_kill`` implemented it passes
        ``None`` and, when the time is up, kills the command through that hook and raises
        ``SandboxTimeoutError`` itself. Only a backend without that hook gets the seconds; it must then
        kill the command (its whole process group) and raise SandboxTimeoutError: never report a
        timeout as an exit code (else the facade destroys the sandbox to stop the command, and says so).
    :param on_stdout/on_stderr: called with decoded text while the command runs, in order,
        stdout and stderr kept apart. The facade calls this hook from a worker thread.
    :param exec_id: names this command for ``sandbox_exec_kill`` (a backend may ignore it otherwise).
    Return as soon as the command's own process exits: kill the leftover processes it started
    (``sleep 30 &`` keeps its stdout open) instead of reading until every pipe holder is gone.
    A non-zero exit is a result (``ExecResult.exit_code``), not an exception. Raise
    ``SandboxNotFoundError`` if the sandbox is gone (destroyed, expired at its ttl).
    """


@hookspec(firstresult=True)
def sandbox_exec_kill(handle: SandboxHandle, exec_id: str) -> bool:
    """Optional. Kill the running command ``exec_id`` (its whole process group) and keep the sandbox.

    The facade calls it from another thread when a command passes its timeout, on ``Sandbox.cancel()``
    and on Ctrl-C/SIGTERM, and calls it again every half second until that ``sandbox_exec`` returns (a
    kill may arrive before the command has started). Return True if a command was signalled, False if
    ``exec_id`` is not running (not started yet, or already ended). Your ``sandbox_exec`` then returns
    or raises as it likes; the facade reports the timeout or cancellation. Without this hook the facade
    can stop a command only by destroying its sandbox.
    """


@hookspec(firstresult=True)
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    """Write files into the sandbox, creating missing parent directories.

    The bytes land byte for byte where commands see them. Return one ``FileResult`` per item, in
    order; a per-file failure is ``FileResult.error`` (``permission_denied``, ``is_directory``,
    ``invalid_path``), not an exception. Stream ``UploadItem.source`` from disk rather than reading it whole.
    """


@hookspec(firstresult=True)
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    """Read files out of the sandbox.

    Return one ``FileResult`` per item, in order: ``content`` holds the bytes when the item has
    no ``destination``, else the file was streamed to ``destination``. A missing file is
    ``error="file_not_found"``, a directory ``error="is_directory"``, a relative path ``invalid_path``.
    """


@hookspec(firstresult=True)
def sandbox_destroy(handle: SandboxHandle) -> bool:
    """Kill every process of the sandbox and delete it (not merely stop it).

    Idempotent: return True if it was destroyed now, False if it was already gone.
    Must work from a bare handle, ``SandboxHandle(backend, sandbox_id, options=...)`` with
    ``native=None``, in a process that did not create the sandbox: the lifeline's reaper and
    ``metaflow-sandbox kill`` destroy sandboxes that way.
    """


@hookspec(firstresult=True)
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    """Optional. Return live sandboxes whose labels include all of ``labels``, never destroyed ones.

    Used by ``metaflow-sandbox list/gc`` and by the lifeline's reaper, which finds a create that was
    in flight when its owner died by ``{"metaflow-sandbox.owner": <key>}``.
    """


@hookspec(firstresult=True)
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    """Optional. Declare what the backend can honour, so unsupported options fail loudly."""


@hookspec(firstresult=True)
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    """Optional. Return True if credentials/settings are present, without any network call.

    Raise ``BackendNotConfiguredError`` naming the variable to set when they are not.
    """


@hookspec(firstresult=True)
def sandbox_environment_prepare(environment: EnvironmentSpec, on_log: Optional[OutputCallback]) -> PreparedEnvironment:
    """Optional. Find the environment named by ``environment.key``, or build it, and return it ready.

    Build through the provider's own image API (a snapshot, a template, a cached directory), with
    ``environment.requirements`` installed into the Python that sandboxes run, and carry
    ``environment.labels`` (the facade adds ``ENVIRONMENT_LABEL``) so ``sandbox_environment_list``
    finds it. Name it from ``environment.name``, so another launcher on another machine finds it too;
    two callers preparing the same key at once must end with one environment (wait for the other's
    build rather than start a second). Stream the provider's build log to ``on_log``. Block until it is
    ready and return it with ``built=True`` if this call built it. A sandbox created with
    ``SandboxSpec(environment=result.ref)`` must then run ``python`` with every requirement importable
    and install nothing. Raise ``EnvironmentBuildError`` with the build log's tail when the build fails
    (and leave no half-built environment that a later call would mistake for a ready one).
    """


@hookspec(firstresult=True)
def sandbox_environment_list(options: Mapping[str, Any]) -> list[PreparedEnvironment]:
    """Optional (with ``sandbox_environment_prepare``). Every environment we built: those carrying ``ENVIRONMENT_LABEL``."""


@hookspec(firstresult=True)
def sandbox_environment_remove(ref: str, options: Mapping[str, Any]) -> bool:
    """Optional (with ``sandbox_environment_prepare``). Delete one prepared environment by its ``ref``.

    Idempotent: True if it was removed now, False if it was already gone. Sandboxes running from it
    may keep running; new creates from it fail.
    """
