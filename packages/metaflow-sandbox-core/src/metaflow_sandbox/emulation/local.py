"""Emulated sandboxes run as sandboxes of the core's ``local`` backend, through the public facade only.

Every blocking call (create, exec, files, destroy) runs in a worker thread, so one slow command never
stalls the emulator's event loop; a command's output reaches the loop through ``call_soon_threadsafe``.
A running command is stopped through the facade (``Sandbox.cancel(exec_id)``, which the local backend
carries out with its ``sandbox_exec_kill`` hook): no kill files, no watcher processes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Sequence

from ..model import ExecResult, SandboxSpec
from ..session import Backend, Sandbox


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
        exec_id: Optional[str] = None,
    ) -> asyncio.Future[ExecResult]:
        """Start a command; ``on_output(kind, text)`` runs on the event loop, kind "stdout" or "stderr".

        ``cancel(local, exec_id)`` stops it: its future then raises ``SandboxCancelledError``.
        """
        loop = asyncio.get_running_loop()

        def emit(kind: str) -> Callable[[str], None]:
            def push(text: str) -> None:
                loop.call_soon_threadsafe(on_output, kind, text)

            return push

        def run() -> ExecResult:
            out, err = emit("stdout"), emit("stderr")
            return local.exec(list(argv), env=dict(env or {}), cwd=cwd, timeout=timeout, on_stdout=out, on_stderr=err, exec_id=exec_id)

        return loop.run_in_executor(self.pool, run)

    @staticmethod
    def cancel(local: Sandbox, exec_id: Optional[str] = None) -> None:
        """Stop the command ``exec_id`` (every running command if None); returns at once, from any thread."""
        local.cancel(exec_id)

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
