"""The Daytona emulator process: control plane under /api, toolbox under /toolbox, socket.io, on the toolkit.

Protocol facts (status codes, DTO fields, log markers, multipart layout) follow docs/backends/daytona.md
and the reference notes on daytona 0.226.1. The modules: ``control`` (sandboxes), ``snapshots`` (built for real),
``process`` (toolbox commands and sessions), ``files`` (toolbox files), ``events`` (socket.io),
``protocol`` (error shapes, endpoint names, the sandbox's state), ``faults`` (Daytona's switches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from typing import Any, Optional

from aiohttp import web
from metaflow_sandbox.emulation import DEFAULT_KEY, EmulatedSandbox
from metaflow_sandbox.emulation.server import EmulatorServer, common_arguments, run

from . import control, files, process, snapshots
from .events import Events
from .faults import DaytonaFaults
from .protocol import DaytonaSandbox, endpoint_name, error, http_error, now_iso


class DaytonaServer(EmulatorServer):
    NAME = "daytona"
    FAULTS = DaytonaFaults
    faults: DaytonaFaults

    def __init__(self, api_key: str = DEFAULT_KEY, port: int = 0, faults: Optional[dict[str, Any]] = None, bare_base: bool = False):
        super().__init__(api_key, faults, bare_base=bare_base)
        self.snapshots: dict[str, snapshots.Snapshot] = snapshots.defaults()  # by name
        self.builds: set[asyncio.Future[Any]] = set()
        self.port = port
        self.events = Events(api_key, enabled=lambda: self.faults.socketio)
        self.spool = files.spool_dir()

    # ---------------------------------------------------------------- the toolkit's hooks
    def apps(self) -> list[tuple[str, web.Application, int]]:
        emulate = self.middleware("api", endpoint_name, self.admit, self.injected)
        app = web.Application(middlewares=[emulate, not_emulated], client_max_size=1 << 40)
        app.router.add_route("*", "/api/socket.io/", self.events.handler)
        app.add_routes(control.routes(self) + snapshots.routes(self) + process.routes(self) + files.routes(self, self.spool))
        app.on_shutdown.append(self.on_shutdown)
        return [("api", app, self.port)]

    def env(self) -> dict[str, str]:
        no_proxy = "127.0.0.1,localhost"
        sdk = {"DAYTONA_API_URL": self.api_url(), "DAYTONA_API_KEY": self.api_key, "DAYTONA_TARGET": "us"}
        return dict(sdk, NO_PROXY=no_proxy, no_proxy=no_proxy)

    def ready_info(self) -> dict[str, Any]:
        return dict(super().ready_info(), url=self.api_url(), api_key=self.api_key)

    async def on_end(self, sb: EmulatedSandbox) -> None:
        assert isinstance(sb, DaytonaSandbox)
        self.set_state(sb, "destroyed")
        for session in list(sb.sessions):
            process.kill_session(self, sb, session)

    async def tick(self) -> None:
        """Auto-stop (from the last activity) and auto-delete (from the stop), in provider minutes."""
        minute = 60 * self.faults.time_scale
        now = time.monotonic()
        for sb in self.live():
            assert isinstance(sb, DaytonaSandbox)
            auto_stop = sb.dto.get("autoStopInterval") or 0
            if sb.state == "started" and auto_stop > 0 and now - sb.last_activity >= auto_stop * minute:
                await self.stop_sandbox(sb)
            auto_delete = sb.dto.get("autoDeleteInterval")
            if sb.state == "stopped" and auto_delete is not None and auto_delete >= 0 and sb.stopped_at is not None:
                if now - sb.stopped_at >= auto_delete * minute:
                    await self.end(sb, "auto-deleted")

    async def on_shutdown(self, app: web.Application) -> None:
        await self.events.close()
        shutil.rmtree(self.spool, ignore_errors=True)

    # ---------------------------------------------------------------- requests
    def admit(self, request: web.Request) -> Optional[web.Response]:
        """Socket.io authenticates in its own handshake; everything else needs the API key."""
        if request.path.startswith("/api/socket.io"):
            return None
        if request.headers.get("Authorization", "") != "Bearer %s" % self.api_key:
            return error(401, "Invalid credentials", "UNAUTHORIZED")
        sid = request.match_info.get("id")
        sb = self.lookup(sid) if sid else None
        if sb is not None:  # API or toolbox activity resets the auto-stop timer, as in Daytona
            sb.last_activity = time.monotonic()
        return None

    def injected(self, request: web.Request, status: int) -> web.Response:
        return error(status, "injected fault: %s" % status, "INJECTED", path=request.path)

    def find_snapshot(self, ref: str) -> Optional[snapshots.Snapshot]:
        """A snapshot by name or id."""
        return self.snapshots.get(ref) or next((s for s in self.snapshots.values() if s.id == ref), None)

    def lookup(self, sid: str) -> Optional[DaytonaSandbox]:
        """A live sandbox by id or name."""
        for sb in self.live():
            if sb.id == sid or sb.dto["name"] == sid:  # type: ignore[attr-defined]
                return sb  # type: ignore[return-value]
        return None

    def find(self, request: web.Request) -> DaytonaSandbox:
        sid = request.match_info["id"]
        sb = self.lookup(sid)
        if sb is None:
            source = "proxy" if request.path.startswith("/toolbox/") else "api"
            raise http_error(404, "Sandbox with ID or name %s not found" % sid, "NOT_FOUND", source)
        return sb

    # ---------------------------------------------------------------- state
    def api_url(self) -> str:
        return self.urls["api"] + "/api"

    def toolbox_url(self) -> str:
        return self.urls["api"] + "/toolbox"

    def dto(self, sb: DaytonaSandbox, list_item: bool = False) -> dict[str, Any]:
        dto = dict(sb.dto)
        if list_item:
            dto.pop("env", None)
            dto.pop("kvm", None)
        return dto

    def set_state(self, sb: DaytonaSandbox, state: str) -> None:
        old = sb.state
        if old != state:
            sb.dto.update(state=state, updatedAt=now_iso())
            self.events.emit("sandbox.state.updated", {"sandbox": self.dto(sb), "oldState": old, "newState": state})

    async def stop_sandbox(self, sb: DaytonaSandbox) -> None:
        for session in list(sb.sessions):
            process.kill_session(self, sb, session)
        self.set_state(sb, "stopped")
        sb.stopped_at = time.monotonic()


@web.middleware
async def not_emulated(request: web.Request, handler: Any) -> web.StreamResponse:
    """A route Daytona has but the emulator does not: a clear 501 instead of aiohttp's bare 404."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status in (404, 405) and exc.content_type != "application/json":
            return error(501, "%s %s is not emulated" % (request.method, request.path), "NOT_IMPLEMENTED")
        raise


def main(argv: Optional[list[str]] = None) -> None:
    parser = common_arguments(argparse.ArgumentParser("python -m metaflow_sandbox_daytona.emulator", description=__doc__))
    args = parser.parse_args(argv)
    run(DaytonaServer(args.api_key, args.port, json.loads(args.faults), bare_base=args.bare_base), args)
