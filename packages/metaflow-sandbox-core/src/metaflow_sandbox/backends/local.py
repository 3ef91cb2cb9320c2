"""The embedded default backend (MINIMAL PLACEHOLDER: plain subprocess in a fresh directory).

To be replaced by the bubblewrap implementation.
"""

from __future__ import annotations

import codecs
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from typing import Any, Mapping, Optional, Sequence

from metaflow_sandbox import (
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
    UploadItem,
    hookimpl,
)

NAME = "local"


@hookimpl
def sandbox_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(gpu=False, max_cpu=float(os.cpu_count() or 1), network_toggle=False, binds=True, images=False, shares_host_filesystem=True)


@hookimpl
def sandbox_check_config(options: Mapping[str, Any]) -> bool:
    return True


@hookimpl
def sandbox_create(spec: SandboxSpec) -> SandboxHandle:
    sid = "local-" + uuid.uuid4().hex[:12]
    root = tempfile.mkdtemp(prefix="mfsb-%s-" % sid)
    work = os.path.join(root, "work")
    os.makedirs(work)
    return SandboxHandle(NAME, sid, workdir=work, labels=dict(spec.labels), native={"root": root, "env": dict(spec.env)})


def _pump(stream: Any, callback: Any) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: stream.read1(65536), b""):
        text = decoder.decode(chunk)
        if text and callback:
            callback(text)
    tail = decoder.decode(b"", final=True)
    if tail and callback:
        callback(tail)


@hookimpl
def sandbox_exec(handle: SandboxHandle, command: Sequence[str], env: Mapping[str, str], cwd: Optional[str], timeout: Optional[float], on_stdout: Any, on_stderr: Any) -> ExecResult:
    if not os.path.isdir(handle.native["root"]):
        raise SandboxNotFoundError("sandbox %s is gone" % handle.sandbox_id)
    full_env = dict(os.environ)
    full_env.update(handle.native["env"])
    full_env.update(env)
    proc = subprocess.Popen(list(command), cwd=cwd or handle.workdir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    threads = [threading.Thread(target=_pump, args=(proc.stdout, on_stdout)), threading.Thread(target=_pump, args=(proc.stderr, on_stderr))]
    for t in threads:
        t.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for t in threads:
            t.join()
        raise SandboxTimeoutError("command timed out after %ss" % timeout, sandbox_id=handle.sandbox_id)
    for t in threads:
        t.join()
    return ExecResult(exit_code=code)


@hookimpl
def sandbox_upload(handle: SandboxHandle, files: Sequence[UploadItem]) -> list[FileResult]:
    out = []
    for item in files:
        os.makedirs(os.path.dirname(item.path), exist_ok=True)
        if item.source is not None:
            shutil.copyfile(item.source, item.path)
        else:
            with open(item.path, "wb") as f:
                f.write(item.content or b"")
        out.append(FileResult(item.path))
    return out


@hookimpl
def sandbox_download(handle: SandboxHandle, files: Sequence[DownloadItem]) -> list[FileResult]:
    out = []
    for item in files:
        if not os.path.exists(item.path):
            out.append(FileResult(item.path, error="file_not_found"))
            continue
        with open(item.path, "rb") as f:
            data = f.read()
        if item.destination is not None:
            with open(item.destination, "wb") as f:
                f.write(data)
            out.append(FileResult(item.path))
        else:
            out.append(FileResult(item.path, content=data))
    return out


@hookimpl
def sandbox_destroy(handle: SandboxHandle) -> bool:
    root = handle.native["root"]
    if not os.path.isdir(root):
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True
