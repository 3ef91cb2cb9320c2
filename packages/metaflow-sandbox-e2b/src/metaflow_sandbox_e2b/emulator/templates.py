"""E2B templates the emulator builds: ``POST /v3/templates``, the build trigger, status with logs, list, delete.

A build really runs: the definition's ``pip install`` steps go to the toolkit's ``ImageStore`` (a real
pip install into a directory), and a sandbox created from the template runs with that directory and
the template's cpu and memory enforced by the ``local`` backend. A build's states are E2B's
(``waiting`` until triggered, ``building``, ``ready`` or ``error`` with a reason and the log). Like
E2B, building under a name the team already has makes a new build of the same template; sandboxes
start from its newest ready build. Steps other than ``pip install`` (COPY, apt, ...) fail the build
with a message saying the emulator cannot run them.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import shlex
import sys
import time
import uuid
from typing import Any, Optional

from metaflow_sandbox.emulation.images import ACTIVE, Image, ImageStore

from .protocol import ENVD_VERSION, ApiError, iso

#: E2B template names: lowercase letters, digits, dashes, underscores and dots (a ``:tag`` is split off).
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_PIP = re.compile(r"^(?:pip3?(?:\.\d+)?|python3?(?:\.\d+)? -m pip) install$")
#: Per-plan template sizes E2B accepts (the plan's sandbox maximums).
PLAN_SIZE = {"hobby": (8, 8192), "pro": (8, 16384)}


@dataclasses.dataclass(eq=False)
class Build:
    build_id: str
    cpu: int
    memory_mb: int
    status: str = "waiting"
    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    reason: Optional[dict[str, Any]] = None
    image: Optional[Image] = None
    requirements: tuple[str, ...] = ()
    created: float = dataclasses.field(default_factory=time.time)

    def say(self, message: str, level: str = "info") -> None:
        self.entries.append({"timestamp": iso(time.time()), "level": level, "message": message})


@dataclasses.dataclass(eq=False)
class Template:
    template_id: str
    name: str
    builds: list[Build] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    last_spawned: Optional[float] = None
    spawns: int = 0

    def ready(self) -> Optional[Build]:
        """The newest ready build: what sandboxes start from."""
        return next((b for b in reversed(self.builds) if b.status == "ready"), None)

    def listed(self) -> dict[str, Any]:
        latest = self.builds[-1]
        shown = self.ready() or latest
        size = shown.image.size_bytes if shown.image is not None else 0
        return {
            "templateID": self.template_id,
            "buildID": latest.build_id,
            "cpuCount": shown.cpu,
            "memoryMB": shown.memory_mb,
            "diskSizeMB": max(1, size // (1024 * 1024)) if size else 0,
            "public": False,
            "aliases": [self.name],
            "names": [self.name],
            "createdAt": iso(self.created),
            "updatedAt": iso(self.updated),
            "createdBy": None,
            "lastSpawnedAt": iso(self.last_spawned) if self.last_spawned else None,
            "spawnCount": self.spawns,
            "buildCount": len(self.builds),
            "envdVersion": ENVD_VERSION,
            "buildStatus": latest.status,
        }


class TemplateStore:
    """The team's built templates, by id and by name, over the toolkit's image store."""

    def __init__(self, images: ImageStore, plan: str, reserved: set[str]):
        self.images = images
        self.plan = plan
        self.reserved = reserved  # stock template names (base, ...): not the team's to build
        self.templates: dict[str, Template] = {}

    def find(self, id_or_name: str) -> Optional[Template]:
        name = id_or_name.split(":", 1)[0]
        return self.templates.get(name) or next((t for t in self.templates.values() if t.name == name), None)

    def get(self, id_or_name: str) -> Template:
        t = self.find(id_or_name)
        if t is None:
            raise ApiError(404, "template '%s' not found" % id_or_name)
        return t

    def build_of(self, template_id: str, build_id: str) -> Build:
        t = self.get(template_id)
        build = next((b for b in t.builds if b.build_id == build_id), None)
        if build is None:
            raise ApiError(404, "build '%s' of template '%s' not found" % (build_id, template_id))
        return build

    # ------------------------------------------------------------------ POST /v3/templates
    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        name = str(body.get("name") or body.get("alias") or "").split(":", 1)[0]
        if not _NAME.match(name):
            raise ApiError(400, "invalid template name '%s': use lowercase letters, digits, '-', '_' and '.'" % name)
        if name in self.reserved:
            raise ApiError(409, "Alias '%s' is already used" % name)
        max_cpu, max_mem = PLAN_SIZE.get(self.plan, PLAN_SIZE["hobby"])
        cpu, memory = int(body.get("cpuCount") or 2), int(body.get("memoryMB") or 512)
        if not 1 <= cpu <= max_cpu:
            raise ApiError(400, "CPU count must be between 1 and %d on your plan, got %d" % (max_cpu, cpu))
        if not 128 <= memory <= max_mem or memory % 2:
            raise ApiError(400, "memory must be an even number of MB between 128 and %d on your plan, got %d" % (max_mem, memory))
        t = self.find(name)
        if t is None:
            t = Template(template_id=secrets.token_hex(10), name=name)
            self.templates[t.template_id] = t
        build = Build(build_id=str(uuid.uuid4()), cpu=cpu, memory_mb=memory)
        t.builds.append(build)
        t.updated = time.time()
        tags = list(body.get("tags") or []) or ["default"]
        return {"templateID": t.template_id, "buildID": build.build_id, "public": False, "names": [name], "tags": tags, "aliases": [name]}

    # ------------------------------------------------------------------ POST /v2/templates/{id}/builds/{build}
    def start(self, template_id: str, build_id: str, body: dict[str, Any]) -> Build:
        """Check the definition and mark the build started; ``run`` (blocking) does the work."""
        build = self.build_of(template_id, build_id)
        if build.status != "waiting":
            raise ApiError(400, "build '%s' was already started (status %s)" % (build_id, build.status))
        build.status = "building"
        build.say("Building template %s/%s" % (template_id, build_id))
        return build

    def run(self, template_id: str, build: Build, body: dict[str, Any]) -> None:
        """Blocking: resolve the base and steps, pip-install into a new image, end ready or error."""
        t = self.get(template_id)
        try:
            base, requirements = self._plan(body, build)
        except ApiError as exc:
            self._fail(build, exc.message, step="base")
            return
        build.requirements = tuple(dict.fromkeys(base + requirements))
        image = self.images.add("%s-%s" % (t.template_id, build.build_id[:8]), build.requirements)
        build.image = image
        self.images.build(image, on_log=build.say)
        if image.state != ACTIVE:
            self._fail(build, "failed to run command 'pip install %s': %s" % (" ".join(requirements), _last(image)), step="1")
            self.images.remove(image.name)
            build.image = None
            return
        build.say("Template %s built (%d bytes)" % (t.name, image.size_bytes))
        build.status = "ready"
        t.updated = time.time()

    def _plan(self, body: dict[str, Any], build: Build) -> tuple[list[str], list[str]]:
        """(requirements inherited from the base, requirements the steps add)."""
        base: list[str] = []
        if body.get("fromTemplate"):
            parent = self.find(str(body["fromTemplate"]))
            ready = parent.ready() if parent is not None else None
            if parent is not None and ready is None:
                raise ApiError(400, "base template '%s' has no ready build" % body["fromTemplate"])
            base = list(ready.requirements) if ready is not None else []
            build.say("FROM TEMPLATE %s" % body["fromTemplate"])
        else:
            image = str(body.get("fromImage") or "e2bdev/base")
            match = re.match(r"^(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)", image)
            here = "%d.%d" % sys.version_info[:2]
            if match and "%s.%s" % match.groups() != here:
                raise ApiError(400, "the emulator has only Python %s; image %s asks for Python %s.%s" % ((here, image) + match.groups()))
            build.say("FROM %s (emulated by the emulator's base Python %s)" % (image, here))
        added: list[str] = []
        for i, step in enumerate(body.get("steps") or [], 1):
            kind, args = str(step.get("type")), list(step.get("args") or [])
            if kind != "RUN" or not args:
                raise ApiError(400, "step %d: the emulator cannot run %s steps (only RUN pip install ...)" % (i, kind))
            words = shlex.split(args[0])
            head = next((n for n in range(1, len(words) + 1) if _PIP.match(" ".join(words[:n]))), None)
            packages = words[head:] if head else []
            if head is None or not packages or any(p.startswith("-") for p in packages):
                raise ApiError(400, "step %d: the emulator runs only 'pip install PACKAGE...' commands, not %r" % (i, args[0]))
            build.say("RUN %s" % args[0])
            added += packages
        return base, added

    @staticmethod
    def _fail(build: Build, message: str, step: str) -> None:
        build.say(message, level="error")
        build.reason = {"message": message, "step": step, "logEntries": build.entries[-20:]}
        build.status = "error"

    def status(self, template_id: str, build_id: str, offset: int, limit: int) -> dict[str, Any]:
        build = self.build_of(template_id, build_id)
        entries = build.entries[offset : offset + limit]
        out: dict[str, Any] = {
            "templateID": template_id,
            "buildID": build_id,
            "status": build.status,
            "logs": [e["message"] for e in entries],
            "logEntries": entries,
        }
        if build.reason is not None:
            out["reason"] = build.reason
        return out

    def delete(self, id_or_name: str, in_use: set[str]) -> None:
        """Forget the template; its images go now unless a live sandbox runs from them (then at shutdown)."""
        t = self.get(id_or_name)
        del self.templates[t.template_id]
        for b in t.builds:
            if b.image is not None and b.image.name not in in_use:
                self.images.remove(b.image.name)

    def spawn(self, id_or_name: str) -> Optional[tuple[Template, Build]]:
        """The template and ready build a sandbox starts from; None if it is not one we built."""
        t = self.find(id_or_name)
        if t is None:
            return None
        build = t.ready()
        if build is None:
            raise ApiError(400, "template '%s' has no ready build (latest build: %s)" % (id_or_name, t.builds[-1].status))
        t.spawns += 1
        t.last_spawned = time.time()
        return t, build


def _last(image: Image) -> str:
    """pip's own last error line (``ERROR: ...``), else the image's error."""
    errors = [line for line in image.log if line.startswith("ERROR")]
    return errors[-1] if errors else (image.error or "pip failed").splitlines()[0]
