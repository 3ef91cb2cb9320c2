"""The E2B emulator process: the REST control plane and envd on two ports, on the emulation toolkit.

The modules: ``api`` (the REST API the SDK 2.x uses), ``envd`` (the in-sandbox agent: process RPCs
and files), ``protocol`` (the sandbox as E2B lists it, errors, envd processes), ``faults`` (E2B's
switches). This one holds the world: templates, plan limits, creates with idempotency keys, leases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import time
from typing import Any, Optional

from aiohttp import web
from metaflow_sandbox import Resources
from metaflow_sandbox.emulation import DEFAULT_KEY
from metaflow_sandbox.emulation.server import EmulatorServer, common_arguments, run

from . import api, envd
from .faults import E2BFaults
from .protocol import ApiError, E2BSandbox
from .templates import TemplateStore

PLAN_MAX_TIMEOUT = {"hobby": 3600, "pro": 86400}
DEFAULT_TIMEOUT = 300
#: Templates named like ours (``...-c4-m8192``) exist with that size, as if built.
_SIZED = re.compile(r"-c(\d+)-m(\d+)$")


class E2BServer(EmulatorServer):
    NAME = "e2b"
    FAULTS = E2BFaults
    faults: E2BFaults

    def __init__(
        self,
        api_key: str = DEFAULT_KEY,
        port: int = 0,
        envd_port: int = 0,
        plan: str = "hobby",
        templates: Optional[dict[str, tuple[int, int]]] = None,
        max_sandboxes: Optional[int] = None,
        login_shell: bool = False,
        bare_base: bool = False,
        faults: Optional[dict[str, Any]] = None,
    ):
        super().__init__(api_key, faults, bare_base=bare_base)
        self.built = TemplateStore(self.images, plan, reserved={"base", *(templates or {})})
        self.ports = (port, envd_port)
        self.plan = plan
        self.templates = {"base": (2, 512), **(templates or {})}
        self.max_sandboxes = max_sandboxes
        self.login_shell = login_shell
        self.idempotent: dict[str, asyncio.Future[E2BSandbox]] = {}
        self.streams: set[Any] = set()  # transports of open command streams (cut by an outage)
        self.builds: set[asyncio.Future[Any]] = set()  # template builds running in the runner's pool

    # ---------------------------------------------------------------- the toolkit's hooks
    def apps(self) -> list[tuple[str, web.Application, int]]:
        return [("api", api.make_app(self), self.ports[0]), ("envd", envd.make_app(self), self.ports[1])]

    def env(self) -> dict[str, str]:
        no_proxy = "127.0.0.1,localhost"
        sdk = {"E2B_API_KEY": self.api_key, "E2B_API_URL": self.urls["api"], "E2B_SANDBOX_URL": self.urls["envd"]}
        return dict(sdk, NO_PROXY=no_proxy, no_proxy=no_proxy)

    def ready_info(self) -> dict[str, Any]:
        return dict(super().ready_info(), url=self.urls["api"], sandbox_url=self.urls["envd"], api_key=self.api_key)

    def faults_changed(self) -> None:
        if self.faults.outage:
            for transport in list(self.streams):
                self.count("stream_dropped")
                transport.abort()

    # ---------------------------------------------------------------- sandboxes
    def max_timeout(self) -> int:
        return PLAN_MAX_TIMEOUT.get(self.plan, PLAN_MAX_TIMEOUT["hobby"])

    def template_size(self, name: str) -> tuple[int, int]:
        if name in self.templates:
            return self.templates[name]
        match = _SIZED.search(name)
        if match and not name.startswith("mfsb-env-"):  # prepared environments exist only once built
            return int(match.group(1)), int(match.group(2))
        raise ApiError(404, "template '%s' not found" % name)

    async def create(self, body: dict[str, Any], idempotency_key: Optional[str]) -> E2BSandbox:
        """A create; a retried one with the same Idempotency-Key gets the first one's sandbox."""
        if not idempotency_key:
            return await self._create(body)
        pending = self.idempotent.get(idempotency_key)
        if pending is not None:
            self.count("create_idempotent_hit")
            return await asyncio.shield(pending)
        fut: asyncio.Future[E2BSandbox] = asyncio.get_running_loop().create_future()
        self.idempotent[idempotency_key] = fut
        try:
            sandbox = await self._create(body)
        except BaseException as exc:
            del self.idempotent[idempotency_key]
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        fut.set_result(sandbox)
        return sandbox

    async def _create(self, body: dict[str, Any]) -> E2BSandbox:
        template = body.get("templateID") or "base"
        built = self.built.spawn(template)
        # A template we built runs from its image. Every template but the stock `base` has its cpu and
        # memory enforced, as E2B sizes a sandbox's VM by its template.
        cpu, memory = (built[1].cpu, built[1].memory_mb) if built else self.template_size(template)
        timeout = int(body.get("timeout") or DEFAULT_TIMEOUT)
        if timeout > self.max_timeout():
            raise ApiError(400, "Timeout cannot be greater than %d hours" % (self.max_timeout() // 3600))
        if self.max_sandboxes is not None and len(self.live()) >= self.max_sandboxes:
            raise ApiError(429, "you have reached the maximum number of concurrent E2B sandboxes (%d)" % self.max_sandboxes)
        envs = {str(k): str(v) for k, v in (body.get("envVars") or {}).items()}
        sid = "i" + secrets.token_hex(10)
        sb = E2BSandbox(
            sid,
            labels={str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
            request=body,
            lease_seconds=timeout,
            template=template,
            cpu=cpu,
            memory_mb=memory,
            env=envs,
            token="tok-" + secrets.token_hex(12),
            allow_internet=body.get("allow_internet_access") is not False,
        )
        try:
            labels = {"e2b-emulator-sandbox": sid}
            image = built[1].image if built else None
            resources = None if template == "base" else self.host_sized(cpu, memory)
            sb.local = await self.runner.create(envs, labels, network=sb.allow_internet, resources=resources, image=image)
            sb.image = image.name if image is not None else None
        except Exception as exc:
            raise ApiError(400, "cannot create sandbox: %s" % exc) from exc
        sb.workdir = sb.local.handle.workdir
        sb.image_path = self.runner.spec({}, {}, image=built[1].image if built else None).env.get("PATH") or _launcher_path()
        self.sandboxes[sid] = sb
        self.count("create")
        return sb

    def host_sized(self, cpu: int, memory_mb: int) -> Resources:
        """A template's size as this host can give it: a 4-vCPU template on a 2-core host gets both cores."""
        host = self.runner.backend.capabilities()
        cpu_cap = float(host.max_cpu) if host.max_cpu else float(cpu)
        mem_cap = int(host.max_memory_mb) if host.max_memory_mb else memory_mb
        return Resources(cpu=min(float(cpu), cpu_cap), memory_mb=min(memory_mb, mem_cap))

    def get(self, sid: str) -> E2BSandbox:
        sb = self.sandboxes.get(sid)
        if sb is None or not sb.alive:
            raise ApiError(404, "sandbox \"%s\" doesn't exist or you don't have access to it" % sid)
        assert isinstance(sb, E2BSandbox)
        return sb

    def set_timeout(self, sid: str, seconds: int, extend_only: bool = False) -> E2BSandbox:
        """The lease from now, never past the plan's maximum from the start; ``extend_only`` never shortens it."""
        sb = self.get(sid)
        scale, now = self.faults.time_scale, time.monotonic()
        end = min(now + max(0, int(seconds)) * scale, sb.started + self.max_timeout() * scale)
        current = sb.expires_at(scale)
        if extend_only and current is not None:
            end = max(end, current)
        sb.lease_start, sb.lease_seconds = now, (end - now) / scale
        return sb


def _launcher_path() -> str:
    """The PATH of a sandbox on no emulated image (the local backend's: this Python's bin dir first)."""
    path = os.environ.get("PATH", os.defpath)
    bindir = os.path.dirname(sys.executable)
    return path if bindir in path.split(os.pathsep) else bindir + os.pathsep + path


def templates_from_args(specs: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for spec in specs:
        name, _, size = spec.partition("=")
        cpu, _, mem = size.partition(":")
        out[name] = (int(cpu), int(mem))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    p = common_arguments(argparse.ArgumentParser(prog="python -m metaflow_sandbox_e2b.emulator", description="Offline E2B emulator."))
    p.add_argument("--envd-port", type=int, default=0, help="envd port (0 = any free port)")
    p.add_argument("--plan", choices=["hobby", "pro"], default="hobby", help="caps sandbox timeouts (1 h / 24 h)")
    p.add_argument("--max-sandboxes", type=int, default=None, help="concurrency limit (429 above it)")
    p.add_argument("--template", action="append", default=[], metavar="NAME=CPU:MEMORY_MB", help="extra template")
    p.add_argument("--login-shell", action="store_true", help="leave PATH as the host's /etc/profile sets it in `bash -l`")
    args = p.parse_args(argv)
    server = E2BServer(
        args.api_key,
        args.port,
        args.envd_port,
        plan=args.plan,
        templates=templates_from_args(args.template),
        max_sandboxes=args.max_sandboxes,
        login_shell=args.login_shell,
        bare_base=args.bare_base,
        faults=json.loads(args.faults),
    )
    run(server, args)
