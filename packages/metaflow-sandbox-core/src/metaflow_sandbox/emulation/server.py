"""The server half every emulator shares (needs aiohttp: ``pip install 'metaflow-sandbox[emulator]'``).

A provider's emulator subclasses :class:`EmulatorServer`: it builds its aiohttp apps (its protocol)
and gets, the same way as every other emulator, the request log and counters, latency and injected
errors and lost replies by endpoint name, the admin API under ``/_emulator/``, TTL reaping, ending a
sandbox (its commands killed, its ``local`` sandbox destroyed in the background), images built by real
pip installs (``self.images``), the bare base (``--bare-base``), and a process that hands its URLs to
the launcher and exits when the launcher dies.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Awaitable, Callable, ClassVar, Optional

from aiohttp import web

from .faults import FaultSchedule
from .handle import ADMIN, DEFAULT_KEY, READY
from .images import BareBase, ImageStore, state_dir
from .local import LocalRunner
from .sandboxes import EmulatedSandbox

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class EmulatorServer:
    """Shared state and plumbing of one emulator process; subclass it per provider."""

    #: Short name, used in thread names and messages.
    NAME: ClassVar[str] = "emulator"
    #: The provider's fault schedule (a FaultSchedule subclass declaring its ENDPOINTS).
    FAULTS: ClassVar[type[FaultSchedule]] = FaultSchedule

    def __init__(self, api_key: str, faults: Optional[dict[str, Any]] = None, bare_base: bool = False):
        self.api_key = api_key
        #: Images (prepared environments) and the bare base live here, until the emulator stops.
        self.state_dir = state_dir("mfsb-emu-%s-" % self.NAME)
        self.images = ImageStore(os.path.join(self.state_dir, "images"))
        self.base = BareBase(self.state_dir) if bare_base else None
        self.faults = self.FAULTS().set(**(faults or {}))
        self.sandboxes: dict[str, EmulatedSandbox] = {}  # every sandbox ever made, ended ones too
        self.log: list[dict[str, Any]] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self.runner = LocalRunner(name=self.NAME, base=self.base)
        self.urls: dict[str, str] = {}

    # ---------------------------------------------------------------- what a provider supplies
    def apps(self) -> list[tuple[str, web.Application, int]]:
        """(name, app, port) for each server to run; the first one also serves the admin API."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """What a launcher needs in its environment for the real SDK to reach this emulator."""
        raise NotImplementedError

    async def on_end(self, sb: EmulatedSandbox) -> None:
        """A sandbox just ended: update the provider's own state (its commands are killed after this)."""

    async def tick(self) -> None:
        """Called by the reaper every 0.1 s, after leases are enforced: the provider's other timers."""

    def faults_changed(self) -> None:
        """Called after the admin API changed the faults (e.g. to cut streams when an outage starts)."""

    # ---------------------------------------------------------------- sandboxes
    def live(self) -> list[EmulatedSandbox]:
        return [sb for sb in self.sandboxes.values() if sb.alive]

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] += n

    async def end(self, sb: EmulatedSandbox, reason: str) -> bool:
        """End a sandbox at once for the API; its commands are killed and its local sandbox removed in the background."""
        if not sb.alive:
            return False
        sb.ended, sb.reason = time.time(), reason
        self.count(reason)
        await self.on_end(sb)
        local = sb.local
        if local is not None and sb.running:
            self.runner.cancel(local)

        async def commands_done() -> None:
            deadline = time.monotonic() + 5
            while sb.running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

        self.runner.destroy_later(local, after=commands_done)
        return True

    async def reaper(self) -> None:
        """Leases run out in provider time (``time_scale``), as the provider would end the sandbox."""
        while True:
            await asyncio.sleep(0.1)
            try:
                now = time.monotonic()
                for sb in self.live():
                    expires = sb.expires_at(self.faults.time_scale)
                    if expires is not None and now >= expires:
                        await self.end(sb, "expired")
                await self.tick()
            except Exception as exc:  # one bad sandbox must not stop every lease
                print("%s emulator: reaping failed: %r" % (self.NAME, exc), file=sys.stderr, flush=True)

    def vanish_later(self, sb: EmulatedSandbox) -> None:
        """The ``vanish_next_exec`` fault: a command just started; its sandbox dies ``vanish_delay_ms`` later."""
        if self.faults.take("vanish_next_exec"):
            asyncio.get_running_loop().call_later(
                self.faults.vanish_delay_ms / 1000.0, lambda: asyncio.ensure_future(self.end(sb, "vanished"))
            )

    # ---------------------------------------------------------------- requests: log, latency, faults
    def middleware(
        self,
        app: str,
        endpoint_of: Callable[[web.Request], str],
        admit: Optional[Callable[[web.Request], Optional[web.StreamResponse]]] = None,
        injected: Optional[Callable[[web.Request, int], web.Response]] = None,
    ) -> Any:
        """Logs each request, adds latency, lets ``admit`` refuse it (auth), injects errors and lost replies.

        ``injected(request, status)`` renders an injected error in the provider's format; the
        ``Retry-After`` header is added here. Admin requests pass straight through, unlogged.
        """
        render = injected or (lambda request, status: web.json_response({"message": "injected fault: %d" % status}, status=status))

        def fault(request: web.Request, status: int) -> web.Response:
            self.count("injected_%d" % status)
            self.count("injected_%s" % app)
            response = render(request, status)
            if self.faults.retry_after is not None:
                response.headers["Retry-After"] = "%d" % math.ceil(float(self.faults.retry_after))  # whole seconds only
            return response

        @web.middleware
        async def emulate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith(ADMIN):
                return await handler(request)
            start = time.perf_counter()
            entry: dict[str, Any] = {
                "app": app,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "endpoint": endpoint_of(request),
                "status": None,
            }
            self.log.append(entry)
            self.count("%s_requests" % app)
            response: web.StreamResponse
            try:
                if self.faults.latency_ms and self.faults.delays(entry["endpoint"]):
                    await asyncio.sleep(self.faults.latency_ms / 1000.0)
                refused = admit(request) if admit else None
                if refused is not None:
                    response = refused
                elif (status := self.faults.error_for(entry["endpoint"])) is not None:
                    response = fault(request, status)
                else:
                    response = await handler(request)
                    if self.faults.lose_reply(entry["endpoint"]) and not response.prepared:
                        entry["lost_reply"] = True
                        self.count("lost_reply")
                        response = fault(request, self.faults.lost_reply_status)
            except web.HTTPException as exc:
                entry["status"] = exc.status
                raise
            finally:
                entry["ms"] = round((time.perf_counter() - start) * 1000, 2)
                entry["done_at"] = time.time()
            entry["status"] = response.status
            return response

        return emulate

    # ---------------------------------------------------------------- the admin API
    def admin_routes(self) -> list[web.RouteDef]:
        async def health(request: web.Request) -> web.Response:
            return web.json_response({"ok": True, "urls": self.urls})

        async def sandboxes(request: web.Request) -> web.Response:
            every = request.query.get("all") == "1"
            chosen = self.sandboxes.values() if every else self.live()
            return web.json_response([sb.view(self.faults.time_scale) for sb in chosen])

        async def requests(request: web.Request) -> web.Response:
            return web.json_response(self.log)

        async def clear_requests(request: web.Request) -> web.Response:
            self.log.clear()
            return web.json_response({"ok": True})

        async def stats(request: web.Request) -> web.Response:
            counters = dict(self.stats, image_builds=self.images.builds)
            if self.base is not None:
                counters["pip_attempts"] = len(self.base.pip_attempts())
            return web.json_response(counters)

        async def images(request: web.Request) -> web.Response:
            return web.json_response(
                [
                    {"name": i.name, "state": i.state, "requirements": list(i.requirements), "size_bytes": i.size_bytes, "error": i.error}
                    for i in self.images.images.values()
                ]
            )

        async def pip_attempts(request: web.Request) -> web.Response:
            return web.json_response(self.base.pip_attempts() if self.base is not None else [])

        async def get_faults(request: web.Request) -> web.Response:
            return web.json_response(self.faults.as_dict())

        async def set_faults(request: web.Request) -> web.Response:
            try:
                self.faults.set(**(await request.json()))
            except (TypeError, ValueError) as exc:
                return web.json_response({"message": str(exc)}, status=400)
            self.faults_changed()
            return web.json_response(self.faults.as_dict())

        async def clear_faults(request: web.Request) -> web.Response:
            self.faults.clear()
            self.faults_changed()
            return web.json_response(self.faults.as_dict())

        return [
            web.get(ADMIN + "health", health),
            web.get(ADMIN + "sandboxes", sandboxes),
            web.get(ADMIN + "requests", requests),
            web.delete(ADMIN + "requests", clear_requests),
            web.get(ADMIN + "stats", stats),
            web.get(ADMIN + "images", images),
            web.get(ADMIN + "pip-attempts", pip_attempts),
            web.get(ADMIN + "faults", get_faults),
            web.post(ADMIN + "faults", set_faults),
            web.delete(ADMIN + "faults", clear_faults),
        ]

    # ---------------------------------------------------------------- running
    async def serve(self, host: str, ready: Callable[[dict[str, Any]], None], stop: asyncio.Event) -> None:
        runners = []
        try:
            for i, (name, app, port) in enumerate(self.apps()):
                if i == 0:
                    app.add_routes(self.admin_routes())
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await runner.setup()
                runners.append(runner)
                site = web.TCPSite(runner, host, port)
                await site.start()
                bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                self.urls[name] = "http://%s:%d" % (host, bound)
            reaper = asyncio.ensure_future(self.reaper())
            ready(self.ready_info())
            await stop.wait()
            reaper.cancel()
            for sb in self.live():
                await self.end(sb, "shutdown")
            await self.runner.shutdown()
        finally:
            for runner in runners:
                await runner.cleanup()
            self.images.close()
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def ready_info(self) -> dict[str, Any]:
        return {"admin": next(iter(self.urls.values())), "urls": self.urls, "env": self.env(), "endpoints": list(self.FAULTS.ENDPOINTS)}


