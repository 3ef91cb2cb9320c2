"""Emulated sandboxes run as sandboxes of the core's ``local`` backend, through the public facade only.

Every blocking call (create, exec, files, destroy) runs in a worker thread, so one slow command never
stalls the emulator's event loop; a command's output reaches the loop through ``call_soon_threadsafe``.
A running command is stopped through the facade (``Sandbox.cancel(exec_id)``, which the local backend
carries out with its ``sandbox_exec_kill`` hook): no kill files, no watcher processes.

The local backend enforces what a provider enforces: the sandbox's cpu and memory (``resources``), a
private home (the launcher's home is hidden), and, with a :class:`~.images.BareBase`, a base image
holding only a stdlib Python; an :class:`~.images.Image` (a prepared environment) is bound read-only.
"""

from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Sequence

from ..model import Bind, ExecResult, Resources, SandboxSpec
from ..session import Backend, Sandbox
from .images import ACTIVE, BareBase, Image


class LocalRunner:
    """Creates, runs commands in and destroys ``local`` sandboxes from the event loop."""

    def __init__(self, workers: int = 64, name: str = "emulator", base: Optional[BareBase] = None):
        #: None: sandboxes run the launcher's Python and PATH (the default); else the bare base.
        self.base = base
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

    async def create(
        self,
        env: Mapping[str, str],
        labels: Mapping[str, str],
        network: bool = True,
        resources: Optional[Resources] = None,
        image: Optional[Image] = None,
    ) -> Sandbox:
        """A fresh local sandbox; ``network=False`` is honoured only where the local backend can cut it.

        ``resources`` (cpu, memory_mb) are enforced by the local backend; ``image`` (an active image)
        is bound read-only, its packages on PYTHONPATH and its scripts first on PATH. ``env`` wins.
        """
        if not network and not self.backend.capabilities().network_toggle:
            network = True
        return await self.blocking(self.backend.create, self.spec(env, labels, network, resources, image))

    def spec(
        self,
        env: Mapping[str, str],
        labels: Mapping[str, str],
        network: bool = True,
        resources: Optional[Resources] = None,
        image: Optional[Image] = None,
    ) -> SandboxSpec:
        """The local sandbox an emulated one runs as (see ``create``)."""
        base_env: dict[str, str] = {}
        binds: list[Bind] = []
        path = _launcher_path()
        if self.base is not None:
            base_env.update(self.base.env())
            path = self.base.path
            binds += [Bind(self.base.venv, read_only=True), Bind(self.base.attempts_dir)]
        if image is not None:
            if image.state != ACTIVE:
                raise ValueError("image %s is %s, not active" % (image.name, image.state))
            base_env.update(image.env(path))
            binds.append(Bind(image.path, read_only=True))
        merged = dict(base_env, **dict(env))
        return SandboxSpec(env=merged, labels=dict(labels), network=network, resources=resources or Resources(), binds=tuple(binds))

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


def _launcher_path() -> str:
    """The PATH a default-mode sandbox has (the local backend's: this Python's bin dir first)."""
    path = os.environ.get("PATH", os.defpath)
    bindir = os.path.dirname(sys.executable)
    return path if not bindir or bindir in path.split(os.pathsep) else bindir + os.pathsep + path
