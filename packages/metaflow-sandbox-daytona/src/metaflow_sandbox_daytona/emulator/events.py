"""Daytona's event stream: a minimal Socket.IO v5 / Engine.IO v4 server (websocket transport).

The SDK keeps one connection per client and learns sandbox state changes from it; with the
``socketio`` fault off it gets a 404 and falls back to polling, as with an old server.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Callable

from aiohttp import WSMsgType, web

from .protocol import error


class Events:
    def __init__(self, api_key: str, enabled: Callable[[], bool]):
        self.api_key = api_key
        self.enabled = enabled
        self.sockets: set[web.WebSocketResponse] = set()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if not self.enabled() or not upgrade or request.query.get("EIO") != "4":
            return error(404, "socket.io is not available here; the SDK falls back to polling", "NOT_FOUND")
        ws = web.WebSocketResponse(heartbeat=None, autoping=True)
        await ws.prepare(request)
        handshake = {"sid": uuid.uuid4().hex, "upgrades": [], "pingInterval": 25000, "pingTimeout": 20000, "maxPayload": 1000000}
        await ws.send_str("0" + json.dumps(handshake))
        pinger = asyncio.ensure_future(self._ping(ws))
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

    async def _ping(self, ws: web.WebSocketResponse) -> None:
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

    async def close(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
