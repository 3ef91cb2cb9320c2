"""The agent backend: each sandbox is a persistent agent process, driven over a unix socket.

Written from docs/adding-a-backend.md alone. ``sandbox_create`` makes a directory and starts an agent
(``agent.py``) in its own session; every other hook is one connection to that agent, speaking the JSON
lines of ``wire.py``. Everything a hook needs follows from the sandbox id (its directory under the root,
its socket path), so any process can destroy a sandbox from a bare handle.

Settings (``METAFLOW_SANDBOX_AGENT_<KEY>`` arrives as ``options["<key>"]``, the provider variable is the
fallback): ``root`` / ``AGENT_ROOT``, where sandbox directories are made; ``share_host_fs`` /
``AGENT_SHARE_HOST_FS=1``, declare that sandboxes see the launcher's files (they do: the agent runs on
this machine), which lets a flow use the local datastore. The "image" is the interpreter that created
the sandbox: its directory is first on the sandbox's PATH.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

from metaflow_sandbox import (
    BackendNotConfiguredError,
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    OutputCallback,
    SandboxError,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    UnsupportedOptionError,
    UploadItem,
    hookimpl,
)

from .agent import path_problem
from .wire import CHUNK, decode, encode, recv, send, socket_path

NAME = "agent"
CONFIG_ENV = ("AGENT_ROOT", "AGENT_SHARE_HOST_FS")
START_SECONDS = 15.0
_SITE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where this package is installed


def _root(options: Mapping[str, Any]) -> str:
    return options.get("root") or os.environ.get("AGENT_ROOT") or os.path.join(tempfile.gettempdir(), "agent-sandboxes")


def _shares_host(options: Mapping[str, Any]) -> bool:
    return str(options.get("share_host_fs") or os.environ.get("AGENT_SHARE_HOST_FS") or "").lower() in ("1", "true", "yes")


def _home(handle: SandboxHandle) -> str:
    return os.path.join(_root(handle.options), handle.sandbox_id)


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    root = options.get("root") or os.environ.get("AGENT_ROOT")
    if root and not os.path.isdir(root):
        raise BackendNotConfiguredError(NAME, "AGENT_ROOT", what="an existing directory for its sandboxes")
    return True


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    shares = _shares_host(options)
    return Capabilities(
        images=False,
        max_cpu=float(len(os.sched_getaffinity(0))),
        binds=shares,  # the launcher's directories are already there, at the same paths
        shares_host_filesystem=shares,
        enforces_limits=True,  # CPU affinity and an address-space limit, applied by the agent
        config_env=CONFIG_ENV,
    )


@hookimpl
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    for bind in spec.binds:
        if bind.dest != bind.source:
            raise UnsupportedOptionError("the agent backend shows launcher directories only at their own path, not %s" % bind.dest)
    sandbox_id = "agent-" + uuid.uuid4().hex[:12]
    home = os.path.join(_root(spec.options), sandbox_id)
    workdir = os.path.join(home, "work")
    for sub in (workdir, os.path.join(home, "home")):
        os.makedirs(sub)
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/local/bin:/usr/bin:/bin", "HOME": os.path.join(home, "home"), "LANG": "C.UTF-8"}
    config = {
        "labels": dict(spec.labels),
        "env": {**env, **spec.env},
        "workdir": workdir,
        "resources": {"cpu": spec.resources.cpu, "memory_mb": spec.resources.memory_mb},
        "ttl_seconds": spec.ttl_seconds,
    }
    with open(os.path.join(home, "sandbox.json"), "w") as f:
        json.dump(config, f)
    sock = socket_path(sandbox_id)
    os.makedirs(os.path.dirname(sock), mode=0o700, exist_ok=True)
    agent = subprocess.Popen(
        [sys.executable, "-m", "metaflow_sandbox_agent.agent", home, sock],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _SITE},
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the launcher's process group does not reach it
    )
    handle = SandboxHandle(NAME, sandbox_id, workdir, dict(spec.labels), dict(spec.options))
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            with _connect(handle) as (_, rfile, wfile):
                send(wfile, {"op": "ping"})
                if recv(rfile):
                    return handle
        except SandboxNotFoundError:
            pass
        if agent.poll() is not None or time.monotonic() > deadline:
            agent.kill()
            agent.wait()
            shutil.rmtree(home, ignore_errors=True)
            raise SandboxError("the agent of sandbox %s did not start (exit code %s)" % (sandbox_id, agent.returncode))
        time.sleep(0.02)


@contextlib.contextmanager
def _connect(handle: SandboxHandle) -> Iterator[tuple[socket.socket, Any, Any]]:
    """One connection to the sandbox's agent; a missing agent is a missing sandbox."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(socket_path(handle.sandbox_id))
        except (FileNotFoundError, ConnectionRefusedError):
            raise SandboxNotFoundError("agent sandbox %s does not exist (destroyed or expired)" % handle.sandbox_id) from None
        with sock.makefile("rb") as rfile, sock.makefile("wb") as wfile:
            try:
                yield sock, rfile, wfile
            except (BrokenPipeError, ConnectionResetError):
                raise SandboxNotFoundError("agent sandbox %s ended during the call" % handle.sandbox_id) from None
    finally:
        sock.close()


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
    """Stream the command's events until it exits; deadlines are the facade's (it calls sandbox_exec_kill)."""
    callbacks = {"out": on_stdout, "err": on_stderr}
    decoders = {ev: codecs.getincrementaldecoder("utf-8")(errors="replace") for ev in callbacks}
    with _connect(handle) as (sock, rfile, wfile):
        send(wfile, {"op": "exec", "id": exec_id, "argv": list(command), "env": dict(env), "cwd": cwd})
        while True:
            message = recv(rfile)
            if message is None:
                raise SandboxNotFoundError("agent sandbox %s ended while the command ran" % handle.sandbox_id)
            ev = message["ev"]
            if ev == "exit":
                for name, decoder in decoders.items():
                    _deliver(callbacks[name], decoder.decode(b"", final=True))
                return ExecResult(exit_code=message["code"])
            _deliver(callbacks[ev], decoders[ev].decode(decode(message["data"])))


