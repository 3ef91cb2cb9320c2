"""Emulated sandboxes run as sandboxes of the core's ``local`` backend, through the public facade only.

Every blocking call (create, exec, files, destroy) runs in a worker thread, so one slow command never
stalls the emulator's event loop; a command's output reaches the loop through ``call_soon_threadsafe``.
A running command is killed through a kill file its watcher polls (the facade has no kill operation):
:func:`killable` wraps the command, :meth:`LocalRunner.kill` writes the file.
"""

from __future__ import annotations

import asyncio
import shlex
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Sequence

from ..model import ExecResult, SandboxSpec
from ..session import Backend, Sandbox

#: Kills the whole command tree when the kill file appears (a kill request) or the sandbox's work dir
#: vanishes (the sandbox was destroyed). Folded into ``bash -c SCRIPT`` when it can be (one process less):
#: the local backend starts every command as a process-group leader, so ``kill -9 -$$`` reaches it all.
_WATCHER = r"""( k=
  while kill -0 $$ 2>/dev/null; do
    if [ -z "$k" ] && {{ [ -e {kf} ] || [ ! -d {w} ]; }}; then k=1; rm -f {kf}; fi
    if [ -n "$k" ]; then kill -9 -$$ 2>/dev/null || kill -9 $$ 2>/dev/null; fi
    sleep 0.2
  done ) >/dev/null 2>&1 </dev/null &
"""

#: The same for any other argv: $0 = kill file, $1 = work dir, then the command in its own session.
_WRAPPER = r"""w=$1; shift
setsid "$@" &
c=$!
( k=
  while kill -0 "$c" 2>/dev/null; do
    if [ -z "$k" ] && { [ -e "$0" ] || [ ! -d "$w" ]; }; then k=1; rm -f "$0"; fi
    # before setsid() has run in the child its group does not exist yet: then kill the pid itself
    if [ -n "$k" ]; then kill -9 -"$c" 2>/dev/null || kill -9 "$c" 2>/dev/null; fi
    sleep 0.2
  done ) >/dev/null 2>&1 </dev/null &
wait "$c" 2>/dev/null
"""


def killable(argv: Sequence[str], kill_file: str, workdir: str) -> list[str]:
    """``argv`` run so that :meth:`LocalRunner.kill` (or the sandbox's end) kills the whole command tree."""
    argv = list(argv)
    if len(argv) == 3 and argv[0] in ("/bin/bash", "bash") and argv[1] == "-c":
        return [argv[0], "-c", _WATCHER.format(kf=shlex.quote(kill_file), w=shlex.quote(workdir)) + argv[2]]
    return ["sh", "-c", _WRAPPER, kill_file, workdir] + argv


class LocalRunner:
    """Creates, runs commands in and destroys ``local`` sandboxes from the event loop."""

    def __init__(self, workers: int = 64, name: str = "emulator"):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._backend: Optional[Backend] = None
        self.teardowns: set[asyncio.Future[Any]] = set()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = Backend("local", retries=0)
        return self._backend

    async def blocking(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kw))

    async def create(self, env: Mapping[str, str], labels: Mapping[str, str], network: bool = True) -> Sandbox:
        """A fresh local sandbox; ``network=False`` is honoured only where the local backend can cut it."""
        if not network and not self.backend.capabilities().network_toggle:
            network = True
        return await self.blocking(self.backend.create, SandboxSpec(env=dict(env), labels=dict(labels), network=network))

    def start(
        self,
        local: Sandbox,
        argv: Sequence[str],
        on_output: Callable[[str, str], None],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> asyncio.Future[ExecResult]:
        """Start a command; ``on_output(kind, text)`` runs on the event loop, kind "stdout" or "stderr"."""
        loop = asyncio.get_running_loop()

        def emit(kind: str) -> Callable[[str], None]:
            return lambda text: loop.call_soon_threadsafe(on_output, kind, text)

        def run() -> ExecResult:
            return local.exec(list(argv), env=dict(env or {}), cwd=cwd, timeout=timeout, on_stdout=emit("stdout"), on_stderr=emit("stderr"))

        return loop.run_in_executor(self.pool, run)

    async def kill(self, local: Sandbox, kill_file: str) -> None:
        """Kill a command started through :func:`killable` with this kill file (quietly: it may be gone)."""
        try:
            await self.blocking(local.write_file, kill_file, b"")
        except Exception:
            pass

    def destroy_later(self, local: Optional[Sandbox], after: Optional[Callable[[], Any]] = None) -> None:
        """Destroy in the background (the API answers at once, as providers do); ``after`` awaits first."""

        async def teardown() -> None:
            if after is not None:
                await after()
            if local is not None:
                try:
                    await self.blocking(local.destroy)
                except Exception:  # the local sandbox may already be gone; the emulated one is dead either way
                    pass

        task = asyncio.ensure_future(teardown())
        self.teardowns.add(task)
        task.add_done_callback(self.teardowns.discard)

    async def shutdown(self, timeout: float = 30) -> None:
        if self.teardowns:
            await asyncio.wait(list(self.teardowns), timeout=timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
