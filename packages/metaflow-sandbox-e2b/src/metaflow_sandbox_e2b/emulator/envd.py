"""envd, the in-sandbox agent: Connect-JSON process RPCs and the /files HTTP API.

One port serves every sandbox; requests are routed by the ``E2b-Sandbox-Id`` header (as the real
``sandbox.e2b.app`` proxy does) and authenticated by ``X-Access-Token``. Commands run in the
sandbox's `local` backend sandbox, wrapped so SendSignal/kill can reach their process group.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import tempfile
from typing import Any, Awaitable, Callable

from aiohttp import BodyPartReader, web
from metaflow_sandbox import DownloadItem, SandboxNotFoundError, SandboxTimeoutError, UploadItem

from .state import EmuSandbox, Proc, World

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = 1 << 20

#: $0 = kill file, $1 = the sandbox workdir, then the command. The watcher kills the command's
#: process group when the kill file appears (SendSignal) or the sandbox's workdir vanishes (kill).
WRAPPER = r"""w=$1; shift
setsid "$@" &
c=$!
( k=
  while kill -0 "$c" 2>/dev/null; do
    if [ -z "$k" ] && { [ -e "$0" ] || [ ! -d "$w" ]; }; then k=1; rm -f "$0"; fi
    # before setsid() has run in the child its group does not exist yet: then kill the pid itself
    if [ -n "$k" ]; then kill -9 -"$c" 2>/dev/null || kill -9 "$c" 2>/dev/null; fi
    sleep 0.2
  done ) >/dev/null 2>&1 </dev/null &
wait "$c" 2>/dev/null
"""

#: The same watcher, folded into the SDK's own ``bash -c CMD`` (one process less per command). The local
#: backend starts every command as a process-group leader (bwrap --new-session / start_new_session),
#: so ``kill -9 -$$`` reaches the whole command tree.
WATCHER = r"""( k=
  while kill -0 $$ 2>/dev/null; do
    if [ -z "$k" ] && {{ [ -e {kf} ] || [ ! -d {w} ]; }}; then k=1; rm -f {kf}; fi
    if [ -n "$k" ]; then kill -9 -$$ 2>/dev/null || kill -9 $$ 2>/dev/null; fi
    sleep 0.2
  done ) >/dev/null 2>&1 </dev/null &
"""


def wrapped(argv: list[str], kill_file: str, workdir: str) -> list[str]:
    """argv run so that SendSignal (a kill file) or the sandbox's death kills the whole command tree."""
    if len(argv) == 3 and argv[0] in ("/bin/bash", "bash") and argv[1] == "-c":
        return [argv[0], "-c", WATCHER.format(kf=shlex.quote(kill_file), w=shlex.quote(workdir)) + argv[2]]
    return ["sh", "-c", WRAPPER, kill_file, workdir] + argv


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


