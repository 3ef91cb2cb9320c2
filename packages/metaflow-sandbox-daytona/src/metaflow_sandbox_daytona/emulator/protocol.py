"""Daytona's wire shapes: error bodies, timestamps, endpoint names, and the emulated sandbox's state."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import posixpath
import time
from typing import Any, Optional

from aiohttp import web
from metaflow_sandbox.emulation import EmulatedSandbox

#: Session state (exports, cwd) lives here, in the sandbox's work dir.
STATE_DIR = ".daytona-emu"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def error(status: int, message: str, code: str = "", source: str = "api", path: str = "") -> web.Response:
    """An error answer as Daytona's API and toolbox daemon give it."""
    body = {
        "statusCode": status,
        "message": message,
        "error": message,
        "code": code or str(status),
        "source": source,
        "path": path,
        "method": "",
        "timestamp": now_iso(),
    }
    return web.json_response(body, status=status)


def http_error(status: int, message: str, code: str, source: str) -> web.HTTPException:
    """The same, raised from a lookup deep inside a handler."""
    body = json.dumps({"statusCode": status, "message": message, "code": code, "source": source, "path": "", "timestamp": now_iso()})
    cls = {404: web.HTTPNotFound, 400: web.HTTPBadRequest}.get(status, web.HTTPInternalServerError)
    return cls(text=body, content_type="application/json")


def endpoint_name(request: web.Request) -> str:
    """The fault schedule's name for a request (see DaytonaFaults.ENDPOINTS)."""
    method, parts = request.method, [p for p in request.path.split("/") if p]
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


@dataclasses.dataclass(eq=False)
class DaytonaSandbox(EmulatedSandbox):
    """An emulated Daytona sandbox: its DTO, activity clock and sessions."""

    dto: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_activity: float = dataclasses.field(default_factory=time.monotonic)
    stopped_at: Optional[float] = None
    polls_until_started: int = 0
    sessions: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The snapshot image it runs on (``emulation.Image``), None for the base.
    image: Any = None

    @property
    def state(self) -> str:
        return str(self.dto["state"])

    def resolve(self, path: str) -> str:
        """Daytona resolves relative paths against the work dir."""
        return path if path.startswith("/") else posixpath.join(self.workdir, path)

    def state_prefix(self, session: str) -> str:
        """A session's state: <prefix>.env / .cwd (one directory per sandbox: no mkdir per session)."""
        return posixpath.join(self.workdir, STATE_DIR, session)

    def view(self, time_scale: float) -> dict[str, Any]:
        view = super().view(time_scale)
        view.update(name=self.dto["name"], state=self.state)
        return view
