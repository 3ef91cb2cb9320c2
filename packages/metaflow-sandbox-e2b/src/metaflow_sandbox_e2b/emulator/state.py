"""The emulator's world: templates, sandboxes (each backed by one `local` sandbox), faults.

Everything here runs on the emulator's event loop; blocking calls into the local backend go
through ``run_blocking`` (a thread pool), so one slow command never stalls the HTTP servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from metaflow_sandbox import Backend, SandboxSpec

PLAN_MAX_TIMEOUT = {"hobby": 3600, "pro": 86400}
DEFAULT_TIMEOUT = 300
ENVD_VERSION = "0.6.7"
#: Templates named like ours (``...-c4-m8192``) exist with that size, as if built.
_SIZED = re.compile(r"-c(\d+)-m(\d+)$")


@dataclasses.dataclass
class Faults:
    """Fault injection switches; all off by default. One seeded RNG drives every random choice.

    ``error_rate``/``error_next`` hit the REST API only, unless ``error_scope="all"``: then every
    REST and envd request except ``Process/Start`` (starting the command is never faulted, so a
    test can count exactly how often user code ran).
    """

    latency: float = 0.0  # seconds added to every REST and envd request
    error_rate: float = 0.0  # share of requests answered with one of error_statuses
    error_next: int = 0  # answer the next N requests with an error (deterministic)
    error_statuses: tuple[int, ...] = (429, 503)
    error_scope: str = "api"  # "api": REST only; "all": REST and envd (never Process/Start)
    error_after_create: bool = False  # an injected error on create hits AFTER the sandbox was made
    retry_after: int | None = None  # Retry-After header value on injected errors
    seed: int = 0
    drop_stream_after: float | None = None  # abort Process/Start connections after N seconds
    drop_streams: int | None = None  # ... but only the first N streams (None: every stream)
    #: Real seconds per emulated second for sandbox timeouts (0.05: a 60 s timeout ends after 3 s).
    time_scale: float = 1.0
    #: The provider vanishes: open command streams are cut and every request (Process/Start too)
    #: answers 503, until faults are set again. Sandboxes keep running and expiring meanwhile.
    outage: bool = False
    vanish_after: float | None = None  # the sandbox running a command dies N seconds after it starts
    keepalive_every: float | None = None  # overrides the client's keepalive-ping-interval (seconds)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Faults:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError("unknown fault(s) %s; known: %s" % (unknown, sorted(known)))
        values = dict(values)
        if "error_statuses" in values:
            values["error_statuses"] = tuple(int(s) for s in values["error_statuses"])
        faults = cls(**values)
        if faults.error_scope not in ("api", "all"):
            raise ValueError("error_scope must be 'api' or 'all', not %r" % faults.error_scope)
        if not faults.time_scale > 0:
            raise ValueError("time_scale must be > 0, not %r" % faults.time_scale)
        return faults


@dataclasses.dataclass
class Proc:
    """One envd process. Its output goes to every attached stream (Start's, and any Process/Connect)."""

    pid: int
    kill_file: str
    killed: bool = False
    done: bool = False
    fut: Any = None  # the local exec's future: its result is the exit code
    listeners: set = dataclasses.field(default_factory=set)  # asyncio.Queue per attached stream

    def publish(self, item: tuple[str, Any]) -> None:
        for queue in list(self.listeners):
            queue.put_nowait(item)


@dataclasses.dataclass
class EmuSandbox:
    sandbox_id: str
    template: str
    cpu: int
    memory_mb: int
    metadata: dict[str, str]
    env: dict[str, str]
    token: str
    started_at: float
    end_at: float
    allow_internet: bool
    local: Any = None  # metaflow_sandbox.Sandbox of the `local` backend
    workdir: str = "/home/user"
    state: str = "running"  # running | killed | expired | vanished
    procs: dict[int, Proc] = dataclasses.field(default_factory=dict)
    next_pid: int = 1000
    execs: int = 0

    @property
    def alive(self) -> bool:
        return self.state == "running"

    def listed(self) -> dict[str, Any]:
        return {
            "templateID": self.template,
            "alias": self.template,
            "sandboxID": self.sandbox_id,
            "clientID": "emulator",
            "startedAt": iso(self.started_at),
            "endAt": iso(self.end_at),
            "cpuCount": self.cpu,
            "memoryMB": self.memory_mb,
            "diskSizeMB": 10240,
            "metadata": dict(self.metadata),
            "state": "running",
            "envdVersion": ENVD_VERSION,
        }

    def created(self) -> dict[str, Any]:
        return {
            "templateID": self.template,
            "sandboxID": self.sandbox_id,
            "clientID": "emulator",
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": self.token,
            "domain": None,
            "alias": self.template,
        }


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class World:
    """All emulated state. ``api_key`` is the only accepted X-API-KEY."""

    def __init__(
        self,
        api_key: str = "emulator-key",
        plan: str = "hobby",
        templates: dict[str, tuple[int, int]] | None = None,
        max_sandboxes: int | None = None,
        faults: Faults | None = None,
        login_shell: bool = False,
    ):
        self.api_key = api_key
        self.plan = plan
        self.templates = {"base": (2, 512)}
        self.templates.update(templates or {})
        self.max_sandboxes = max_sandboxes
        self.login_shell = login_shell
        self.sandboxes: dict[str, EmuSandbox] = {}
        self.idempotent: dict[str, asyncio.Future] = {}
        self.stats: dict[str, int] = {}
        self.teardowns: set[asyncio.Future] = set()
        self.streams: set[Any] = set()  # transports of open command streams (cut by an outage)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="e2b-emu")
        self._local: Backend | None = None
        self.set_faults(faults or Faults())

    # -- plumbing ---------------------------------------------------------------------------
    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.streams_dropped = 0
        if faults.outage:
            for transport in list(getattr(self, "streams", ())):
                self.count("stream_dropped")
                transport.abort()

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    async def run_blocking(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kw))

    @property
    def local(self) -> Backend:
        if self._local is None:
            self._local = Backend("local", retries=0)
        return self._local

    def injected_error(self, envd: bool = False) -> int | None:
        f = self.faults
        if f.outage:
            return 503
        if envd and f.error_scope != "all":
            return None
        if f.error_next > 0:
            f.error_next -= 1
            return f.error_statuses[0]
        if f.error_rate and self.rng.random() < f.error_rate:
            return self.rng.choice(f.error_statuses)
        return None

    # -- templates --------------------------------------------------------------------------
    def template_size(self, name: str) -> tuple[int, int]:
        if name in self.templates:
            return self.templates[name]
        match = _SIZED.search(name)
        if match:
            return int(match.group(1)), int(match.group(2))
        raise ApiError(404, "template '%s' not found" % name)

    # -- lifecycle --------------------------------------------------------------------------
    def max_timeout(self) -> int:
        return PLAN_MAX_TIMEOUT.get(self.plan, PLAN_MAX_TIMEOUT["hobby"])

    async def create(self, body: dict[str, Any], idempotency_key: str | None) -> EmuSandbox:
        if idempotency_key:
            pending = self.idempotent.get(idempotency_key)
            if pending is not None:
                self.count("create_idempotent_hit")
                return await asyncio.shield(pending)
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
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
        return await self._create(body)

    async def _create(self, body: dict[str, Any]) -> EmuSandbox:
        template = body.get("templateID") or "base"
        cpu, memory = self.template_size(template)
        timeout = int(body.get("timeout") or DEFAULT_TIMEOUT)
        if timeout > self.max_timeout():
            raise ApiError(400, "Timeout cannot be greater than %d hours" % (self.max_timeout() // 3600))
        if self.max_sandboxes is not None and len(self.live()) >= self.max_sandboxes:
            raise ApiError(429, "you have reached the maximum number of concurrent E2B sandboxes (%d)" % self.max_sandboxes)
        allow = body.get("allow_internet_access")
        envs = {str(k): str(v) for k, v in (body.get("envVars") or {}).items()}
        sid = "i" + secrets.token_hex(10)
        now = time.time()
        sb = EmuSandbox(
            sandbox_id=sid,
            template=template,
            cpu=cpu,
            memory_mb=memory,
            metadata={str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
            env=envs,
            token="tok-" + secrets.token_hex(12),
            started_at=now,
            end_at=now + timeout * self.faults.time_scale,
            allow_internet=allow is not False,
        )
        spec = SandboxSpec(env=envs, labels={"e2b-emulator-sandbox": sid}, network=sb.allow_internet)
        try:
            sb.local = await self.run_blocking(self.local.create, spec)
        except Exception as exc:
            raise ApiError(400, "cannot create sandbox: %s" % exc) from exc
        sb.workdir = sb.local.handle.workdir
        self.sandboxes[sid] = sb
        self.count("create")
        return sb

    def live(self) -> list[EmuSandbox]:
        return [sb for sb in self.sandboxes.values() if sb.alive]

    def get(self, sid: str) -> EmuSandbox:
        sb = self.sandboxes.get(sid)
        if sb is None or not sb.alive:
            raise ApiError(404, "sandbox \"%s\" doesn't exist or you don't have access to it" % sid)
        return sb

    async def kill(self, sid: str, reason: str = "killed") -> bool:
        sb = self.sandboxes.get(sid)
        if sb is None or not sb.alive:
            return False
        sb.state = reason  # killed | expired | vanished: from now on envd answers 502 "... was not found"
        self.count(reason)
        task = asyncio.ensure_future(self._destroy_local(sb))  # answer now; the local teardown follows
        self.teardowns.add(task)
        task.add_done_callback(self.teardowns.discard)
        return True

    async def _destroy_local(self, sb: EmuSandbox) -> None:
        try:
            await self.run_blocking(sb.local.destroy)
        except Exception:  # the local sandbox may already be gone; the emulated one is dead either way
            pass

    def set_timeout(self, sid: str, seconds: int, extend_only: bool = False) -> EmuSandbox:
        sb = self.get(sid)
        scale = self.faults.time_scale
        end = time.time() + max(0, int(seconds)) * scale
        end = min(end, sb.started_at + self.max_timeout() * scale)
        sb.end_at = max(sb.end_at, end) if extend_only else end
        return sb

    async def reap_expired(self) -> None:
        now = time.time()
        for sb in list(self.sandboxes.values()):
            if sb.alive and sb.end_at <= now:
                await self.kill(sb.sandbox_id, reason="expired")

    async def shutdown(self) -> None:
        for sb in self.live():
            await self.kill(sb.sandbox_id)
        if self.teardowns:
            await asyncio.wait(list(self.teardowns), timeout=30)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- paths ------------------------------------------------------------------------------
    @staticmethod
    def map_path(sb: EmuSandbox, path: str | None) -> str:
        """E2B path -> path in the local sandbox: /home/user (and relative paths) live in its workdir."""
        if not path or path in ("~", ".", "/home/user"):
            return sb.workdir
        if path.startswith("~/"):
            path = path[2:]
        if path.startswith("/home/user/"):
            return sb.workdir.rstrip("/") + "/" + path[len("/home/user/") :]
        if not path.startswith("/"):
            return sb.workdir.rstrip("/") + "/" + path
        return path