def make_envd_app(world: World) -> web.Application:
    @web.middleware
    async def route_sandbox(request: web.Request, handler: Handler) -> web.StreamResponse:
        world.count("envd_requests")
        if world.faults.latency:
            await asyncio.sleep(world.faults.latency)
        if request.path != "/process.Process/Start" or world.faults.outage:
            status = world.injected_error(envd=True)
            if status is not None:
                world.count("injected_%d" % status)
                world.count("injected_envd")
                return _injected(world, request, status)
        sid = request.headers.get("E2b-Sandbox-Id", "")
        sb = world.sandboxes.get(sid)
        if sb is None or not sb.alive:
            return not_found(sid)
        if request.headers.get("X-Access-Token") != sb.token:
            return web.json_response({"code": 401, "message": "invalid access token"}, status=401)
        request["sandbox"] = sb
        return await handler(request)

    async def health(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    # -- files ------------------------------------------------------------------------------
    async def upload(request: web.Request) -> web.StreamResponse:
        sb: EmuSandbox = request["sandbox"]
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
                (res,) = await world.run_blocking(sb.local.upload, [UploadItem(world.map_path(sb, path), source=tmp)])
                if res.error:
                    return _file_error(res.error, path)
                out.append({"name": os.path.basename(path.rstrip("/")), "type": "file", "path": e2b_path(path)})
        finally:
            for _, tmp in written:
                os.unlink(tmp)
        return web.json_response(out)

    async def download(request: web.Request) -> web.StreamResponse:
        sb: EmuSandbox = request["sandbox"]
        path = request.query.get("path", "")
        fd, tmp = tempfile.mkstemp(prefix="e2b-emu-dl-")
        os.close(fd)
        try:
            (res,) = await world.run_blocking(sb.local.download, [DownloadItem(world.map_path(sb, path), destination=tmp)])
            if res.error:
                return _file_error(res.error, path)
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            resp.content_length = os.path.getsize(tmp)
            await resp.prepare(request)
            with open(tmp, "rb") as f:
                while True:
                    chunk = await world.run_blocking(f.read, CHUNK)
                    if not chunk:
                        break
                    await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            os.unlink(tmp)

    # -- process RPCs -----------------------------------------------------------------------
    async def start(request: web.Request) -> web.StreamResponse:
        sb: EmuSandbox = request["sandbox"]
        body = await request.read()  # aiohttp de-chunks the request body
        if len(body) < 5:
            return connect_error("invalid_argument", "empty request")
        msg = json.loads(body[5 : 5 + int.from_bytes(body[1:5], "big")])
        process = msg.get("process") or {}
        argv = [process.get("cmd") or "/bin/bash"] + list(process.get("args") or [])
        if not world.login_shell and len(argv) > 1 and argv[0].endswith("bash") and argv[1] == "-l":
            del argv[1]  # the host's /etc/profile would reset PATH; see docs/backends/e2b.md
        env = {"HOME": sb.workdir, "USER": "user", "LOGNAME": "user"}
        env.update({str(k): str(v) for k, v in (process.get("envs") or {}).items()})
        deadline_ms = request.headers.get("connect-timeout-ms")
        keepalive = world.faults.keepalive_every or float(request.headers.get("keepalive-ping-interval") or 50)

        pid = sb.next_pid
        sb.next_pid += 1
        proc = Proc(pid, kill_file="%s/.e2b-envd-kill-%d" % (sb.workdir.rstrip("/"), pid))
        sb.procs[pid] = proc
        sb.execs += 1
        world.count("process_start")

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        proc.listeners.add(queue)

        def emit(kind: str) -> Callable[[str], None]:
            def push(text: str) -> None:
                loop.call_soon_threadsafe(proc.publish, (kind, text.encode("utf-8")))

            return push

        def run() -> Any:
            return sb.local.exec(
                wrapped(argv, proc.kill_file, sb.workdir),
                env=env,
                cwd=world.map_path(sb, process.get("cwd")),
                timeout=int(deadline_ms) / 1000.0 if deadline_ms else None,
                on_stdout=emit("stdout"),
                on_stderr=emit("stderr"),
            )

        proc.fut = loop.run_in_executor(world.pool, run)

        def finished(f: asyncio.Future) -> None:
            if not f.cancelled():
                f.exception()  # retrieved here: a client that went away never reads it
            proc.done = True
            proc.publish(("done", None))

        proc.fut.add_done_callback(finished)
        return await _stream(world, sb, proc, queue, request, keepalive)

    async def connect(request: web.Request) -> web.StreamResponse:
        """Process/Connect: attach to a running process; its output from now on, then its end."""
        sb: EmuSandbox = request["sandbox"]
        body = await request.read()
        msg = json.loads(body[5 : 5 + int.from_bytes(body[1:5], "big")]) if len(body) >= 5 else {}
        pid = int(((msg.get("process") or {}).get("pid")) or 0)
        proc = sb.procs.get(pid)
        if proc is None or proc.done:  # like envd: a finished process cannot be attached to
            return connect_error("not_found", "process with pid %d not found" % pid)
        world.count("process_connect")
        queue: asyncio.Queue = asyncio.Queue()
        proc.listeners.add(queue)
        keepalive = world.faults.keepalive_every or float(request.headers.get("keepalive-ping-interval") or 50)
        return await _stream(world, sb, proc, queue, request, keepalive)

    async def send_signal(request: web.Request) -> web.StreamResponse:
        sb: EmuSandbox = request["sandbox"]
        msg = await request.json()
        pid = int((msg.get("process") or {}).get("pid") or 0)
        proc = sb.procs.get(pid)
        if proc is None or proc.done:
            return connect_error("not_found", "process with pid %d not found" % pid)
        proc.killed = True
        await world.run_blocking(sb.local.write_file, proc.kill_file, b"")
        return web.json_response({})

    async def list_procs(request: web.Request) -> web.StreamResponse:
        sb: EmuSandbox = request["sandbox"]
        procs = [{"pid": p.pid, "config": {"cmd": "/bin/bash"}} for p in sb.procs.values() if not p.done]
        return web.json_response({"processes": procs})

    async def stat(request: web.Request) -> web.StreamResponse:
        sb: EmuSandbox = request["sandbox"]
        path = (await request.json()).get("path", "")
        local = world.map_path(sb, path)
        kind = "dir" if local == sb.workdir else await _kind(world, sb, local)
        if kind == "none":
            return connect_error("not_found", "path '%s' does not exist" % path)
        ftype = "FILE_TYPE_DIRECTORY" if kind == "dir" else "FILE_TYPE_FILE"
        return web.json_response({"entry": {"name": os.path.basename(local.rstrip("/")) or "/", "type": ftype, "path": local}})

    async def unimplemented(request: web.Request) -> web.StreamResponse:
        return connect_error("unimplemented", "%s is not implemented by the emulator" % request.path)

    app = web.Application(middlewares=[route_sandbox], client_max_size=1 << 40)
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
    world: World, sb: EmuSandbox, proc: Proc, queue: asyncio.Queue, request: web.Request, keepalive: float
) -> web.StreamResponse:
    """A Start or Connect response: the start event, output as it comes, keepalives, then the end."""
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/connect+json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    timers = _schedule_faults(world, sb, request)
    if request.transport is not None:
        world.streams.add(request.transport)
    alive = await _write(resp, envelope({"event": {"start": {"pid": proc.pid}}}))
    try:
        while True:
            try:
                kind, data = await asyncio.wait_for(queue.get(), keepalive)
            except asyncio.TimeoutError:
                world.count("keepalive")
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
        world.streams.discard(request.transport)
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


