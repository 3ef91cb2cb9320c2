"""The Daytona API emulator: REST control plane under /api, toolbox under /toolbox, admin under /_emu.

Protocol facts (status codes, DTO fields, log markers, multipart layout) follow
docs/backends/daytona.md and the reference notes on daytona 0.226.1. Only this module imports aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web
from metaflow_sandbox import SandboxError, SandboxFileError, SandboxTimeoutError

from ._engine import Command, EmuSandbox, Engine, Session, spool_path
from ._faults import Faults

BOUNDARY = "DAYTONA-FILE-BOUNDARY"
DEFAULT_KEY = "emulator-key"
ORG_CAPS = {"cpu": 4, "memory": 8, "disk": 10}
DEFAULT_SNAPSHOTS = {
    "daytona-small": {"cpu": 1, "memory": 1, "disk": 3},
    "daytona-medium": {"cpu": 2, "memory": 4, "disk": 8},
    "daytona-large": {"cpu": 4, "memory": 8, "disk": 10},
}
FILE_CODES = {
    "file_not_found": (404, "FILE_NOT_FOUND", "no such file or directory"),
    "permission_denied": (403, "FILE_ACCESS_DENIED", "permission denied"),
    "is_directory": (400, "INVALID_FILE_PATH", "is a directory"),
    "invalid_path": (400, "INVALID_FILE_PATH", "invalid file path"),
}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str, code: str = "", source: str = "api", path: str = "") -> web.Response:
    body = {
        "statusCode": status,
        "message": message,
        "error": message,
        "code": code or str(status),
        "source": source,
        "path": path,
        "method": "",
        "timestamp": _now(),
    }
    return web.json_response(body, status=status)


def endpoint_name(method: str, path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if parts[1:2] == ["socket.io"]:
        return "socketio"
    if parts[:1] == ["api"]:
        if parts[1:2] == ["snapshots"]:
            return "snapshot"
        if len(parts) == 2:
            return "create" if method == "POST" else "list"
        if len(parts) == 3:
            return {"GET": "get", "DELETE": "delete"}.get(method, "lifecycle")
        return "lifecycle"
    tail = "/".join(parts[2:])
    if tail.startswith("files/bulk-upload"):
        return "upload"
    if tail.startswith("files"):
        return "download"
    if tail.endswith("/logs"):
        return "logs"
    if "/command/" in tail:
        return "command"
    if tail.endswith("/exec") or tail == "process/execute":
        return "exec"
    if tail.startswith("process/session"):
        return "session"
    return "info"


class Emulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str = DEFAULT_KEY, **faults: Any):
        self.host, self.port, self.api_key = host, port, api_key
        self.faults = Faults()
        self.faults.update(faults)
        self.engine = Engine()
        self.sandboxes: dict[str, EmuSandbox] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.snapshots = {k: dict(v) for k, v in DEFAULT_SNAPSHOTS.items()}
        self.log: list[dict[str, Any]] = []
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="daytona-emu")
        self.spool = tempfile.mkdtemp(prefix="daytona-emu-spool-")
        self.teardowns: set[asyncio.Future[Any]] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self.base = ""

    # ---------------------------------------------------------------- plumbing
    async def blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=1 << 40)
        r = app.router
        r.add_route("*", "/api/socket.io/", self.socket_io)
        r.add_post("/api/sandbox", self.create)
        r.add_get("/api/sandbox", self.list_sandboxes)
        r.add_get("/api/sandbox/{id}", self.get)
        r.add_delete("/api/sandbox/{id}", self.delete)
        r.add_get("/api/sandbox/{id}/toolbox-proxy-url", self.toolbox_url)
        r.add_post("/api/sandbox/{id}/stop", self.stop)
        r.add_post("/api/sandbox/{id}/start", self.start)
        r.add_post("/api/sandbox/{id}/autostop/{n}", self.set_interval)
        r.add_post("/api/sandbox/{id}/autodelete/{n}", self.set_interval)
        r.add_post("/api/sandbox/{id}/ttl/{n}", self.set_interval)
        r.add_post("/api/sandbox/{id}/last-activity", self.last_activity)
        r.add_put("/api/sandbox/{id}/labels", self.set_labels)
        r.add_get("/api/snapshots/{name:.+}", self.snapshot)
        t = "/toolbox/{id}"
        r.add_get(t + "/work-dir", self.work_dir)
        r.add_get(t + "/user-home-dir", self.work_dir)
        r.add_post(t + "/process/execute", self.execute)
        r.add_post(t + "/process/session", self.session_create)
        r.add_get(t + "/process/session", self.session_list)
        r.add_get(t + "/process/session/{sid}", self.session_get)
        r.add_delete(t + "/process/session/{sid}", self.session_delete)
        r.add_post(t + "/process/session/{sid}/exec", self.session_exec)
        r.add_get(t + "/process/session/{sid}/command/{cid}", self.command_get)
        r.add_get(t + "/process/session/{sid}/command/{cid}/logs", self.command_logs)
        r.add_post(t + "/files/bulk-upload", self.upload)
        r.add_post(t + "/files/bulk-download", self.download)
        r.add_get("/_emu/health", self.admin_health)
        r.add_get("/_emu/sandboxes", self.admin_sandboxes)
        r.add_get("/_emu/records", self.admin_records)
        r.add_get("/_emu/requests", self.admin_requests)
        r.add_delete("/_emu/requests", self.admin_clear_requests)
        r.add_get("/_emu/faults", self.admin_get_faults)
        r.add_post("/_emu/faults", self.admin_set_faults)
        app.on_startup.append(self.on_startup)
        app.on_shutdown.append(self.on_shutdown)
        return app

    async def on_startup(self, app: web.Application) -> None:
        app["reaper"] = asyncio.get_running_loop().create_task(self.reaper())

    async def on_shutdown(self, app: web.Application) -> None:
        app["reaper"].cancel()
        for ws in list(self.sockets):
            await ws.close()
        for sb in list(self.sandboxes.values()):
            await self.destroy(sb, "emulator shutdown")
        if self.teardowns:
            await asyncio.wait(self.teardowns, timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.spool, ignore_errors=True)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_emu/"):
            return await handler(request)
        start = time.perf_counter()
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "endpoint": endpoint_name(request.method, request.path),
            "status": None,
        }
        self.log.append(entry)
        try:
            if self.faults.latency_ms:
                await asyncio.sleep(self.faults.latency_ms / 1000.0)
            auth = request.headers.get("Authorization", "")
            if request.path.startswith("/api/socket.io"):
                response = await handler(request)
            elif auth != "Bearer %s" % self.api_key:
                response = _error(401, "Invalid credentials", "UNAUTHORIZED")
            elif (status := self.faults.error_for(entry["endpoint"])) is not None:
                response = self._injected(status, request.path)
            else:
                self._touch(request.match_info.get("id"))
                response = await handler(request)
                if self.faults.lose_reply(entry["endpoint"]) and not getattr(response, "prepared", False):
                    entry["lost_reply"] = True
                    response = self._injected(self.faults.lost_reply_status, request.path)
        except web.HTTPException as exc:
            response = exc
            if exc.status in (404, 405) and exc.content_type != "application/json":  # no such route
                response = _error(501, "%s %s is not emulated" % (request.method, request.path), "NOT_IMPLEMENTED")
        entry["status"] = response.status
        entry["ms"] = round((time.perf_counter() - start) * 1000, 2)
        return response

    def _injected(self, status: int, path: str) -> web.Response:
        response = _error(status, "injected fault: %s" % status, "INJECTED", path=path)
        if self.faults.retry_after is not None:
            response.headers["Retry-After"] = "%d" % math.ceil(float(self.faults.retry_after))  # HTTP allows whole seconds only
        return response

    def _touch(self, sid: str | None) -> None:
        """API or toolbox activity on a sandbox (by id or name) resets its auto-stop timer, as in Daytona."""
        if not sid:
            return
        sb = self.sandboxes.get(sid) or next((s for s in self.sandboxes.values() if s.dto["name"] == sid), None)
        if sb is not None:
            sb.last_activity = time.monotonic()

    def _sandbox(self, request: web.Request) -> EmuSandbox:
        sid = request.match_info["id"]
        sb = self.sandboxes.get(sid) or next((s for s in self.sandboxes.values() if s.dto["name"] == sid), None)
        if sb is None:
            toolbox = request.path.startswith("/toolbox/")
            raise _http_error(404, "Sandbox with ID or name %s not found" % sid, "NOT_FOUND", "proxy" if toolbox else "api")
        return sb

    # ---------------------------------------------------------------- control plane
    async def socket_io(self, request: web.Request) -> web.StreamResponse:
        """A minimal Socket.IO v5 / Engine.IO v4 server (websocket transport) pushing sandbox events.

        The SDK keeps one connection per client and learns state changes from it; with the
        ``socketio`` fault off it gets a 404 and falls back to polling, as with an old server.
        """
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if not self.faults.socketio or not upgrade or request.query.get("EIO") != "4":
            return _error(404, "socket.io is not available here; the SDK falls back to polling", "NOT_FOUND")
        ws = web.WebSocketResponse(heartbeat=None, autoping=True)
        await ws.prepare(request)
        handshake = {"sid": uuid.uuid4().hex, "upgrades": [], "pingInterval": 25000, "pingTimeout": 20000, "maxPayload": 1000000}
        await ws.send_str("0" + json.dumps(handshake))
        pinger = asyncio.ensure_future(self._sio_ping(ws))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                data = msg.data
                if data.startswith("40"):
                    auth = json.loads(data[2:] or "{}") if data[2:].startswith("{") else {}
                    if auth.get("token") != self.api_key:
                        await ws.send_str("44" + json.dumps({"message": "Unauthorized"}))
                        continue
                    await ws.send_str("40" + json.dumps({"sid": uuid.uuid4().hex}))
                    self.sockets.add(ws)
                elif data.startswith("41") or data == "1":
                    self.sockets.discard(ws)
                    if data == "1":
                        break
        finally:
            pinger.cancel()
            self.sockets.discard(ws)
        return ws

    async def _sio_ping(self, ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(25)
            await ws.send_str("2")

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        frame = "42" + json.dumps([event, payload])
        for ws in list(self.sockets):
            if ws.closed:
                self.sockets.discard(ws)
            else:
                asyncio.ensure_future(ws.send_str(frame))

    def set_state(self, sb: EmuSandbox, state: str) -> None:
        old = sb.state
        if old == state:
            return
        sb.dto["state"] = state
        sb.dto["updatedAt"] = _now()
        self.emit("sandbox.state.updated", {"sandbox": self._dto(sb), "oldState": old, "newState": state})

    def _dto(self, sb: EmuSandbox, list_item: bool = False) -> dict[str, Any]:
        dto = dict(sb.dto)
        if list_item:
            dto.pop("env", None)
            dto.pop("kvm", None)
        return dto

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        labels = {str(k): str(v) for k, v in (body.get("labels") or {}).items()}
        env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
        build = body.get("buildInfo")
        snapshot = body.get("snapshot")
        if build is None and any(body.get(k) is not None for k in ("cpu", "memory", "disk", "gpu")):
            return _error(400, "Cannot specify Sandbox resources when using a snapshot", "BAD_REQUEST")
        if build is None:
            if snapshot and snapshot not in self.snapshots:
                return _error(404, "Snapshot %s not found" % snapshot, "NOT_FOUND")
            res = dict(self.snapshots.get(snapshot or "", {"cpu": 1, "memory": 1, "disk": 3}))
        else:
            res = {"cpu": body.get("cpu") or 1, "memory": body.get("memory") or 1, "disk": body.get("disk") or 3}
        res["gpu"] = body.get("gpu") or 0
        for key, cap in ORG_CAPS.items():
            if res[key] > cap:
                return _error(403, "Sandbox %s limit exceeded. Maximum allowed: %s" % (key, cap), "FORBIDDEN")
        if res["gpu"] and body.get("autoDeleteInterval") != 0:
            return _error(400, "GPU sandboxes must be ephemeral - set autoDeleteInterval to 0", "BAD_REQUEST")
        name = body.get("name")
        if name and any(s.dto["name"] == name for s in self.sandboxes.values()):
            return _error(409, "Sandbox with name %s already exists" % name, "CONFLICT")
        sid = str(uuid.uuid4())
        try:
            local = await self.blocking(self.engine.create_local, env, labels, bool(body.get("networkBlockAll")))
        except SandboxError as exc:
            return _error(500, "could not start the sandbox: %s" % exc, "INTERNAL")
        now = _now()
        dto = {
            "id": sid,
            "organizationId": "emulator-org",
            "name": name or sid,
            "user": body.get("user") or "daytona",
            "env": env,
            "labels": labels,
            "public": bool(body.get("public")),
            "networkBlockAll": bool(body.get("networkBlockAll")),
            "kvm": False,
            "target": body.get("target") or "us",
            "cpu": int(res["cpu"]),
            "gpu": int(res["gpu"]),
            "memory": int(res["memory"]),
            "disk": int(res["disk"]),
            "toolboxProxyUrl": self.base + "/toolbox",
            "state": "started" if build is None else "creating",
            "snapshot": snapshot,
            "autoStopInterval": body.get("autoStopInterval", 15),
            "autoDeleteInterval": body.get("autoDeleteInterval", -1),
            "createdAt": now,
            "updatedAt": now,
        }
        sb = EmuSandbox(
            sid, dto, body, local, local.handle.workdir, polls_until_started=0 if build is None else self.faults.image_build_polls
        )
        if body.get("ttlMinutes") is not None:
            dto["ttlMinutes"] = body["ttlMinutes"]
        self.sandboxes[sid] = sb
        if build is not None:
            asyncio.get_running_loop().call_later(self.faults.image_build_ms / 1000.0, self._built, sb)
        self.records[sid] = {"id": sid, "request": body, "deleted": None, "reason": None}
        self.emit("sandbox.created", self._dto(sb))
        return web.json_response(self._dto(sb))

    def _built(self, sb: EmuSandbox) -> None:
        """The emulated image build is done (after ``image_build_ms``, or ``image_build_polls`` GETs)."""
        sb.polls_until_started = 0
        if sb.id in self.sandboxes and sb.state == "creating":
            self.set_state(sb, "started")

    async def get(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        if sb.polls_until_started > 0:
            sb.polls_until_started -= 1
            if sb.polls_until_started == 0:
                self._built(sb)
        return web.json_response(self._dto(sb))

    async def list_sandboxes(self, request: web.Request) -> web.Response:
        want = json.loads(request.query.get("labels") or "{}")
        states = request.query.getall("states", [])
        items = [
            self._dto(sb, list_item=True)
            for sb in self.sandboxes.values()
            if all(sb.dto["labels"].get(k) == v for k, v in want.items()) and (not states or sb.state in states)
        ]
        return web.json_response({"items": items, "nextCursor": None})

    async def delete(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        dto = self._dto(sb)
        await self.destroy(sb, "deleted by API")
        dto["state"] = "destroying"
        return web.json_response(dto)

    async def toolbox_url(self, request: web.Request) -> web.Response:
        self._sandbox(request)
        return web.json_response({"url": self.base + "/toolbox"})

    async def stop(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        await self.stop_sandbox(sb)
        return web.json_response(self._dto(sb))

    async def start(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        self.set_state(sb, "started")
        sb.stopped_at = None
        return web.json_response(self._dto(sb))

    async def set_interval(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        kind = request.path.rstrip("/").split("/")[-2]
        key = {"autostop": "autoStopInterval", "autodelete": "autoDeleteInterval", "ttl": "ttlMinutes"}[kind]
        sb.dto[key] = int(request.match_info["n"])
        return web.json_response(self._dto(sb))

    async def last_activity(self, request: web.Request) -> web.Response:
        self._sandbox(request)
        return web.Response(status=201)

    async def set_labels(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        sb.dto["labels"] = dict((await request.json()).get("labels") or {})
        return web.json_response({"labels": sb.dto["labels"]})

    async def snapshot(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        res = self.snapshots.get(name)
        if res is None:
            return _error(404, "Snapshot %s not found" % name, "NOT_FOUND")
        now = _now()
        return web.json_response(
            {
                "id": name,
                "organizationId": "emulator-org",
                "general": True,
                "name": name,
                "imageName": name,
                "state": "active",
                "size": 1.0,
                "entrypoint": None,
                "cpu": res["cpu"],
                "gpu": 0,
                "mem": res["memory"],
                "disk": res["disk"],
                "errorReason": None,
                "createdAt": now,
                "updatedAt": now,
                "lastUsedAt": now,
                "sourceSandboxId": None,
            }
        )

    # ---------------------------------------------------------------- lifecycle
    async def stop_sandbox(self, sb: EmuSandbox) -> None:
        for session in list(sb.sessions):
            await self.kill_session(sb, session)
        self.set_state(sb, "stopped")
        sb.stopped_at = time.monotonic()

    async def kill_session(self, sb: EmuSandbox, session_id: str) -> None:
        session = sb.sessions.pop(session_id, None)
        if session and any(c.exit_code is None for c in session.commands.values()):
            await self.blocking(self.engine.kill_session, sb, session_id)

    async def destroy(self, sb: EmuSandbox, reason: str) -> None:
        """Gone at once for the API; processes are killed and the local sandbox removed in the background."""
        self.sandboxes.pop(sb.id, None)
        self.set_state(sb, "destroyed")
        self.records[sb.id].update(deleted=time.time(), reason=reason)
        sessions = list(sb.sessions)
        for session in sessions:
            await self.kill_session(sb, session)
        task = asyncio.ensure_future(self._teardown(sb))
        self.teardowns.add(task)
        task.add_done_callback(self.teardowns.discard)

    async def _teardown(self, sb: EmuSandbox) -> None:
        deadline = time.monotonic() + 5
        while sb.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.blocking(self.engine.destroy, sb)

    async def reaper(self) -> None:
        """TTL expiry, auto-stop and auto-delete, in emulated minutes (``minute_seconds``)."""
        while True:
            await asyncio.sleep(0.1)
            minute = self.faults.minute_seconds
            now = time.monotonic()
            for sb in list(self.sandboxes.values()):
                ttl = sb.dto.get("ttlMinutes")
                if ttl and now - sb.created >= ttl * minute:
                    await self.destroy(sb, "ttl expired")
                    continue
                auto_stop = sb.dto.get("autoStopInterval") or 0
                if sb.state == "started" and auto_stop > 0 and now - sb.last_activity >= auto_stop * minute:
                    await self.stop_sandbox(sb)
                auto_delete = sb.dto.get("autoDeleteInterval")
                if sb.state == "stopped" and auto_delete is not None and auto_delete >= 0 and sb.stopped_at is not None:
                    if now - sb.stopped_at >= auto_delete * minute:
                        await self.destroy(sb, "auto-delete after stop")

    # ---------------------------------------------------------------- toolbox: info and execute
    async def work_dir(self, request: web.Request) -> web.Response:
        return web.json_response({"dir": self._sandbox(request).workdir})

    async def execute(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        body = await request.json()
        timeout = body.get("timeout") or None
        try:
            code, output = await self.blocking(self.engine.execute, sb, body["command"], body.get("cwd"), body.get("envs") or {}, timeout)
        except SandboxTimeoutError:
            return _error(408, "command execution timeout", "PROCESS_EXECUTION_TIMEOUT", "daemon", request.path)
        except SandboxError as exc:
            return _error(500, str(exc), "INTERNAL", "daemon", request.path)
        return web.json_response({"exitCode": code, "result": output})

    # ---------------------------------------------------------------- toolbox: sessions
    async def session_create(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        sid = (await request.json())["sessionId"]
        if sid in sb.sessions:
            return _error(409, "session %s already exists" % sid, "CONFLICT", "daemon", request.path)
        sb.sessions[sid] = Session(sid)
        return web.Response(status=201)

    def _session(self, request: web.Request) -> tuple[EmuSandbox, Session]:
        sb = self._sandbox(request)
        session = sb.sessions.get(request.match_info["sid"])
        if session is None:
            raise _http_error(404, "session not found", "SESSION_NOT_FOUND", "daemon")
        return sb, session

    def _command(self, request: web.Request) -> tuple[EmuSandbox, Session, Command]:
        sb, session = self._session(request)
        cmd = session.commands.get(request.match_info["cid"])
        if cmd is None:
            raise _http_error(404, "command not found", "COMMAND_NOT_FOUND", "daemon")
        return sb, session, cmd

    async def session_list(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        return web.json_response([self._session_dto(s) for s in sb.sessions.values()])

    async def session_get(self, request: web.Request) -> web.Response:
        return web.json_response(self._session_dto(self._session(request)[1]))

    def _session_dto(self, session: Session) -> dict[str, Any]:
        return {"sessionId": session.id, "commands": [c.as_dto() for c in session.commands.values()]}

    async def session_delete(self, request: web.Request) -> web.Response:
        sb, session = self._session(request)
        await self.kill_session(sb, session.id)
        return web.Response(status=204)

    async def session_exec(self, request: web.Request) -> web.Response:
        sb, session = self._session(request)
        body = await request.json()
        cmd = Command(body["command"])
        session.commands[cmd.id] = cmd
        task = asyncio.ensure_future(self._run(sb, session, cmd))
        if self.faults.take("vanish_next_exec"):
            asyncio.get_running_loop().call_later(
                self.faults.vanish_delay_ms / 1000.0,
                lambda: asyncio.ensure_future(self.destroy(sb, "vanished (fault injection)")) if sb.id in self.sandboxes else None,
            )
        if body.get("runAsync") or body.get("async"):
            return web.json_response({"cmdId": cmd.id}, status=202)
        await task
        return web.json_response(
            {
                "cmdId": cmd.id,
                "output": bytes(cmd.log).decode("utf-8", "replace"),
                "stdout": "".join(cmd.stdout),
                "stderr": "".join(cmd.stderr),
                "exitCode": cmd.exit_code,
            }
        )

    async def _run(self, sb: EmuSandbox, session: Session, cmd: Command) -> None:
        loop = asyncio.get_running_loop()
        minus_one = self.faults.take("exit_minus_one_next")
        sb.running.add(cmd.id)

        def emit(kind: str, text: str) -> None:
            loop.call_soon_threadsafe(cmd.append, kind, text)

        try:
            code = await self.blocking(self.engine.run_session_command, sb, session.id, cmd, emit)
        except Exception as exc:  # the local sandbox vanished under the command
            print("daytona-emu: command %s failed: %s" % (cmd.id, exc), file=sys.stderr)
            code = -1
        finally:
            sb.running.discard(cmd.id)
        await asyncio.sleep(0)  # let queued output callbacks land before the exit code
        cmd.finish(-1 if minus_one else code)

    async def command_get(self, request: web.Request) -> web.Response:
        return web.json_response(self._command(request)[2].as_dto())

    async def command_logs(self, request: web.Request) -> web.StreamResponse:
        sb, _, cmd = self._command(request)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response(
                {
                    "output": bytes(cmd.log).decode("utf-8", "replace"),
                    "stdout": "".join(cmd.stdout),
                    "stderr": "".join(cmd.stderr),
                }
            )
        ws = web.WebSocketResponse(autoping=True, heartbeat=None)
        await ws.prepare(request)
        drop = self.faults.take("drop_log_stream")
        sent = 0
        while True:
            waiter = cmd.changed
            if sent < len(cmd.log):
                chunk = bytes(cmd.log[sent:])
                sent += len(chunk)
                await ws.send_bytes(chunk)
                if drop:
                    break
            if cmd.exit_code is not None and sent >= len(cmd.log):
                break
            if sb.id not in self.sandboxes:
                await ws.close(code=1011, message=b"sandbox is gone")
                return ws
            try:
                await asyncio.wait_for(waiter.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        await ws.close(code=self.faults.drop_close_code if drop else 1000)
        return ws

    # ---------------------------------------------------------------- toolbox: files
    async def upload(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        reader = await request.multipart()
        paths: dict[str, str] = {}
        spooled: dict[str, str] = {}
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                name = part.name or ""
                index = name[name.find("[") + 1 : name.find("]")]
                if name.endswith(".path"):
                    paths[index] = await part.text()
                elif name.endswith(".file"):
                    spool = spool_path(self.spool)
                    with open(spool, "wb") as f:
                        while chunk := await part.read_chunk(1 << 20):
                            f.write(chunk)
                    spooled[index] = spool
            from metaflow_sandbox import UploadItem

            items = [UploadItem(sb.resolve(paths[i]), source=spooled[i]) for i in spooled]
            results = await self.blocking(sb.local.upload, items)
        except SandboxError as exc:
            return _error(500, str(exc), "INTERNAL", "daemon", request.path)
        finally:
            for spool in spooled.values():
                os.unlink(spool)
        errors = [r for r in results if r.error]
        if errors:
            status, code, text = FILE_CODES[errors[0].error or "invalid_path"]
            messages = ["%s: %s" % (r.path, FILE_CODES[r.error or "invalid_path"][2]) for r in errors]
            return web.json_response(
                {"errors": messages, "message": "; ".join(messages), "code": code, "statusCode": status, "source": "daemon"}, status=status
            )
        return web.json_response({"files": [{"path": r.path} for r in results]})

    async def download(self, request: web.Request) -> web.StreamResponse:
        sb = self._sandbox(request)
        paths = (await request.json()).get("paths") or []
        from metaflow_sandbox import DownloadItem

        spools = {p: spool_path(self.spool) for p in paths}
        items = [DownloadItem(sb.resolve(p), destination=spools[p]) for p in paths]
        try:
            results = await self.blocking(self._download_each, sb, items)
        except SandboxError as exc:
            return _error(500, str(exc), "INTERNAL", "daemon", request.path)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "multipart/form-data; boundary=" + BOUNDARY})
        await resp.prepare(request)
        try:
            for path, error in zip(paths, results, strict=False):
                fname = path.replace('"', '\\"')
                if error:
                    status, code, text = FILE_CODES[error]
                    payload = json.dumps(
                        {"message": "%s: %s" % (path, text), "statusCode": status, "code": code, "source": "daemon"}
                    ).encode()
                    head = 'Content-Disposition: form-data; name="error"; filename="%s"\r\nContent-Type: application/json' % fname
                    await resp.write(b"--%s\r\n%s\r\n\r\n%s\r\n" % (BOUNDARY.encode(), head.encode(), payload))
                    continue
                size = os.path.getsize(spools[path])
                head = (
                    'Content-Disposition: form-data; name="file"; filename="%s"\r\n'
                    "Content-Type: application/octet-stream\r\nContent-Length: %d" % (fname, size)
                )
                await resp.write(b"--%s\r\n%s\r\n\r\n" % (BOUNDARY.encode(), head.encode()))
                with open(spools[path], "rb") as f:
                    while chunk := f.read(1 << 20):
                        await resp.write(chunk)
                await resp.write(b"\r\n")
            await resp.write(b"--%s--\r\n" % BOUNDARY.encode())
        finally:
            for spool in spools.values():
                if os.path.exists(spool):
                    os.unlink(spool)
        await resp.write_eof()
        return resp

    @staticmethod
    def _download_each(sb: EmuSandbox, items: list[Any]) -> list[str | None]:
        out: list[str | None] = []
        for item in items:
            try:
                (result,) = sb.local.download([item])
                out.append(result.error)
            except SandboxFileError as exc:
                out.append(exc.code)
            except SandboxError as exc:
                if isinstance(exc.__cause__, IsADirectoryError):
                    out.append("is_directory")
                elif isinstance(exc.__cause__, PermissionError):
                    out.append("permission_denied")
                else:
                    raise
        return out

    # ---------------------------------------------------------------- admin
    async def admin_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "url": self.base + "/api"})

    async def admin_sandboxes(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "id": sb.id,
                    "name": sb.dto["name"],
                    "labels": sb.dto["labels"],
                    "state": sb.state,
                    "workdir": sb.workdir,
                    "request": sb.request,
                }
                for sb in self.sandboxes.values()
            ]
        )

    async def admin_records(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.records.values()))

    async def admin_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def admin_clear_requests(self, request: web.Request) -> web.Response:
        self.log.clear()
        return web.json_response({"ok": True})

    async def admin_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.as_dict())

    async def admin_set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(await request.json())
        except ValueError as exc:
            return _error(400, str(exc), "BAD_REQUEST")
        return web.json_response(self.faults.as_dict())


def _http_error(status: int, message: str, code: str, source: str) -> web.HTTPException:
    body = json.dumps({"statusCode": status, "message": message, "code": code, "source": source, "path": "", "timestamp": _now()})
    cls = {404: web.HTTPNotFound, 400: web.HTTPBadRequest}.get(status, web.HTTPInternalServerError)
    return cls(text=body, content_type="application/json")


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Shut down (and delete every sandbox) when the process that started us dies, even by SIGKILL."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    stop.set()


async def serve(emulator: Emulator, ready: Any = None, parent_pid: int | None = None) -> None:
    runner = web.AppRunner(emulator.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, emulator.host, emulator.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    emulator.port = port
    emulator.base = "http://%s:%d" % (emulator.host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if parent_pid:
        asyncio.ensure_future(_watch_parent(parent_pid, stop))
    if ready:
        ready(emulator.base + "/api")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("python -m metaflow_sandbox_daytona.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=DEFAULT_KEY)
    parser.add_argument("--faults", default="{}", help="JSON object of fault switches (see _faults.Faults)")
    parser.add_argument("--latency-ms", type=float)
    parser.add_argument("--error-rate", type=float)
    parser.add_argument("--error-status", type=int)
    parser.add_argument("--error-endpoints", help="comma-separated endpoint names, e.g. list,get")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--drop-log-stream", type=int, help="drop the next N log streams")
    parser.add_argument("--minute-seconds", type=float, help="real seconds per emulated minute")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (our parent) dies")
    args = parser.parse_args(argv)
    faults = json.loads(args.faults)
    for key in ("latency_ms", "error_rate", "error_status", "seed", "drop_log_stream", "minute_seconds"):
        if getattr(args, key) is not None:
            faults[key] = getattr(args, key)
    if args.error_endpoints:
        faults["error_endpoints"] = args.error_endpoints.split(",")
    emulator = Emulator(args.host, args.port, args.api_key, **faults)

    def ready(url: str) -> None:
        print("DAYTONA_EMULATOR_READY %s" % url, flush=True)

    try:
        asyncio.run(serve(emulator, ready, args.parent_pid))
    except KeyboardInterrupt:
        pass
