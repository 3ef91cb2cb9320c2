"""The E2B control-plane REST API (the subset the Python SDK 2.x uses), plus /_emulator admin routes."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any, Awaitable, Callable

from aiohttp import web

from .state import ApiError, EmuSandbox, Faults, World

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str, headers: Any = None) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status, headers=headers)


def make_api_app(world: World) -> web.Application:
    @web.middleware
    async def faults_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await handler(request)
        world.count("api_requests")
        if world.faults.latency:
            await asyncio.sleep(world.faults.latency)
        if request.headers.get("X-API-KEY") != world.api_key:
            return error(401, "Invalid API key, it must start with 'e2b_' prefix and be a valid key")
        status = world.injected_error()
        if status is not None:
            world.count("injected_%d" % status)
            world.count("injected_api")
            headers = {"Retry-After": str(world.faults.retry_after)} if world.faults.retry_after is not None else None
            if request.path == "/v2/sandboxes" and request.method == "POST" and world.faults.error_after_create:
                request["fail_after"] = (status, headers)
            else:
                return error(status, "injected fault: %d" % status, headers)
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, exc.message)

    async def create(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sb = await world.create(body, request.headers.get("Idempotency-Key"))
        if "fail_after" in request:
            status, headers = request["fail_after"]
            return error(status, "injected fault after create: %d" % status, headers)
        return web.json_response(sb.created(), status=201)

    async def kill(request: web.Request) -> web.StreamResponse:
        if await world.kill(request.match_info["sid"]):
            return web.Response(status=204)
        return error(404, 'sandbox "%s" not found' % request.match_info["sid"])

    async def set_timeout(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        world.set_timeout(request.match_info["sid"], int(body.get("timeout", 0)))
        return web.Response(status=204)

    async def connect(request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        sb = world.set_timeout(request.match_info["sid"], int(body.get("timeout") or 300), extend_only=True)
        return web.json_response(sb.created(), status=200)

    async def detail(request: web.Request) -> web.StreamResponse:
        sb = world.get(request.match_info["sid"])
        info = sb.listed()
        info.update(envdAccessToken=sb.token, domain=None, allowInternetAccess=sb.allow_internet)
        return web.json_response(info)

    async def list_sandboxes(request: web.Request) -> web.StreamResponse:
        q = request.query
        wanted: dict[str, str] = {}
        if q.get("metadata"):
            # The SDK quotes each key and value, urlencodes the pairs and sends them as ONE query value:
            # aiohttp decodes the value, parse_qs the pairs, unquote each key and value.
            pairs = urllib.parse.parse_qs(q["metadata"], keep_blank_values=True).items()
            wanted = {urllib.parse.unquote(k): urllib.parse.unquote(v[0]) for k, v in pairs}
        states = set(q["state"].split(",")) if q.get("state") else {"running", "paused"}
        items = [
            sb
            for sb in sorted(world.live(), key=lambda s: (s.started_at, s.sandbox_id))
            if "running" in states
            and all(sb.metadata.get(k) == v for k, v in wanted.items())
            and (not q.get("template") or q["template"] == sb.template)
        ]
        start = int(q.get("nextToken") or 0)
        limit = int(q.get("limit") or 100)
        page = items[start : start + limit]
        headers = {"x-next-token": str(start + limit)} if start + limit < len(items) else None
        return web.json_response([sb.listed() for sb in page], headers=headers)

    # -- admin ------------------------------------------------------------------------------
    async def admin_sandboxes(request: web.Request) -> web.StreamResponse:
        every = request.query.get("all") == "1"
        return web.json_response([_admin_view(sb) for sb in (world.sandboxes.values() if every else world.live())])

    async def admin_faults(request: web.Request) -> web.StreamResponse:
        try:
            world.set_faults(Faults.from_dict(await request.json()))
        except (TypeError, ValueError) as exc:
            return error(400, str(exc))
        return web.json_response({"ok": True})

    async def admin_stats(request: web.Request) -> web.StreamResponse:
        stats: dict[str, Any] = dict(world.stats)
        stats["execs"] = {sid: sb.execs for sid, sb in world.sandboxes.items()}
        return web.json_response(stats)

    async def admin_health(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[faults_and_auth], client_max_size=1 << 20)
    app.add_routes(
        [
            web.post("/v2/sandboxes", create),
            web.get("/v2/sandboxes", list_sandboxes),
            web.get("/sandboxes", list_sandboxes),
            web.delete("/sandboxes/{sid}", kill),
            web.post("/sandboxes/{sid}/timeout", set_timeout),
            web.post("/v2/sandboxes/{sid}/connect", connect),
            web.get("/sandboxes/{sid}", detail),
            web.get("/_emulator/sandboxes", admin_sandboxes),
            web.post("/_emulator/faults", admin_faults),
            web.get("/_emulator/stats", admin_stats),
            web.get("/_emulator/health", admin_health),
        ]
    )
    return app


def _admin_view(sb: EmuSandbox) -> dict[str, Any]:
    return {
        "id": sb.sandbox_id,
        "metadata": dict(sb.metadata),
        "state": sb.state,
        "template": sb.template,
        "cpu": sb.cpu,
        "memory_mb": sb.memory_mb,
        "expires_in": round(sb.end_at - time.time(), 3),
        "workdir": sb.workdir,
        "execs": sb.execs,
    }


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
