"""E2B's wire shapes: the sandbox as the API lists it, timestamps, API errors, envd processes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any, Optional

from metaflow_sandbox.emulation import EmulatedSandbox

ENVD_VERSION = "0.6.7"


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An answer the REST API gives as ``{"code", "message"}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class Proc:
    """One envd process. Its output goes to every attached stream (Start's, and any Process/Connect)."""

    pid: int
    exec_id: str
    killed: bool = False
    done: bool = False
    fut: Any = None  # the local exec's future: its result is the exit code
    listeners: set = dataclasses.field(default_factory=set)  # asyncio.Queue per attached stream

    def publish(self, item: tuple[str, Any]) -> None:
        for queue in list(self.listeners):
            queue.put_nowait(item)


@dataclasses.dataclass(eq=False)
class E2BSandbox(EmulatedSandbox):
    template: str = "base"
    cpu: int = 2
    memory_mb: int = 512
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    token: str = ""
    allow_internet: bool = True
    started: float = dataclasses.field(default_factory=time.monotonic)
    procs: dict[int, Proc] = dataclasses.field(default_factory=dict)
    next_pid: int = 1000
    execs: int = 0
    #: The emulated image (a built template's) it runs from, if any.
    image: Optional[str] = None
    #: The PATH its image's login profile gives (commands run in ``bash -l``).
    image_path: str = "/usr/local/bin:/usr/bin:/bin"

    @property
    def state(self) -> str:
        return "running" if self.alive else str(self.reason)

    def end_at(self, time_scale: float) -> float:
        """The lease's end as wall time (what the API reports)."""
        expires = self.expires_at(time_scale)
        return time.time() + ((expires - time.monotonic()) if expires is not None else 0.0)

    def listed(self, time_scale: float) -> dict[str, Any]:
        return {
            "templateID": self.template,
            "alias": self.template,
            "sandboxID": self.id,
            "clientID": "emulator",
            "startedAt": iso(self.created),
            "endAt": iso(self.end_at(time_scale)),
            "cpuCount": self.cpu,
            "memoryMB": self.memory_mb,
            "diskSizeMB": 10240,
            "metadata": dict(self.labels),
            "state": "running",
            "envdVersion": ENVD_VERSION,
        }

    def created_answer(self) -> dict[str, Any]:
        return {
            "templateID": self.template,
            "sandboxID": self.id,
            "clientID": "emulator",
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": self.token,
            "domain": None,
            "alias": self.template,
        }

    def view(self, time_scale: float) -> dict[str, Any]:
        view = super().view(time_scale)
        view.update(state=self.state, template=self.template, cpu=self.cpu, memory_mb=self.memory_mb, execs=self.execs, image=self.image)
        return view

    def map_path(self, path: Optional[str]) -> str:
        """E2B path -> path in the local sandbox: /home/user (and relative paths) live in its workdir."""
        if not path or path in ("~", ".", "/home/user"):
            return self.workdir
        if path.startswith("~/"):
            path = path[2:]
        if path.startswith("/home/user/"):
            return self.workdir.rstrip("/") + "/" + path[len("/home/user/") :]
        if not path.startswith("/"):
            return self.workdir.rstrip("/") + "/" + path
        return path