@hookimpl
def sandbox_exec_kill(handle: SandboxHandle, exec_id: str) -> bool:
    """Ask the agent to kill the command's process group; False if it is not running (yet)."""
    with _connect(handle) as (_, rfile, wfile):
        send(wfile, {"op": "kill", "id": exec_id})
        answer = recv(rfile) or {}
    return bool(answer.get("killed"))


def _deliver(callback: OutputCallback | None, text: str) -> None:
    if text and callback:
        callback(text)


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    results = []
    for item in files:
        error = path_problem(item.path)
        if error is None:
            with _connect(handle) as (_, rfile, wfile):
                send(wfile, {"op": "upload", "path": item.path})
                with open(item.source, "rb") if item.source is not None else io.BytesIO(item.content or b"") as source:
                    for chunk in iter(lambda: source.read(CHUNK), b""):
                        send(wfile, {"data": encode(chunk)})
                send(wfile, {"end": True})
                reply = recv(rfile)
                if reply is None:
                    raise SandboxNotFoundError("agent sandbox %s ended during an upload" % handle.sandbox_id)
                error = reply["error"]
        results.append(FileResult(item.path, error=error))
    return results


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    results = []
    for item in files:
        error, content = path_problem(item.path), None
        if error is None:
            with _connect(handle) as (_, rfile, wfile):
                send(wfile, {"op": "download", "path": item.path})
                reply = recv(rfile)
                if reply is None:
                    raise SandboxNotFoundError("agent sandbox %s ended during a download" % handle.sandbox_id)
                error = reply["error"]
                if error is None:
                    content = _receive(rfile, item.destination, handle)
        results.append(FileResult(item.path, error=error, content=content))
    return results


def _receive(rfile: Any, destination: Any, handle: SandboxHandle) -> bytes | None:
    """Data lines until ``end``: into ``destination`` (streamed) or returned as bytes."""
    with open(destination, "wb") if destination is not None else io.BytesIO() as out:
        while True:
            message = recv(rfile)
            if message is None:
                raise SandboxNotFoundError("agent sandbox %s ended during a download" % handle.sandbox_id)
            if message.get("end"):
                return out.getvalue() if destination is None else None
            out.write(decode(message["data"]))


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    try:
        with _connect(handle) as (_, rfile, wfile):
            send(wfile, {"op": "shutdown"})
            return recv(rfile) is not None  # the agent answers once it has removed everything
    except SandboxNotFoundError:
        pass
    home = _home(handle)  # the agent died without cleaning up: remove what it left
    if os.path.isdir(home):
        shutil.rmtree(home, ignore_errors=True)
        return True
    return False


@hookimpl
def sandbox_list(labels: Mapping[str, str], options: Mapping[str, Any]) -> list[SandboxHandle]:
    root, found = _root(options), []
    for sandbox_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, sandbox_id, "sandbox.json")) as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue  # not one of ours, or being deleted
        have = config["labels"]
        if all(have.get(k) == v for k, v in labels.items()) and os.path.exists(socket_path(sandbox_id)):
            found.append(SandboxHandle(NAME, sandbox_id, config["workdir"], have, dict(options)))
    return found