def common_arguments(parser: argparse.ArgumentParser, default_key: str = DEFAULT_KEY) -> argparse.ArgumentParser:
    """The options every emulator process takes (the launcher passes them)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=default_key)
    parser.add_argument("--faults", default="{}", help="JSON object of fault switches, e.g. '{\"latency_ms\": 50}'")
    parser.add_argument("--ready", action="store_true", help="print one handshake line with the URLs when serving")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the launcher) closes our stdin or dies")
    parser.add_argument(
        "--bare-base", action="store_true", help="sandboxes start from a stdlib-only Python with no pip (pip attempts are recorded)"
    )
    parser.add_argument("--pdeathsig", action="store_true", help="also exit by PR_SET_PDEATHSIG (when launched from a main thread)")
    return parser


def run(server: EmulatorServer, args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT, or until the launcher (``--parent-pid``) dies; end every sandbox on the way out."""
    if args.parent_pid and args.pdeathsig:
        _die_with_parent(args.parent_pid)

    def ready(info: dict[str, Any]) -> None:
        if args.ready:
            print(READY + json.dumps(info), flush=True)
            os.dup2(2, 1)  # nobody reads stdout after the handshake: never block on a full pipe
        else:
            print("%s emulator serving; environment for the SDK: %s" % (server.NAME, info["env"]), file=sys.stderr, flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.parent_pid:
            threading.Thread(target=_wait_stdin_eof, args=(loop, stop), daemon=True).start()
        await server.serve(args.host, ready, stop)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM (a clean shutdown) as soon as the launcher dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the stdin watch below still ends us
        pass
    if os.getppid() != parent_pid:  # the launcher died before prctl ran
        sys.exit(0)


def _wait_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The launcher holds our stdin's write end: EOF means it closed it (stop()) or died."""
    try:
        while os.read(0, 1024):  # the raw fd: a buffered reader's lock would trip interpreter shutdown
            pass
    except OSError:
        pass
    try:
        loop.call_soon_threadsafe(stop.set)
    except RuntimeError:  # the loop already stopped (SIGTERM came first)
        pass