def _injected(world: World, request: web.Request, status: int) -> web.Response:
    """An injected 429/5xx as envd's proxy answers it: Connect JSON for RPCs, envd's JSON for /files."""
    headers = {"Retry-After": str(world.faults.retry_after)} if world.faults.retry_after is not None else None
    message = "injected fault: %d" % status
    if request.path.startswith("/files") or request.path == "/health":
        return web.json_response({"code": status, "message": message}, status=status, headers=headers)
    code = {429: "resource_exhausted", 503: "unavailable", 504: "deadline_exceeded"}.get(status, "internal")
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


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


def _ending(sb: EmuSandbox, proc: Proc, fut: asyncio.Future[Any]) -> list[bytes]:
    if not sb.alive:
        err = {
            "code": "unavailable",
            "message": "the connection to sandbox %s ended before the stream completed" % sb.sandbox_id,
        }
        return [envelope({"error": err}, flags=2)]
    exc = fut.exception()
    if isinstance(exc, SandboxNotFoundError):
        return [envelope({"error": {"code": "unavailable", "message": "The sandbox %s was not found" % sb.sandbox_id}}, 2)]
    if exc is not None and not isinstance(exc, SandboxTimeoutError):
        return [envelope({"error": {"code": "internal", "message": str(exc)}}, flags=2)]
    if proc.killed or isinstance(exc, SandboxTimeoutError):
        end = {"exitCode": -1, "exited": False, "status": "signal: killed", "error": "signal: killed"}
    else:
        code = fut.result().exit_code
        end = {"exitCode": code, "exited": True, "status": "exit status %d" % code}
        if code:
            end["error"] = "exit status %d" % code
    return [envelope({"event": {"end": end}}), envelope({}, flags=2)]


def _schedule_faults(world: World, sb: EmuSandbox, request: web.Request) -> list[asyncio.TimerHandle]:
    loop = asyncio.get_running_loop()
    timers = []
    f = world.faults
    if f.drop_stream_after is not None and (f.drop_streams is None or world.streams_dropped < f.drop_streams):
        transport = request.transport

        def drop() -> None:
            if f.drop_streams is not None and world.streams_dropped >= f.drop_streams:
                return
            world.streams_dropped += 1
            world.count("stream_dropped")
            if transport is not None:
                transport.abort()

        timers.append(loop.call_later(f.drop_stream_after, drop))
    if f.vanish_after is not None:
        timers.append(loop.call_later(f.vanish_after, lambda: asyncio.ensure_future(world.kill(sb.sandbox_id, "vanished"))))
    return timers


async def _kind(world: World, sb: EmuSandbox, path: str) -> str:
    script = 'if [ -d "$1" ]; then echo dir; elif [ -e "$1" ]; then echo file; else echo none; fi'
    out: list[str] = []
    await world.run_blocking(sb.local.exec, ["sh", "-c", script, "sh", path], on_stdout=out.append)
    return "".join(out).strip() or "none"
