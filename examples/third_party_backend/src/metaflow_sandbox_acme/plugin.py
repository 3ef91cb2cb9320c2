"""The acme backend: a sandbox is a directory, a command is a subprocess started in it.

No isolation at all; it exists to show the contract. Settings: ``options["root"]`` (from
``METAFLOW_SANDBOX_ACME_ROOT``) or ``$ACME_ROOT``: where sandbox directories are made.
Not honoured: ``spec.ttl_seconds`` (a directory never expires by itself; ``sandbox_list`` lets
``metaflow-sandbox gc`` remove leftovers), and ``spec.image`` (refused through ``Capabilities``).
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from typing import Any, Mapping, Sequence

from metaflow_sandbox import (
    BackendNotConfiguredError,
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    OutputCallback,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
    UploadItem,
    hookimpl,
)

NAME = "acme"
_running: dict[str, set[subprocess.Popen]] = {}  # sandbox id -> live commands, killed by destroy


def _root(options: Mapping[str, Any]) -> str:
    return options.get("root") or os.environ.get("ACME_ROOT") or os.path.join(tempfile.gettempdir(), "acme-sandboxes")


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    root = options.get("root") or os.environ.get("ACME_ROOT")
    if root and not os.path.isdir(root):
        raise BackendNotConfiguredError(NAME, "ACME_ROOT", what="an existing directory for its sandboxes")
    return True


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(images=False, shares_host_filesystem=True, config_env=("ACME_ROOT",))


@hookimpl
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    sandbox_id = "acme-" + uuid.uuid4().hex[:12]
    home = os.path.join(_root(spec.options), sandbox_id)
    os.makedirs(os.path.join(home, "work"))
    with open(os.path.join(home, "labels.json"), "w") as f:
        json.dump(dict(spec.labels), f)
    native = {"home": home, "env": dict(spec.env)}
    return SandboxHandle(NAME, sandbox_id, os.path.join(home, "work"), dict(spec.labels), dict(spec.options), native)


def _pump(stream: Any, callback: OutputCallback | None) -> None:
    """Forward output as it arrives; the incremental decoder keeps split UTF-8 characters whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: stream.read1(65536), b""):
        text = decoder.decode(chunk)
        if text and callback:
            callback(text)
    tail = decoder.decode(b"", final=True)
    if tail and callback:
        callback(tail)


@hookimpl
def sandbox_exec(
    handle: SandboxHandle,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    timeout: float | None,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
) -> ExecResult:
    if not os.path.isdir(handle.native["home"]):
        raise SandboxNotFoundError("acme sandbox %s does not exist" % handle.sandbox_id)
    full_env = {**os.environ, **handle.native["env"], **env}
    proc = subprocess.Popen(
        list(command),
        cwd=cwd or handle.workdir,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so a timeout kills its children too
    )
    _running.setdefault(handle.sandbox_id, set()).add(proc)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, on_stdout)),
        threading.Thread(target=_pump, args=(proc.stderr, on_stderr)),
    ]
    for t in pumps:
        t.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise SandboxTimeoutError("command timed out after %ss and was killed" % timeout, sandbox_id=handle.sandbox_id)
    finally:
        for t in pumps:
            t.join()
        _running.get(handle.sandbox_id, set()).discard(proc)
    return ExecResult(exit_code=code)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _problem(path: str, for_reading: bool) -> str | None:
    """The per-file error code for ``path``, or None if it is fine."""
    if not os.path.isabs(path) or ".." in path.split("/"):
        return "invalid_path"
    if os.path.isdir(path):
        return "is_directory"
    if for_reading and not os.path.exists(path):
        return "file_not_found"
    return None


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    results = []
    for item in files:
        error = _problem(item.path, for_reading=False)
        if error is None:
            try:
                os.makedirs(os.path.dirname(item.path), exist_ok=True)
                if item.source is not None:
                    shutil.copyfile(item.source, item.path)  # streams in blocks
                else:
                    with open(item.path, "wb") as f:
                        f.write(item.content or b"")
            except PermissionError:
                error = "permission_denied"
        results.append(FileResult(item.path, error=error))
    return results


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    results = []
    for item in files:
        error, content = _problem(item.path, for_reading=True), None
        if error is None:
            try:
                if item.destination is not None:
                    shutil.copyfile(item.path, item.destination)
                else:
                    with open(item.path, "rb") as f:
                        content = f.read()
            except PermissionError:
                error = "permission_denied"
        results.append(FileResult(item.path, error=error, content=content))
    return results


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    for proc in list(_running.pop(handle.sandbox_id, ())):
        _kill(proc)
    if not os.path.isdir(handle.native["home"]):
        return False
    shutil.rmtree(handle.native["home"], ignore_errors=True)
    return True


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    root, found = _root(options), []
    for sandbox_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        home = os.path.join(root, sandbox_id)
        try:
            with open(os.path.join(home, "labels.json")) as f:
                have = json.load(f)
        except (OSError, ValueError):
            continue  # not one of ours, or being deleted
        if all(have.get(k) == v for k, v in labels.items()):
            native = {"home": home, "env": {}}
            found.append(SandboxHandle(NAME, sandbox_id, os.path.join(home, "work"), have, dict(options), native))
    return found
