"""The E2B control-plane REST API (the subset the Python SDK 2.x uses)."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from aiohttp import web

from .protocol import ApiError

if TYPE_CHECKING:
    from .server import E2BServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def endpoint_name(request: web.Request) -> str:
    """The fault schedule's name for a REST request (see faults.API_ENDPOINTS)."""
    path, method = request.path.rstrip("/"), request.method
    if "/templates" in path:
        return "templates"
    if path.endswith("/timeout"):
        return "timeout"
    if path.endswith("/connect"):
        return "connect"
    if path in ("/v2/sandboxes", "/sandboxes"):
        return "create" if method == "POST" else "list"
    return "delete" if method == "DELETE" else "get"


def make_app(emu: E2BServer) -> web.Application:
    def admit(request: web.Request) -> Optional[web.Response]:
        if request.headers.get("X-API-KEY") != emu.api_key:
            return error(401, "Invalid API key, it must start with 'e2b_' prefix and be a valid key")
        return None

    @web.middleware
    async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, exc.message)

    async def create(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sb = await emu.create(body, request.headers.get("Idempotency-Key"))
        return web.json_response(sb.created_answer(), status=201)

    async def kill(request: web.Request) -> web.StreamResponse:
        sb = emu.sandboxes.get(request.match_info["sid"])
        if sb is not None and await emu.end(sb, "deleted"):
            return web.Response(status=204)
        return error(404, 'sandbox "%s" not found' % request.match_info["sid"])

    async def set_timeout(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        emu.set_timeout(request.match_info["sid"], int(body.get("timeout", 0)))
        return web.Response(status=204)

    async def connect(request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        sb = emu.set_timeout(request.match_info["sid"], int(body.get("timeout") or 300), extend_only=True)
        return web.json_response(sb.created_answer(), status=200)

    async def detail(request: web.Request) -> web.StreamResponse:
        sb = emu.get(request.match_info["sid"])
        info = sb.listed(emu.faults.time_scale)
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
        items: list[Any] = [
            sb
            for sb in sorted(emu.live(), key=lambda s: (s.created, s.id))
            if "running" in states
            and all(sb.labels.get(k) == v for k, v in wanted.items())
            and (not q.get("template") or q["template"] == sb.template)  # type: ignore[attr-defined]
        ]
        start = int(q.get("nextToken") or 0)
        limit = int(q.get("limit") or 100)
        page = items[start : start + limit]
        headers = {"x-next-token": str(start + limit)} if start + limit < len(items) else None
        return web.json_response([sb.listed(emu.faults.time_scale) for sb in page], headers=headers)

    # -- templates (Template.build / exists, and the team's template list and delete) -----------
    async def request_build(request: web.Request) -> web.StreamResponse:
        return web.json_response(emu.built.request(await request.json()), status=202)

    async def trigger_build(request: web.Request) -> web.StreamResponse:
        tid, bid = request.match_info["tid"], request.match_info["bid"]
        body = await request.json()
        build = emu.built.start(tid, bid, body)
        emu.count("template_build")
        task = asyncio.ensure_future(emu.runner.blocking(emu.built.run, tid, build, body))
        emu.builds.add(task)
        task.add_done_callback(emu.builds.discard)
        return web.Response(status=202)

    async def build_status(request: web.Request) -> web.StreamResponse:
        q = request.query
        info = emu.built.status(
            request.match_info["tid"], request.match_info["bid"], int(q.get("logsOffset") or 0), int(q.get("limit") or 100)
        )
        return web.json_response(info)

    async def alias(request: web.Request) -> web.StreamResponse:
        name = request.match_info["alias"]
        t = emu.built.find(name)
        if t is None and name not in emu.templates:
            return error(404, "template alias '%s' not found" % name)
        return web.json_response({"templateID": t.template_id if t else name, "public": t is None})

    async def list_templates(request: web.Request) -> web.StreamResponse:
        return web.json_response([t.listed() for t in sorted(emu.built.templates.values(), key=lambda t: t.created)])

    async def delete_template(request: web.Request) -> web.StreamResponse:
        emu.built.delete(request.match_info["tid"], {str(getattr(sb, "image", "")) for sb in emu.live()})
        emu.count("template_delete")
        return web.Response(status=204)

    async def upload_link(request: web.Request) -> web.StreamResponse:
        return error(400, "the emulator does not take build files (COPY steps); build from pip install steps only")

    emulate = emu.middleware("api", endpoint_name, admit, lambda request, status: error(status, "injected fault: %d" % status))
    app = web.Application(middlewares=[emulate, api_errors], client_max_size=1 << 20)
    app.add_routes(
        [
            web.post("/v2/sandboxes", create),
            web.get("/v2/sandboxes", list_sandboxes),
            web.get("/sandboxes", list_sandboxes),
            web.delete("/sandboxes/{sid}", kill),
            web.post("/sandboxes/{sid}/timeout", set_timeout),
            web.post("/v2/sandboxes/{sid}/connect", connect),
            web.get("/sandboxes/{sid}", detail),
            web.post("/v3/templates", request_build),
            web.post("/v2/templates/{tid}/builds/{bid}", trigger_build),
            web.get("/templates/{tid}/builds/{bid}/status", build_status),
            web.get("/templates/{tid}/files/{hash}", upload_link),
            web.get("/templates/aliases/{alias}", alias),
            web.get("/templates", list_templates),
            web.delete("/templates/{tid}", delete_template),
        ]
    )
    return app
