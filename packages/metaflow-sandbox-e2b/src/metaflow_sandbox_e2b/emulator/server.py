"""Run the REST and envd servers on 127.0.0.1 until stopped (the body of ``python -m ...emulator``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from typing import Any

from aiohttp import web

from .api import make_api_app
from .envd import make_envd_app
from .state import Faults, World


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m metaflow_sandbox_e2b.emulator", description="Offline E2B emulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3999, help="REST API port (0 = any free port)")
    p.add_argument("--envd-port", type=int, default=0, help="envd port (0 = any free port)")
    p.add_argument("--api-key", default="emulator-key")
    p.add_argument("--plan", choices=["hobby", "pro"], default="hobby", help="caps sandbox timeouts (1 h / 24 h)")
    p.add_argument("--max-sandboxes", type=int, default=None, help="concurrency limit (429 above it)")
    p.add_argument("--template", action="append", default=[], metavar="NAME=CPU:MEMORY_MB", help="extra template")
    p.add_argument("--login-shell", action="store_true", help="keep `bash -l` (sources the host's /etc/profile)")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-next", type=int, default=0, help="fail the next N REST requests")
    p.add_argument("--error-statuses", default="429,503")
    p.add_argument("--error-scope", choices=["api", "all"], default="api", help="all: envd requests too (never Process/Start)")
    p.add_argument("--error-after-create", action="store_true")
    p.add_argument("--retry-after", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-stream-after", type=float, default=None)
    p.add_argument("--drop-streams", type=int, default=None, help="drop only the first N command streams")
    p.add_argument("--time-scale", type=float, default=1.0, help="real seconds per emulated second of sandbox timeouts")
    p.add_argument("--outage", action="store_true", help="every request answers 503 (the provider is down)")
    p.add_argument("--vanish-after", type=float, default=None)
    p.add_argument("--keepalive-every", type=float, default=None)
    p.add_argument("--faults", default=None, help="faults as JSON (overrides the flags)")
    p.add_argument("--ready-json", action="store_true", help="print one JSON line with the ports when ready")
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when the parent process goes away")
    return p.parse_args(argv)


def faults_from_args(args: argparse.Namespace) -> Faults:
    if args.faults:
        return Faults.from_dict(json.loads(args.faults))
    return Faults(
        latency=args.latency,
        error_rate=args.error_rate,
        error_next=args.error_next,
        error_statuses=tuple(int(s) for s in args.error_statuses.split(",") if s),
        error_scope=args.error_scope,
        error_after_create=args.error_after_create,
        retry_after=args.retry_after,
        seed=args.seed,
        drop_stream_after=args.drop_stream_after,
        drop_streams=args.drop_streams,
        time_scale=args.time_scale,
        outage=args.outage,
        vanish_after=args.vanish_after,
        keepalive_every=args.keepalive_every,
    )


def templates_from_args(specs: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for spec in specs:
        name, _, size = spec.partition("=")
        cpu, _, mem = size.partition(":")
        out[name] = (int(cpu), int(mem))
    return out


async def serve(args: argparse.Namespace) -> None:
    world = World(
        api_key=args.api_key,
        plan=args.plan,
        templates=templates_from_args(args.template),
        max_sandboxes=args.max_sandboxes,
        faults=faults_from_args(args),
        login_shell=args.login_shell,
    )
    runners = []
    ports = []
    for app, port in ((make_api_app(world), args.port), (make_envd_app(world), args.envd_port)):
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, args.host, port)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_on_stdin_eof:
        threading.Thread(target=_wait_stdin_eof, args=(loop, stop), daemon=True).start()
    info = {"api_url": "http://%s:%d" % (args.host, ports[0]), "sandbox_url": "http://%s:%d" % (args.host, ports[1])}
    if args.ready_json:
        print(json.dumps(info), flush=True)
    else:
        print("E2B emulator: E2B_API_URL=%(api_url)s E2B_SANDBOX_URL=%(sandbox_url)s" % info, file=sys.stderr, flush=True)
    reaper = asyncio.ensure_future(_reap(world))
    await stop.wait()
    reaper.cancel()
    await world.shutdown()
    for runner in runners:
        await runner.cleanup()


def _wait_stdin_eof(loop: Any, stop: asyncio.Event) -> None:
    try:
        while os.read(0, 1024):  # the raw fd: a buffered reader's lock would trip interpreter shutdown
            pass
    except OSError:
        pass
    try:
        loop.call_soon_threadsafe(stop.set)
    except RuntimeError:  # the loop already stopped (SIGTERM came first)
        pass


async def _reap(world: World) -> None:
    """Sandboxes die at their timeout, like on E2B (lifecycle on_timeout = kill)."""
    while True:
        await asyncio.sleep(0.25)
        await world.reap_expired()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))
