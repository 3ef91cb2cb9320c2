"""Daytona's snapshots under /api/snapshots: create from a declarative image (really built), get, list, delete, build logs.

What the real SDK does (daytona 0.226.1, ``SnapshotService.create``): POST /snapshots with the image's
Dockerfile text in ``buildInfo.dockerfileContent``, then GET /snapshots/{id} every second until
``active``, ``error`` or ``build_failed``; once it sees the snapshot past ``pending`` it asks
/snapshots/{id}/build-logs-url and follows ``{url}?follow=true`` (chunked text) until the build ends.
The emulator builds the Dockerfile's ``pip install`` lines with the toolkit's ``ImageStore`` (a real
pip install) for its own Python; other RUN lines are logged as skipped. A sandbox created from the
snapshot runs on that image with the snapshot's cpu and memory enforced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import shlex
import sys
import uuid
from typing import TYPE_CHECKING, Any, Optional

from aiohttp import web
from metaflow_sandbox.emulation import Image

from .protocol import error, now_iso

if TYPE_CHECKING:
    from .server import DaytonaServer

#: Daytona's default snapshots (their sizes; memory and disk in GiB) and the org's per-sandbox caps.
DEFAULT_SNAPSHOTS = {
    "daytona-small": {"cpu": 1, "mem": 1, "disk": 3},
    "daytona-medium": {"cpu": 2, "mem": 4, "disk": 8},
    "daytona-large": {"cpu": 4, "mem": 8, "disk": 10},
}
ORG_CAPS = {"cpu": 4, "memory": 8, "disk": 10}
TERMINAL = ("active", "error", "build_failed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,254}$")
_PY = re.compile(r"python:(\d+)\.(\d+)")


@dataclasses.dataclass(eq=False)
class Snapshot:
    id: str
    name: str
    cpu: int
    mem: int
    disk: int
    gpu: int = 0
    state: str = "active"
    error_reason: Optional[str] = None
    image_name: str = ""
    general: bool = False
    dockerfile: Optional[str] = None
    #: What sandboxes from it run on; None: the emulator's base (a default snapshot, or a pulled image name).
    image: Optional[Image] = None
    log: list[str] = dataclasses.field(default_factory=list)
    created_at: str = dataclasses.field(default_factory=now_iso)
    updated_at: str = dataclasses.field(default_factory=now_iso)
    last_used_at: Optional[str] = None

    def set_state(self, state: str, reason: Optional[str] = None) -> None:
        self.state, self.error_reason, self.updated_at = state, reason, now_iso()

    def dto(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "organizationId": None if self.general else "emulator-org",
            "general": self.general,
            "name": self.name,
            "imageName": self.image_name,
            "state": self.state,
            "size": round(self.image.size_bytes / 1e9, 6) if self.image is not None else 1.0,  # GB, as Daytona reports it
            "entrypoint": None,
            "cpu": self.cpu,
            "gpu": self.gpu,
            "mem": self.mem,
            "disk": self.disk,
            "errorReason": self.error_reason,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "lastUsedAt": self.last_used_at,
            "buildInfo": None if self.dockerfile is None else self.build_info(),
            "sourceSandboxId": None,
        }

    def build_info(self) -> dict[str, Any]:
        ref = "emulator/%s" % (self.image.name if self.image is not None else self.id)
        times = {"createdAt": self.created_at, "updatedAt": self.updated_at}
        return {"dockerfileContent": self.dockerfile, "contextHashes": [], "snapshotRef": ref, **times}


def defaults() -> dict[str, Snapshot]:
    return {n: Snapshot(n, n, s["cpu"], s["mem"], s["disk"], general=True, image_name=n) for n, s in DEFAULT_SNAPSHOTS.items()}


def plan(dockerfile: str) -> tuple[Optional[str], list[str], list[str]]:
    """(why it cannot be built here or None, the pip install arguments, the build's log lines for each step)."""
    version = "%d.%d" % sys.version_info[:2]
    lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args: list[str] = []
    steps: list[str] = []
    for i, line in enumerate(lines, 1):
        steps.append("Step %d/%d : %s" % (i, len(lines), line))
        verb, _, rest = line.partition(" ")
        verb = verb.upper()
        if verb == "FROM":
            found = _PY.search(rest)
            if found and "%s.%s" % found.groups() != version:
                return ("the emulator builds for its own Python %s only, not %s.%s (%s)" % (version, *found.groups(), rest), [], steps)
            continue
        if verb != "RUN":
            steps.append(" ---> %s ignored by the emulator" % verb)
            continue
        try:
            words = shlex.split(rest)
        except ValueError as exc:
            return ("cannot parse %r: %s" % (line, exc), [], steps)
        if words[:4] == ["python", "-m", "pip", "install"] or words[:2] == ["pip", "install"]:
            wanted = words[4:] if words[0] == "python" else words[2:]
            if [w for w in wanted if not w.startswith("-")] == ["pip"]:
                steps.append(" ---> upgrading pip skipped by the emulator")
                continue
            args += wanted
        else:
            steps.append(" ---> skipped by the emulator (only pip install steps are emulated)")
    return None, args, steps


def routes(emu: DaytonaServer) -> list[web.RouteDef]:
    def lookup(ref: str) -> Optional[Snapshot]:
        return emu.snapshots.get(ref) or next((s for s in emu.snapshots.values() if s.id == ref), None)

    def find(request: web.Request) -> Snapshot | web.Response:
        snap = lookup(request.match_info["id"])
        if snap is None:
            return error(404, "Snapshot %s not found" % request.match_info["id"], "NOT_FOUND")
        return snap

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            return error(400, "Invalid snapshot name %r" % (name,), "BAD_REQUEST")
        if name in emu.snapshots:
            return error(409, "Snapshot with name %s already exists" % name, "CONFLICT")
        build = body.get("buildInfo") or None
        if build is None and not body.get("imageName"):
            return error(400, "Either imageName or buildInfo must be provided", "BAD_REQUEST")
        size = {"cpu": body.get("cpu") or 1, "memory": body.get("memory") or 1, "disk": body.get("disk") or 3}
        for key, cap in ORG_CAPS.items():
            if size[key] > cap:
                return error(403, "Snapshot %s limit exceeded. Maximum allowed: %s" % (key, cap), "FORBIDDEN")
        snap = Snapshot(
            str(uuid.uuid4()),
            name,
            cpu=int(math.ceil(size["cpu"])),
            mem=int(size["memory"]),
            disk=int(size["disk"]),
            gpu=int(body.get("gpu") or 0),
            state="pending",
            image_name=body.get("imageName") or "",
            dockerfile=(build or {}).get("dockerfileContent"),
        )
        emu.snapshots[name] = snap
        emu.count("snapshot_creates")
        task = asyncio.ensure_future(build_it(snap))
        emu.builds.add(task)
        task.add_done_callback(emu.builds.discard)
        return web.json_response(snap.dto())

    async def build_it(snap: Snapshot) -> None:
        """pending -> building -> active | build_failed, the log growing as pip prints."""
        await asyncio.sleep(0.05)  # answered as pending first, as Daytona does
        if emu.snapshots.get(snap.name) is not snap:
            return  # deleted meanwhile
        snap.set_state("building" if snap.dockerfile is not None else "pulling")
        if snap.dockerfile is None:  # an image name: nothing to pull offline, the base stands in for it
            snap.log.append("Pulling %s (the emulator uses its base image)" % snap.image_name)
            snap.set_state("active")
            return
        why, args, steps = plan(snap.dockerfile)
        if why is not None:
            snap.log.extend(steps + ["ERROR: %s" % why])
            snap.set_state("build_failed", why)
            return
        image = emu.images.add(snap.id, args)
        snap.image = image
        await emu.runner.blocking(emu.images.build, image, snap.log.append, steps)
        if image.state != "active":
            snap.set_state("build_failed", "The command 'python -m pip install %s' returned a non-zero code: 1" % " ".join(args))
            emu.images.remove(image.name)
            snap.image = None
            return
        if emu.snapshots.get(snap.name) is not snap:
            emu.images.remove(image.name)  # deleted while it built
            return
        snap.set_state("active")

    async def get(request: web.Request) -> web.Response:
        snap = find(request)
        return snap if isinstance(snap, web.Response) else web.json_response(snap.dto())

    async def list_all(request: web.Request) -> web.Response:
        page = int(request.query.get("page") or 1)
        limit = min(200, int(request.query.get("limit") or 100))
        part = request.query.get("name") or ""
        items = [s for s in emu.snapshots.values() if part in s.name]
        chosen = items[(page - 1) * limit : page * limit]
        total_pages = max(1, math.ceil(len(items) / limit))
        return web.json_response({"items": [s.dto() for s in chosen], "total": len(items), "page": page, "totalPages": total_pages})

    async def delete(request: web.Request) -> web.Response:
        snap = find(request)
        if isinstance(snap, web.Response):
            return snap
        if snap.general:
            return error(403, "Cannot delete a general snapshot", "FORBIDDEN")
        emu.snapshots.pop(snap.name, None)
        emu.count("snapshot_deletes")
        if snap.image is not None and not any(getattr(sb, "image", None) is snap.image for sb in emu.live()):
            emu.images.remove(snap.image.name)  # in use: kept for its sandboxes until the emulator stops
        return web.json_response(None)

    async def activate(request: web.Request) -> web.Response:
        """An ``inactive`` snapshot (Daytona deactivates one after 14 days unused) becomes ``active`` again."""
        snap = find(request)
        if isinstance(snap, web.Response):
            return snap
        if snap.state == "active":
            return error(400, "Snapshot %s is already active" % snap.name, "BAD_REQUEST")
        if snap.state != "inactive":
            return error(400, "Snapshot %s is %s and cannot be activated" % (snap.name, snap.state), "BAD_REQUEST")
        snap.set_state("active")
        return web.json_response(snap.dto())

    async def deactivate(request: web.Request) -> web.Response:
        """What Daytona does to a snapshot unused for 14 days (tests call it to get there at once)."""
        snap = find(request)
        if isinstance(snap, web.Response):
            return snap
        if snap.state != "active" or snap.general:
            return error(400, "Snapshot %s is %s and cannot be deactivated" % (snap.name, snap.state), "BAD_REQUEST")
        snap.set_state("inactive")
        return web.Response(status=204)

    async def logs_url(request: web.Request) -> web.Response:
        snap = find(request)
        if isinstance(snap, web.Response):
            return snap
        return web.json_response({"url": "%s/snapshots/%s/build-logs" % (emu.api_url(), snap.id)})

    async def logs(request: web.Request) -> web.StreamResponse:
        """The build log as chunked text; ``follow=true`` keeps it open until the build ends."""
        snap = find(request)
        if isinstance(snap, web.Response):
            return snap
        follow = request.query.get("follow") in ("true", "1")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = 0
        while True:
            lines = snap.log[sent:]
            if lines:
                await response.write(("\n".join(lines) + "\n").encode())
                sent += len(lines)
            if not follow or (snap.state in TERMINAL and sent >= len(snap.log)) or emu.snapshots.get(snap.name) is not snap:
                break
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    s = "/api/snapshots/{id}"
    return [
        web.post("/api/snapshots", create),
        web.get("/api/snapshots", list_all),
        web.get(s + "/build-logs-url", logs_url),
        web.post(s + "/activate", activate),
        web.post(s + "/deactivate", deactivate),
        web.get(s + "/build-logs", logs),
        web.get(s, get),
        web.delete(s, delete),
    ]
