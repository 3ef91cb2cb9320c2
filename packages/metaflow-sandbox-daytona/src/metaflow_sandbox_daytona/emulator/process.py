"""Daytona's toolbox process API: one-shot execute, sessions (a persistent shell) and their commands' logs.

A session keeps shell state between commands (``cd`` and ``export`` carry over) through a small state
file pair in the work dir; deleting its session or its sandbox cancels its commands through the facade.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
import sys
import uuid
from typing import TYPE_CHECKING, Any, Optional

from aiohttp import web
from metaflow_sandbox import SandboxCancelledError, SandboxError, SandboxTimeoutError

from .protocol import DaytonaSandbox, error, http_error

if TYPE_CHECKING:
    from .server import DaytonaServer

STDOUT = b"\x01\x01\x01"
STDERR = b"\x02\x02\x02"

#: Restores the session's exports and cwd, runs the command, saves both when it exits (persistent shell).
SESSION_SCRIPT = r"""__d={state}; __wd={workdir}
[ -d "${{__d%/*}}" ] || mkdir -p "${{__d%/*}}" || exit 255
if [ -f "$__d.env" ]; then . "$__d.env" 2>/dev/null; fi
if [ -f "$__d.cwd" ]; then read -r __c < "$__d.cwd"; cd "$__c" 2>/dev/null || cd "$__wd"; else cd "$__wd"; fi
trap 'export -p > "$__d.env" 2>/dev/null; pwd > "$__d.cwd" 2>/dev/null' EXIT
eval {command}
"""


class Command:
    """One session command: its marked log (the daemon's wire format) and its exit code."""

    def __init__(self, command: str):
        self.id = str(uuid.uuid4())
        self.command = command
        self.exit_code: Optional[int] = None
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

    def output(self) -> dict[str, str]:
        return {"output": bytes(self.log).decode("utf-8", "replace"), "stdout": "".join(self.stdout), "stderr": "".join(self.stderr)}


@dataclasses.dataclass
class Session:
    id: str
    commands: dict[str, Command] = dataclasses.field(default_factory=dict)


def kill_session(emu: DaytonaServer, sb: DaytonaSandbox, session_id: str) -> None:
    """Forget a session and kill its running commands."""
    session = sb.sessions.pop(session_id, None)
    for cmd in session.commands.values() if session else ():
        if cmd.exit_code is None and sb.local is not None:
            emu.runner.cancel(sb.local, cmd.id)


def routes(emu: DaytonaServer) -> list[web.RouteDef]:
    def session_of(request: web.Request) -> tuple[DaytonaSandbox, Session]:
        sb = emu.find(request)
        session = sb.sessions.get(request.match_info["sid"])
        if session is None:
            raise http_error(404, "session not found", "SESSION_NOT_FOUND", "daemon")
        return sb, session

    def command_of(request: web.Request) -> tuple[DaytonaSandbox, Command]:
        sb, session = session_of(request)
        cmd = session.commands.get(request.match_info["cid"])
        if cmd is None:
            raise http_error(404, "command not found", "COMMAND_NOT_FOUND", "daemon")
        return sb, cmd

    def session_dto(session: Session) -> dict[str, Any]:
        return {"sessionId": session.id, "commands": [c.as_dto() for c in session.commands.values()]}

    async def work_dir(request: web.Request) -> web.Response:
        return web.json_response({"dir": emu.find(request).workdir})

    async def execute(request: web.Request) -> web.Response:
        sb = emu.find(request)
        body = await request.json()
        out: list[str] = []
        assert sb.local is not None
        try:
            result = await emu.runner.blocking(
                sb.local.exec,
                ["bash", "-c", body["command"]],
                env=body.get("envs") or {},
                cwd=sb.resolve(body["cwd"]) if body.get("cwd") else sb.workdir,
                timeout=body.get("timeout") or None,
                on_stdout=out.append,
                on_stderr=out.append,
            )
        except SandboxTimeoutError:
            return error(408, "command execution timeout", "PROCESS_EXECUTION_TIMEOUT", "daemon", request.path)
        except SandboxError as exc:
            return error(500, str(exc), "INTERNAL", "daemon", request.path)
        return web.json_response({"exitCode": int(result.exit_code), "result": "".join(out)})

    async def session_create(request: web.Request) -> web.Response:
        sb = emu.find(request)
        sid = (await request.json())["sessionId"]
        if sid in sb.sessions:
            return error(409, "session %s already exists" % sid, "CONFLICT", "daemon", request.path)
        sb.sessions[sid] = Session(sid)
        return web.Response(status=201)

    async def session_list(request: web.Request) -> web.Response:
        return web.json_response([session_dto(s) for s in emu.find(request).sessions.values()])

    async def session_get(request: web.Request) -> web.Response:
        return web.json_response(session_dto(session_of(request)[1]))

    async def session_delete(request: web.Request) -> web.Response:
        sb, session = session_of(request)
        kill_session(emu, sb, session.id)
        return web.Response(status=204)

    async def session_exec(request: web.Request) -> web.Response:
        sb, session = session_of(request)
        body = await request.json()
        state = sb.state_prefix(session.id)
        cmd = Command(body["command"])
        session.commands[cmd.id] = cmd
        task = asyncio.ensure_future(run(sb, state, cmd))
        emu.vanish_later(sb)
        if body.get("runAsync") or body.get("async"):
            return web.json_response({"cmdId": cmd.id}, status=202)
        await task
        return web.json_response(dict(cmd.output(), cmdId=cmd.id, exitCode=cmd.exit_code))

    async def run(sb: DaytonaSandbox, state: str, cmd: Command) -> None:
        minus_one = emu.faults.take("exit_minus_one_next")
        script = SESSION_SCRIPT.format(state=shlex.quote(state), workdir=shlex.quote(sb.workdir), command=shlex.quote(cmd.command))
        sb.running.add(cmd.id)
        try:
            assert sb.local is not None
            result = await emu.runner.start(sb.local, ["bash", "-c", script], cmd.append, exec_id=cmd.id)
            code = int(result.exit_code)
        except SandboxCancelledError:  # its session or sandbox was deleted: killed, as by SIGKILL
            code = 137
        except Exception as exc:  # the local sandbox vanished under the command
            print("daytona emulator: command %s failed: %s" % (cmd.id, exc), file=sys.stderr)
            code = -1
        finally:
            sb.running.discard(cmd.id)
        await asyncio.sleep(0)  # let queued output callbacks land before the exit code
        cmd.finish(-1 if minus_one else code)

    async def command_get(request: web.Request) -> web.Response:
        return web.json_response(command_of(request)[1].as_dto())

    async def command_logs(request: web.Request) -> web.StreamResponse:
        sb, cmd = command_of(request)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response(cmd.output())
        ws = web.WebSocketResponse(autoping=True, heartbeat=None)
        await ws.prepare(request)
        drop = emu.faults.take("drop_log_stream")
        sent = 0
        while True:
            waiter = cmd.changed
            if sent < len(cmd.log):
                chunk = bytes(cmd.log[sent:])
                sent += len(chunk)
                await ws.send_bytes(chunk)
                if drop:
                    emu.count("stream_dropped")
                    break
            if cmd.exit_code is not None and sent >= len(cmd.log):
                break
            if not sb.alive or emu.faults.outage:
                await ws.close(code=1011, message=b"sandbox is gone" if not sb.alive else b"service unavailable")
                return ws
            try:
                await asyncio.wait_for(waiter.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        await ws.close(code=emu.faults.drop_close_code if drop else 1000)
        return ws

    t = "/toolbox/{id}"
    s = t + "/process/session"
    return [
        web.get(t + "/work-dir", work_dir),
        web.get(t + "/user-home-dir", work_dir),
        web.post(t + "/process/execute", execute),
        web.post(s, session_create),
        web.get(s, session_list),
        web.get(s + "/{sid}", session_get),
        web.delete(s + "/{sid}", session_delete),
        web.post(s + "/{sid}/exec", session_exec),
        web.get(s + "/{sid}/command/{cid}", command_get),
        web.get(s + "/{sid}/command/{cid}/logs", command_logs),
    ]
