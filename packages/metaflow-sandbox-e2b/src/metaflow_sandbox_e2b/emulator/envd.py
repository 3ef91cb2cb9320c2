"""envd, the in-sandbox agent: Connect-JSON process RPCs and the /files HTTP API.

One port serves every sandbox; requests are routed by the ``E2b-Sandbox-Id`` header (as the real
``sandbox.e2b.app`` proxy does) and authenticated by ``X-Access-Token``. Commands run in the
sandbox's `local` backend sandbox; SendSignal cancels one through the facade.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import tempfile
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from aiohttp import BodyPartReader, web
from metaflow_sandbox import DownloadItem, SandboxCancelledError, SandboxNotFoundError, SandboxTimeoutError, UploadItem

from .protocol import E2BSandbox, Proc

if TYPE_CHECKING:
    from .server import E2BServer

CHUNK = 1 << 20

_CONNECT_STATUS = {"not_found": 404, "invalid_argument": 400, "unimplemented": 501, "unavailable": 503, "internal": 500}


def envelope(obj: Any, flags: int = 0) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return bytes([flags]) + len(data).to_bytes(4, "big") + data


def connect_error(code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=_CONNECT_STATUS.get(code, 500))


def not_found(sid: str) -> web.Response:
    # The exact text matters: the SDK turns "... was not found" into SandboxNotRunningException.
    return web.json_response({"code": 502, "message": "The sandbox %s was not found" % sid}, status=502)


def e2b_path(path: str) -> str:
    return path if path.startswith("/") else "/home/user/" + path.lstrip("~/")


ENDPOINTS = {
    "/health": "health",
    "/process.Process/Start": "exec",
    "/process.Process/Connect": "attach",
    "/process.Process/SendSignal": "signal",
    "/process.Process/List": "processes",
    "/filesystem.Filesystem/Stat": "stat",
}


def endpoint_name(request: web.Request) -> str:
    """The fault schedule's name for an envd request (see faults.ENVD_ENDPOINTS)."""
    if request.path == "/files":
        return "upload" if request.method == "POST" else "download"
    return ENDPOINTS.get(request.path, "other")


