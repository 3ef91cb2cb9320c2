"""Daytona's control plane under /api: sandboxes (create, get, list, delete, stop/start, intervals, labels).

A sandbox runs as a ``local`` sandbox with its size enforced (cpu, memory); one created from a built
snapshot (``snapshots``) runs on that snapshot's image."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web
from metaflow_sandbox import Resources, SandboxError

from .protocol import DaytonaSandbox, error, now_iso
from .snapshots import ORG_CAPS

if TYPE_CHECKING:
    from .server import DaytonaServer

INTERVALS = {"autostop": "autoStopInterval", "autodelete": "autoDeleteInterval", "ttl": "ttlMinutes"}


def routes(emu: DaytonaServer) -> list[web.RouteDef]:
    def resources(body: dict[str, Any]) -> Any:
        """The sandbox's size, or the error Daytona answers for the request."""
        build, snapshot = body.get("buildInfo"), body.get("snapshot")
        if build is None and any(body.get(k) is not None for k in ("cpu", "memory", "disk", "gpu")):
            return error(400, "Cannot specify Sandbox resources when using a snapshot", "BAD_REQUEST")
        if build is None:
            snap = emu.find_snapshot(snapshot) if snapshot else None
            if snapshot and snap is None:
                return error(404, "Snapshot %s not found" % snapshot, "NOT_FOUND")
            if snap is not None and snap.state != "active":
                return error(400, "Snapshot %s is %s" % (snapshot, snap.state), "BAD_REQUEST")
            res: dict[str, Any] = {"cpu": 1, "memory": 1, "disk": 3}
            if snap is not None:
                res.update(cpu=snap.cpu, memory=snap.mem, disk=snap.disk, image=snap.image)
                snap.last_used_at = now_iso()
        else:
            res = {"cpu": body.get("cpu") or 1, "memory": body.get("memory") or 1, "disk": body.get("disk") or 3}
        res["gpu"] = body.get("gpu") or 0
        for key, cap in ORG_CAPS.items():
            if res[key] > cap:
                return error(403, "Sandbox %s limit exceeded. Maximum allowed: %s" % (key, cap), "FORBIDDEN")
        if res["gpu"] and body.get("autoDeleteInterval") != 0:
            return error(400, "GPU sandboxes must be ephemeral - set autoDeleteInterval to 0", "BAD_REQUEST")
        return res

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        labels = {str(k): str(v) for k, v in (body.get("labels") or {}).items()}
        env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
        res = resources(body)
        if isinstance(res, web.Response):
            return res
        name = body.get("name")
        if name and any(s.dto["name"] == name for s in emu.live()):
            return error(409, "Sandbox with name %s already exists" % name, "CONFLICT")
        try:
            size = Resources(cpu=float(res["cpu"]), memory_mb=int(res["memory"]) * 1024)
            local = await emu.runner.create(env, labels, network=not body.get("networkBlockAll"), resources=size, image=res.get("image"))
        except SandboxError as exc:
            return error(500, "could not start the sandbox: %s" % exc, "INTERNAL")
        sid, now, build = str(uuid.uuid4()), now_iso(), body.get("buildInfo")
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
            "toolboxProxyUrl": emu.toolbox_url(),
            "state": "started" if build is None else "creating",
            "snapshot": body.get("snapshot"),
            "autoStopInterval": body.get("autoStopInterval", 15),
            "autoDeleteInterval": body.get("autoDeleteInterval", -1),
            "createdAt": now,
            "updatedAt": now,
        }
        sb = DaytonaSandbox(sid, labels=labels, request=body, local=local, workdir=local.handle.workdir, dto=dto, image=res.get("image"))
        sb.polls_until_started = 0 if build is None else emu.faults.image_build_polls
        if body.get("ttlMinutes") is not None:
            dto["ttlMinutes"] = body["ttlMinutes"]
            sb.lease_seconds = 60.0 * body["ttlMinutes"] if body["ttlMinutes"] else None
        emu.sandboxes[sid] = sb
        if build is not None:
            asyncio.get_running_loop().call_later(emu.faults.image_build_ms / 1000.0, built, sb)
        emu.events.emit("sandbox.created", emu.dto(sb))
        return web.json_response(emu.dto(sb))

    def built(sb: DaytonaSandbox) -> None:
        """The emulated image build is done (after ``image_build_ms``, or ``image_build_polls`` GETs)."""
        sb.polls_until_started = 0
        if sb.alive and sb.state == "creating":
            emu.set_state(sb, "started")

    async def get(request: web.Request) -> web.Response:
        sb = emu.find(request)
        if sb.polls_until_started > 0:
            sb.polls_until_started -= 1
            if sb.polls_until_started == 0:
                built(sb)
        return web.json_response(emu.dto(sb))

    async def list_sandboxes(request: web.Request) -> web.Response:
        want = json.loads(request.query.get("labels") or "{}")
        states = request.query.getall("states", [])
        items = [
            emu.dto(sb, list_item=True)
            for sb in emu.live()
            if all(sb.labels.get(k) == v for k, v in want.items()) and (not states or sb.state in states)
        ]
        return web.json_response({"items": items, "nextCursor": None})

    async def delete(request: web.Request) -> web.Response:
        sb = emu.find(request)
        dto = emu.dto(sb)
        await emu.end(sb, "deleted")
        dto["state"] = "destroying"
        return web.json_response(dto)

    async def toolbox_url(request: web.Request) -> web.Response:
        emu.find(request)
        return web.json_response({"url": emu.toolbox_url()})

    async def stop(request: web.Request) -> web.Response:
        sb = emu.find(request)
        await emu.stop_sandbox(sb)
        return web.json_response(emu.dto(sb))

    async def start(request: web.Request) -> web.Response:
        sb = emu.find(request)
        emu.set_state(sb, "started")
        sb.stopped_at = None
        return web.json_response(emu.dto(sb))

    async def set_interval(request: web.Request) -> web.Response:
        sb = emu.find(request)
        key = INTERVALS[request.path.rstrip("/").split("/")[-2]]
        sb.dto[key] = int(request.match_info["n"])
        if key == "ttlMinutes":
            sb.lease_seconds = 60.0 * sb.dto[key] if sb.dto[key] else None  # counted from the create, as Daytona does
        return web.json_response(emu.dto(sb))

    async def last_activity(request: web.Request) -> web.Response:
        emu.find(request)
        return web.Response(status=201)

    async def set_labels(request: web.Request) -> web.Response:
        sb = emu.find(request)
        sb.labels = sb.dto["labels"] = {str(k): str(v) for k, v in ((await request.json()).get("labels") or {}).items()}
        return web.json_response({"labels": sb.labels})

    s = "/api/sandbox/{id}"
    return [
        web.post("/api/sandbox", create),
        web.get("/api/sandbox", list_sandboxes),
        web.get(s, get),
        web.delete(s, delete),
        web.get(s + "/toolbox-proxy-url", toolbox_url),
        web.post(s + "/stop", stop),
        web.post(s + "/start", start),
        web.post(s + "/autostop/{n}", set_interval),
        web.post(s + "/autodelete/{n}", set_interval),
        web.post(s + "/ttl/{n}", set_interval),
        web.post(s + "/last-activity", last_activity),
        web.put(s + "/labels", set_labels),
    ]
