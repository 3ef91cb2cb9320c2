"""Emulated sandboxes backed by sandboxes of the core's ``local`` backend (public facade only).

Blocking work (local create/exec/files/destroy) runs in worker threads; output reaches the asyncio
side through ``loop.call_soon_threadsafe``. Sessions keep persistent-shell semantics (``cd`` and
``export`` carry over between commands) through a small state directory in the work dir, and a
session delete kills its running commands through a flag file the command's watcher polls.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from metaflow_sandbox import Backend, SandboxSpec

STDOUT = b"\x01\x01\x01"
STDERR = b"\x02\x02\x02"
STATE_DIR = ".daytona-emu"

# One session command, with as few process spawns as possible (they dominate its cost):
# - restore the session's exports and cwd, run the command, save both on exit (persistent shell);
# - run it as a job in its own process group (set -m) so a kill reaches all its children;
# - a watcher kills that group when the session's kill flag appears (session delete / sandbox gone).
# Job-control notices go to the supervisor's stderr, which is /dev/null (the job gets the real one as fd 3).
WRAPPER = r"""
d="$1"; cmd="$2"; wd="$3"
[ -d "${d%/*}" ] || mkdir -p "${d%/*}" || exit 255
exec 3>&2 2>/dev/null
set -m
{
  if [ -f "$d.env" ]; then . "$d.env" 2>/dev/null; fi
  if [ -f "$d.cwd" ]; then read -r c < "$d.cwd"; cd "$c" 2>/dev/null || cd "$wd"; else cd "$wd"; fi
  trap 'export -p > "$d.env" 2>/dev/null; pwd > "$d.cwd" 2>/dev/null' EXIT
  eval "$cmd"
} 2>&3 3>&- &
pid=$!
exec 3>&-
{ while [ ! -e "$d.kill" ]; do sleep 0.1; done; kill -KILL -- "-$pid"; } </dev/null >/dev/null &
w=$!
wait "$pid"; rc=$?
kill "$w"
exit $rc
"""


class Command:
    """One session command: its marked log (the daemon's wire format) and its exit code."""

    def __init__(self, command: str):
        self.id = str(uuid.uuid4())
        self.command = command
        self.exit_code: int | None = None
        self.log = bytearray()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.changed = asyncio.Event()

    def append(self, kind: str, text: str) -> None:
        (self.stdout if kind == "stdout" else self.stderr).append(text)
        self.log += (STDOUT if kind == "stdout" else STDERR) + text.encode("utf-8")
        self._wake()

    def finish(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def as_dto(self) -> dict[str, Any]:
        return {"id": self.id, "command": self.command, "exitCode": self.exit_code}


@dataclass
class Session:
    id: str
    commands: dict[str, Command] = field(default_factory=dict)


@dataclass
class EmuSandbox:
    id: str
    dto: dict[str, Any]
    request: dict[str, Any]
    local: Any
    workdir: str
    created: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    stopped_at: float | None = None
    polls_until_started: int = 0
    sessions: dict[str, Session] = field(default_factory=dict)
    running: set = field(default_factory=set)

    @property
    def state(self) -> str:
        return str(self.dto["state"])

    def resolve(self, path: str) -> str:
        """Daytona resolves relative paths against the work dir."""
        return path if path.startswith("/") else posixpath.join(self.workdir, path)

    def state_prefix(self, session: str) -> str:
        """Session state lives in <prefix>.env / .cwd / .kill (one directory per sandbox: no mkdir per session)."""
        return posixpath.join(self.workdir, STATE_DIR, session)


class Engine:
    """Blocking operations on local sandboxes; called from worker threads."""

    def __init__(self) -> None:
        self.local = Backend("local")
        self._network_toggle = self.local.capabilities().network_toggle

    def create_local(self, env: dict[str, str], labels: dict[str, str], block_network: bool) -> Any:
        network = not (block_network and self._network_toggle)
        return self.local.create(SandboxSpec(env=env, labels=labels, network=network))

    def run_session_command(self, sb: EmuSandbox, session: str, cmd: Command, emit: Callable[[str, str], None]) -> int:
        argv = ["bash", "-c", WRAPPER, "daytona-session", sb.state_prefix(session), cmd.command, sb.workdir]
        result = sb.local.exec(argv, on_stdout=lambda t: emit("stdout", t), on_stderr=lambda t: emit("stderr", t))
        return int(result.exit_code)

    def kill_session(self, sb: EmuSandbox, session: str) -> None:
        try:
            sb.local.write_file(sb.state_prefix(session) + ".kill", content=b"")
        except Exception:  # the sandbox may already be gone
            pass

    def execute(self, sb: EmuSandbox, command: str, cwd: str | None, envs: dict[str, str], timeout: float | None) -> tuple[int, str]:
        out: list[str] = []
        result = sb.local.exec(
            ["bash", "-c", command],
            env=envs,
            cwd=sb.resolve(cwd) if cwd else sb.workdir,
            timeout=timeout,
            on_stdout=out.append,
            on_stderr=out.append,
        )
        return int(result.exit_code), "".join(out)

    def destroy(self, sb: EmuSandbox) -> None:
        try:
            sb.local.destroy()
        except Exception:
            pass


def spool_path(tmpdir: str) -> str:
    return os.path.join(tmpdir, uuid.uuid4().hex)