def make_app(emu: E2BServer) -> web.Application:
    def route_sandbox(request: web.Request) -> Optional[web.Response]:
        sid = request.headers.get("E2b-Sandbox-Id", "")
        sb = emu.sandboxes.get(sid)
        if sb is None or not sb.alive:
            return not_found(sid)
        assert isinstance(sb, E2BSandbox)
        if request.headers.get("X-Access-Token") != sb.token:
            return web.json_response({"code": 401, "message": "invalid access token"}, status=401)
        request["sandbox"] = sb
        return None

    async def health(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    # -- files ------------------------------------------------------------------------------
    async def upload(request: web.Request) -> web.StreamResponse:
        sb: E2BSandbox = request["sandbox"]
        written = []
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader) or part.name != "file":
                    continue
                path = request.query.get("path") or _raw_filename(part)
                written.append((path, await _spool(part.read_chunk)))
        else:
            written.append((request.query.get("path", ""), await _spool(request.content.read)))
        out = []
        try:
            for path, tmp in written:
                if not path:
                    return web.json_response({"code": 400, "message": "path is required"}, status=400)
                (res,) = await emu.runner.blocking(sb.local.upload, [UploadItem(sb.map_path(path), source=tmp)])
                if res.error:
                    return _file_error(res.error, path)
                out.append({"name": os.path.basename(path.rstrip("/")), "type": "file", "path": e2b_path(path)})
        finally:
            for _, tmp in written:
                os.unlink(tmp)
        return web.json_response(out)

    async def download(request: web.Request) -> web.StreamResponse:
        sb: E2BSandbox = request["sandbox"]
        path = request.query.get("path", "")
        fd, tmp = tempfile.mkstemp(prefix="e2b-emu-dl-")
        os.close(fd)
        try:
            (res,) = await emu.runner.blocking(sb.local.download, [DownloadItem(sb.map_path(path), destination=tmp)])
            if res.error:
                return _file_error(res.error, path)
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            resp.content_length = os.path.getsize(tmp)
            await resp.prepare(request)
            with open(tmp, "rb") as f:
                while True:
                    chunk = await emu.runner.blocking(f.read, CHUNK)
                    if not chunk:
                        break
                    await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            os.unlink(tmp)

    # -- process RPCs -----------------------------------------------------------------------
    async def start(request: web.Request) -> web.StreamResponse:
        sb: E2BSandbox = request["sandbox"]
        body = await request.read()  # aiohttp de-chunks the request body
        if len(body) < 5:
            return connect_error("invalid_argument", "empty request")
        msg = json.loads(body[5 : 5 + int.from_bytes(body[1:5], "big")])
        process = msg.get("process") or {}
        argv = [process.get("cmd") or "/bin/bash"] + list(process.get("args") or [])
        if not emu.login_shell and len(argv) == 4 and argv[0].endswith("bash") and argv[1:3] == ["-l", "-c"]:
            # A login shell, as envd runs it: /etc/profile resets PATH (a PATH sent in envs is lost, as on
            # E2B) to what the image's profile gives; here the emulated image's PATH, not the host's.
            argv[3] = "PATH=%s; export PATH; %s" % (shlex.quote(sb.image_path), argv[3])
        env = {"HOME": sb.workdir, "USER": "user", "LOGNAME": "user"}
        env.update({str(k): str(v) for k, v in (process.get("envs") or {}).items()})
        deadline_ms = request.headers.get("connect-timeout-ms")
        keepalive = emu.faults.keepalive_every or float(request.headers.get("keepalive-ping-interval") or 50)

        pid = sb.next_pid
        sb.next_pid += 1
        proc = Proc(pid, exec_id="%s-%d" % (sb.id, pid))
        sb.procs[pid] = proc
        sb.execs += 1
        sb.running.add(proc.exec_id)
        emu.count("process_start")
        emu.vanish_later(sb)

        queue: asyncio.Queue = asyncio.Queue()
        proc.listeners.add(queue)
        assert sb.local is not None
        proc.fut = emu.runner.start(
            sb.local,
            argv,
            lambda kind, text: proc.publish((kind, text.encode("utf-8"))),
            env=env,
            cwd=sb.map_path(process.get("cwd")),
            timeout=int(deadline_ms) / 1000.0 if deadline_ms else None,
            exec_id=proc.exec_id,
        )

        def finished(f: asyncio.Future) -> None:
            if not f.cancelled():
                f.exception()  # retrieved here: a client that went away never reads it
            proc.done = True
            sb.running.discard(proc.exec_id)
            proc.publish(("done", None))

        proc.fut.add_done_callback(finished)
        return await _stream(emu, sb, proc, queue, request, keepalive)

    async def connect(request: web.Request) -> web.StreamResponse:
        """Process/Connect: attach to a running process; its output from now on, then its end."""
        sb: E2BSandbox = request["sandbox"]
        body = await request.read()
        msg = json.loads(body[5 : 5 + int.from_bytes(body[1:5], "big")]) if len(body) >= 5 else {}
        pid = int(((msg.get("process") or {}).get("pid")) or 0)
        proc = sb.procs.get(pid)
        if proc is None or proc.done:  # like envd: a finished process cannot be attached to
            return connect_error("not_found", "process with pid %d not found" % pid)
        emu.count("process_connect")
        queue: asyncio.Queue = asyncio.Queue()
        proc.listeners.add(queue)
        keepalive = emu.faults.keepalive_every or float(request.headers.get("keepalive-ping-interval") or 50)
        return await _stream(emu, sb, proc, queue, request, keepalive)

    async def send_signal(request: web.Request) -> web.StreamResponse:
        sb: E2BSandbox = request["sandbox"]
        msg = await request.json()
        pid = int((msg.get("process") or {}).get("pid") or 0)
        proc = sb.procs.get(pid)
        if proc is None or proc.done:
            return connect_error("not_found", "process with pid %d not found" % pid)
        proc.killed = True
        assert sb.local is not None
        emu.runner.cancel(sb.local, proc.exec_id)
        return web.json_response({})

    async def list_procs(request: web.Request) -> web.StreamResponse:
        sb: E2BSandbox = request["sandbox"]
        procs = [{"pid": p.pid, "config": {"cmd": "/bin/bash"}} for p in sb.procs.values() if not p.done]
        return web.json_response({"processes": procs})

    async def stat(request: web.Request) -> web.StreamResponse:
        sb: E2BSandbox = request["sandbox"]
        path = (await request.json()).get("path", "")
        local = sb.map_path(path)
        kind = "dir" if local == sb.workdir else await _kind(emu, sb, local)
        if kind == "none":
            return connect_error("not_found", "path '%s' does not exist" % path)
        ftype = "FILE_TYPE_DIRECTORY" if kind == "dir" else "FILE_TYPE_FILE"
        return web.json_response({"entry": {"name": os.path.basename(local.rstrip("/")) or "/", "type": ftype, "path": local}})

    async def unimplemented(request: web.Request) -> web.StreamResponse:
        return connect_error("unimplemented", "%s is not implemented by the emulator" % request.path)

    emulate = emu.middleware("envd", endpoint_name, route_sandbox, _injected)
    app = web.Application(middlewares=[emulate], client_max_size=1 << 40)
    app.add_routes(
        [
            web.get("/health", health),
            web.post("/files", upload),
            web.get("/files", download),
            web.post("/process.Process/Start", start),
            web.post("/process.Process/Connect", connect),
            web.post("/process.Process/SendSignal", send_signal),
            web.post("/process.Process/List", list_procs),
            web.post("/filesystem.Filesystem/Stat", stat),
            web.post("/{rpc:.*}", unimplemented),
        ]
    )
    return app


