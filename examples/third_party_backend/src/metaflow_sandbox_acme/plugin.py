"""The acme backend: a sandbox is a directory, a command is a subprocess started in it.

No isolation at all; it exists to show the contract. Settings: ``options["root"]`` (from
``METAFLOW_SANDBOX_ACME_ROOT``) or ``$ACME_ROOT``: where sandbox directories are made.
``spec.ttl_seconds`` is honoured by a detached watchdog process; a command's timeout is the facade's
(it calls ``sandbox_exec_kill``); ``spec.image`` is refused and cpu/memory are advisory (both declared
through ``Capabilities``). Everything a hook needs is on disk
under the sandbox's directory, so ``sandbox_destroy`` works from a bare handle in another process.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
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
    UploadItem,
    hookimpl,
)

NAME = "acme"
# Ends a sandbox at its ttl even if the launcher is gone ($1 = its directory, $2 = ttl): what _remove does.
_WATCHDOG = 'sleep "$2"; for f in "$1"/running/command.*; do kill -s KILL -- "-${f##*.}" 2>/dev/null; done; rm -rf "$1"'


def _root(options: Mapping[str, Any]) -> str:
    return options.get("root") or os.environ.get("ACME_ROOT") or os.path.join(tempfile.gettempdir(), "acme-sandboxes")


def _home(handle: SandboxHandle) -> str:
    return os.path.join(_root(handle.options), handle.sandbox_id)


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    root = options.get("root") or os.environ.get("ACME_ROOT")
    if root and not os.path.isdir(root):
        raise BackendNotConfiguredError(NAME, "ACME_ROOT", what="an existing directory for its sandboxes")
    return True


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(images=False, shares_host_filesystem=True, enforces_limits=False, config_env=("ACME_ROOT",))


@hookimpl
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    sandbox_id = "acme-" + uuid.uuid4().hex[:12]
    home = os.path.join(_root(spec.options), sandbox_id)
    for sub in ("work", "home", "running"):
        os.makedirs(os.path.join(home, sub))
    # A command sees only this environment (plus exec's env): never the launcher's os.environ.
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/local/bin:/usr/bin:/bin", "HOME": os.path.join(home, "home")}
    with open(os.path.join(home, "sandbox.json"), "w") as f:
        json.dump({"labels": dict(spec.labels), "env": {**env, **spec.env}}, f)
    if spec.ttl_seconds:
        watchdog = subprocess.Popen(
            ["sh", "-c", _WATCHDOG, "sh", home, str(spec.ttl_seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _mark(home, "watchdog", watchdog.pid)
    return SandboxHandle(NAME, sandbox_id, os.path.join(home, "work"), dict(spec.labels), dict(spec.options))


def _mark(home: str, kind: str, pid: int) -> None:
    """Record a process group on disk, so destroy (from any process) and the watchdog can kill it."""
    open(os.path.join(home, "running", "%s.%d" % (kind, pid)), "w").close()


def _remove(home: str) -> bool:
    """Kill every process group recorded for the sandbox, then delete it. False if it was gone."""
    running = os.path.join(home, "running")
    if not os.path.isdir(running):
        return False
    for name in os.listdir(running):
        try:
            os.killpg(int(name.split(".")[1]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    shutil.rmtree(home, ignore_errors=True)
    return True


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


#: exec id -> its running command, so sandbox_exec_kill (called from another thread) can find it.
_commands: dict[str, subprocess.Popen] = {}


@hookimpl
def sandbox_exec(
    handle: SandboxHandle,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    exec_id: str,
) -> ExecResult:
    home = _home(handle)
    try:
        with open(os.path.join(home, "sandbox.json")) as f:
            base_env = json.load(f)["env"]
    except OSError:
        raise SandboxNotFoundError("acme sandbox %s does not exist" % handle.sandbox_id) from None
    proc = subprocess.Popen(
        list(command),
        cwd=cwd or handle.workdir,
        env={**base_env, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so we can kill its children too
    )
    _commands[exec_id] = proc
    _mark(home, "command", proc.pid)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, on_stdout)),
        threading.Thread(target=_pump, args=(proc.stderr, on_stderr)),
    ]
    for t in pumps:
        t.start()
    try:
        code = proc.wait()  # no deadline here: the facade keeps it and calls sandbox_exec_kill
    finally:
        _commands.pop(exec_id, None)
        _kill(proc)  # also what the command left running (`sleep 30 &`): it would hold the pipes open
        for t in pumps:
            t.join()
        with contextlib.suppress(OSError):
            os.remove(os.path.join(home, "running", "command.%d" % proc.pid))
    return ExecResult(exit_code=code)


@hookimpl
def sandbox_exec_kill(handle: SandboxHandle, exec_id: str) -> bool:
    """Kill a running command's whole process group; the sandbox stays. False if it is not running."""
    proc = _commands.get(exec_id)
    if proc is None or proc.returncode is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return True


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
    return _remove(_home(handle))


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    root, found = _root(options), []
    for sandbox_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        home = os.path.join(root, sandbox_id)
        try:
            with open(os.path.join(home, "sandbox.json")) as f:
                have = json.load(f)["labels"]
        except (OSError, ValueError, KeyError):
            continue  # not one of ours, or being deleted
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(SandboxHandle(NAME, sandbox_id, os.path.join(home, "work"), have, dict(options)))
    return found
