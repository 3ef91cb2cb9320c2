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
    ExecResult,
    FileResult,
    OutputCallback,
    SandboxHandle,
    SandboxSpec,
    UploadItem,
)

PROJECT = "metaflow_sandbox"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    """Provision a sandbox and return its handle once it can run commands.

    :param spec: image, resources, env, labels, ttl, network, binds and backend ``options``.
        The sandbox must carry ``spec.labels`` (for ``sandbox_list``) and die by itself after
        ``spec.ttl_seconds`` even if nobody calls ``sandbox_destroy``.
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
) -> ExecResult:
    """Run ``command`` (an argv list) and return how it ended.

    :param env: variables added to the sandbox environment for this command only.
    :param cwd: working directory; ``None`` means ``handle.workdir``.
    :param timeout: seconds; ``None`` means no limit. When it passes, kill the command and
        raise ``SandboxTimeoutError``: never report a timeout as an exit code.
    :param on_stdout/on_stderr: called with decoded text while the command runs, in order,
        stdout and stderr kept apart.
    A non-zero exit is a result (``ExecResult.exit_code``), not an exception. Raise
    ``SandboxNotFoundError`` if the sandbox is gone.
    """


@hookspec(firstresult=True)
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    """Write files into the sandbox, creating missing parent directories.

    Return one ``FileResult`` per item, in order; a per-file failure is ``FileResult.error``
    (``permission_denied``, ``is_directory``, ``invalid_path``), not an exception.
    Stream ``UploadItem.source`` from disk rather than reading it whole.
    """


@hookspec(firstresult=True)
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    """Read files out of the sandbox.

    Return one ``FileResult`` per item, in order: ``content`` holds the bytes when the item has
    no ``destination``, else the file was streamed to ``destination``. A missing file is
    ``error="file_not_found"``.
    """


@hookspec(firstresult=True)
def sandbox_destroy(handle: SandboxHandle) -> bool:
    """Kill every process of the sandbox and delete it (not merely stop it).

    Idempotent: return True if it was destroyed now, False if it was already gone.
    """


@hookspec(firstresult=True)
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    """Optional. Return live sandboxes whose labels include all of ``labels`` (orphan collection)."""


@hookspec(firstresult=True)
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    """Optional. Declare what the backend can honour, so unsupported options fail loudly."""


@hookspec(firstresult=True)
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    """Optional. Return True if credentials/settings are present, without any network call.

    Raise ``BackendNotConfiguredError`` naming the variable to set when they are not.
    """