async def _stream(
    emu: E2BServer, sb: E2BSandbox, proc: Proc, queue: asyncio.Queue, request: web.Request, keepalive: float
) -> web.StreamResponse:
    """A Start or Connect response: the start event, output as it comes, keepalives, then the end."""
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/connect+json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    timers = _schedule_drop(emu, request)
    if request.transport is not None:
        emu.streams.add(request.transport)
    alive = await _write(resp, envelope({"event": {"start": {"pid": proc.pid}}}))
    try:
        while True:
            try:
                kind, data = await asyncio.wait_for(queue.get(), keepalive)
            except asyncio.TimeoutError:
                emu.count("keepalive")
                alive = alive and await _write(resp, envelope({"event": {"keepalive": {}}}))
                continue
            if kind == "done":
                break
            if not alive:  # the client went away: stop listening (the process runs on, like envd)
                break
            event = {"event": {"data": {kind: base64.b64encode(data).decode()}}}
            alive = await _write(resp, envelope(event))
    finally:
        for t in timers:
            t.cancel()
        proc.listeners.discard(queue)
        emu.streams.discard(request.transport)
    if alive and await _write(resp, b"".join(_ending(sb, proc, proc.fut))):
        try:
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
    return resp


def _raw_filename(part: BodyPartReader) -> str:
    """The part's filename as sent (aiohttp's ``part.filename`` strips the leading '/' of a path)."""
    match = re.search(r'filename="((?:[^"\\]|\\.)*)"', part.headers.get("Content-Disposition", ""))
    if match:
        return re.sub(r"\\(.)", r"\1", match.group(1))
    return part.filename or ""


async def _spool(read: Callable[..., Awaitable[bytes]]) -> str:
    """Stream a request body to a temp file (never hold a large upload in memory)."""
    fd, tmp = tempfile.mkstemp(prefix="e2b-emu-ul-")
    with os.fdopen(fd, "wb") as f:
        while True:
            chunk = await read(CHUNK)
            if not chunk:
                break
            f.write(chunk)
    return tmp


def _injected(request: web.Request, status: int) -> web.Response:
    """An injected 429/5xx as envd's proxy answers it: Connect JSON for RPCs, envd's JSON for /files."""
    message = "injected fault: %d" % status
    if request.path.startswith("/files") or request.path == "/health":
        return web.json_response({"code": status, "message": message}, status=status)
    code = {429: "resource_exhausted", 503: "unavailable", 504: "deadline_exceeded"}.get(status, "internal")
    return web.json_response({"code": code, "message": message}, status=status)


def _file_error(code: str, path: str) -> web.Response:
    status, text = {
        "file_not_found": (404, "path '%s' does not exist"),
        "is_directory": (400, "path '%s' is a directory"),
        "permission_denied": (403, "permission denied: '%s'"),
    }.get(code, (400, "invalid path '%s'"))
    return web.json_response({"code": status, "message": text % path}, status=status)


async def _write(resp: web.StreamResponse, data: bytes) -> bool:
    """Write and flush; False once the client is gone (the command keeps running, like envd)."""
    try:
        await resp.write(data)
        return True
    except (ConnectionError, RuntimeError):
        return False


def _ending(sb: E2BSandbox, proc: Proc, fut: asyncio.Future[Any]) -> list[bytes]:
    if not sb.alive:
        err = {
            "code": "unavailable",
            "message": "the connection to sandbox %s ended before the stream completed" % sb.id,
        }
        return [envelope({"error": err}, flags=2)]
    exc = fut.exception()
    if isinstance(exc, SandboxNotFoundError):
        return [envelope({"error": {"code": "unavailable", "message": "The sandbox %s was not found" % sb.id}}, 2)]
    stopped = isinstance(exc, (SandboxTimeoutError, SandboxCancelledError))
    if exc is not None and not stopped:
        return [envelope({"error": {"code": "internal", "message": str(exc)}}, flags=2)]
    if proc.killed or stopped:
        end = {"exitCode": -1, "exited": False, "status": "signal: killed", "error": "signal: killed"}
    else:
        code = fut.result().exit_code
        end = {"exitCode": code, "exited": True, "status": "exit status %d" % code}
        if code:
            end["error"] = "exit status %d" % code
    return [envelope({"event": {"end": end}}), envelope({}, flags=2)]


def _schedule_drop(emu: E2BServer, request: web.Request) -> list[asyncio.TimerHandle]:
    """The ``drop_stream_after`` fault: abort this stream's connection that long after it opened."""
    f = emu.faults
    if f.drop_stream_after is None or f.drop_streams == 0:
        return []
    transport = request.transport

    def drop() -> None:
        if transport is not None and f.take_stream_drop():
            emu.count("stream_dropped")
            transport.abort()

    return [asyncio.get_running_loop().call_later(f.drop_stream_after, drop)]


async def _kind(emu: E2BServer, sb: E2BSandbox, path: str) -> str:
    script = 'if [ -d "$1" ]; then echo dir; elif [ -e "$1" ]; then echo file; else echo none; fi'
    out: list[str] = []
    assert sb.local is not None
    await emu.runner.blocking(sb.local.exec, ["sh", "-c", script, "sh", path], on_stdout=out.append)
    return "".join(out).strip() or "none"
