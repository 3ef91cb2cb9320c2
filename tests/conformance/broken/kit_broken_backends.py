"""Backends for test_kit_catches_bugs: a correct one built on the acme example, and variants that each
break exactly one rule of the contract. Registered as entry points of a fabricated distribution."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
from typing import Any, Mapping

from metaflow_sandbox import (
    BackendNotConfiguredError,
    Capabilities,
    ExecResult,
    SandboxError,
    SandboxHandle,
    SandboxTimeoutError,
    UploadItem,
    hookimpl,
)
from metaflow_sandbox.backends import local
from metaflow_sandbox_acme import plugin as acme

KEY = "KITGOOD_API_KEY"


class Good:
    """Correct: delegates to acme, under its own entry-point name, and needs KITGOOD_API_KEY."""

    def __init__(self, name: str):
        self.name = name

    @hookimpl
    def sandbox_check_config(self, options: Mapping[str, Any]) -> bool:
        if not (options.get("api_key") or os.environ.get(KEY)):
            raise BackendNotConfiguredError(self.name, KEY)
        return True

    @hookimpl
    def sandbox_capabilities(self, options: Mapping[str, Any]) -> Capabilities:
        return Capabilities(images=False, config_env=(KEY,))

    @hookimpl
    def sandbox_create(self, spec):
        return dataclasses.replace(acme.sandbox_create(spec), backend=self.name)

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        return acme.sandbox_exec(handle, command, env, cwd, on_stdout, on_stderr, exec_id)

    @hookimpl
    def sandbox_exec_kill(self, handle, exec_id):
        return acme.sandbox_exec_kill(handle, exec_id)

    @hookimpl
    def sandbox_upload(self, handle, files):
        return acme.sandbox_upload(handle, files)

    @hookimpl
    def sandbox_download(self, handle, files):
        return acme.sandbox_download(handle, files)

    @hookimpl
    def sandbox_destroy(self, handle):
        return acme.sandbox_destroy(handle)

    @hookimpl
    def sandbox_list(self, labels, options) -> list[SandboxHandle]:
        return [dataclasses.replace(h, backend=self.name) for h in acme.sandbox_list(labels, options)]


class ExecReturnsNone(Good):
    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        acme.sandbox_exec(handle, command, env, cwd, on_stdout, on_stderr, exec_id)
        return None


class RaisesOnNonZeroExit(Good):
    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        result = acme.sandbox_exec(handle, command, env, cwd, on_stdout, on_stderr, exec_id)
        if result.exit_code:
            raise SandboxError("command failed with exit code %d" % result.exit_code)
        return result


class MixesStderrIntoStdout(Good):
    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        return acme.sandbox_exec(handle, command, env, cwd, on_stdout, on_stdout, exec_id)


class BuffersOutput(Good):
    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        out: list[str] = []
        err: list[str] = []
        result = acme.sandbox_exec(handle, command, env, cwd, out.append, err.append, exec_id)
        if on_stdout and out:
            on_stdout("".join(out))
        if on_stderr and err:
            on_stderr("".join(err))
        return result


class IgnoresTimeout(Good):
    """An older backend: no kill hook, and it ignores the timeout it is given (the facade must stop it)."""

    sandbox_exec_kill = None

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, timeout, on_stdout, on_stderr, exec_id):
        return acme.sandbox_exec(handle, command, env, cwd, on_stdout, on_stderr, exec_id)


class TimeoutWithoutKill(Good):
    """An older backend (no kill hook) that raises on time, but leaves the command running."""

    sandbox_exec_kill = None

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, timeout, on_stdout, on_stderr, exec_id):
        done: list[Any] = []

        def run() -> None:
            try:
                done.append(acme.sandbox_exec(handle, command, env, cwd, on_stdout, on_stderr, exec_id))
            except Exception as exc:  # handed to the caller below
                done.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout)
        if not done:
            raise SandboxTimeoutError("timed out")
        if isinstance(done[0], Exception):
            raise done[0]
        return done[0]


class KillDoesNothing(Good):
    """Declares sandbox_exec_kill, which says True and kills nothing: the facade must destroy the sandbox."""

    @hookimpl
    def sandbox_exec_kill(self, handle, exec_id):
        return True


class KillSparesChildren(Good):
    """Kills only a command's first process, and returns once that one exits, leaving its children running."""

    running: dict[str, subprocess.Popen] = {}

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        proc = subprocess.Popen(
            list(command), cwd=cwd or handle.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
        )
        self.running[exec_id] = proc
        acme._mark(acme._home(handle), "command", proc.pid)  # its bug is the kill hook's: destroy still ends the group
        pump = threading.Thread(target=lambda: [on_stdout and on_stdout(line.decode()) for line in proc.stdout], daemon=True)
        pump.start()
        try:
            code = proc.wait()
            pump.join(0.5)  # a child still holding stdout is left to it
            return ExecResult(code)
        finally:
            self.running.pop(exec_id, None)

    @hookimpl
    def sandbox_exec_kill(self, handle, exec_id):
        proc = self.running.get(exec_id)
        if proc is None:
            return False
        proc.kill()
        return True


class DestroyNotIdempotent(Good):
    @hookimpl
    def sandbox_destroy(self, handle):
        acme.sandbox_destroy(handle)
        return True


class UploadDropsHighBytes(Good):
    @hookimpl
    def sandbox_upload(self, handle, files):
        text_safe = [
            UploadItem(f.path, content=f.content.decode("ascii", "ignore").encode(), source=f.source) if f.content is not None else f
            for f in files
        ]
        return acme.sandbox_upload(handle, text_safe)


class MissingFileRaises(Good):
    @hookimpl
    def sandbox_download(self, handle, files):
        results = acme.sandbox_download(handle, files)
        for r in results:
            if r.error == "file_not_found":
                raise FileNotFoundError(r.path)
        return results


class CredentialsNotReported(Good):
    @hookimpl
    def sandbox_check_config(self, options):
        return True


class ReadsUntilPipesClose(Good):
    """The doc's old example: read output until every holder of the pipes closed them (and no kill hook)."""

    sandbox_exec_kill = None

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, timeout, on_stdout, on_stderr, exec_id):
        proc = subprocess.Popen(
            list(command), cwd=cwd or handle.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise SandboxTimeoutError("timed out") from None
        for callback, data in ((on_stdout, out), (on_stderr, err)):
            if callback and data:
                callback(data.decode())
        return ExecResult(proc.returncode)


class IgnoresTtl(Good):
    @hookimpl
    def sandbox_create(self, spec):
        return super().sandbox_create(dataclasses.replace(spec, ttl_seconds=None))


class DestroyNeedsNative(Good):
    """Keeps what destroy needs only in the creating process's handle."""

    @hookimpl
    def sandbox_create(self, spec):
        handle = super().sandbox_create(spec)
        return dataclasses.replace(handle, native={"id": handle.sandbox_id})

    @hookimpl
    def sandbox_destroy(self, handle):
        return acme.sandbox_destroy(dataclasses.replace(handle, sandbox_id=handle.native["id"]))


class LeaksLauncherEnv(Good):
    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        return acme.sandbox_exec(handle, command, {**os.environ, **env}, cwd, on_stdout, on_stderr, exec_id)


class ClaimsLimits(Good):
    """Says it enforces cpu/memory, and ignores them."""

    @hookimpl
    def sandbox_capabilities(self, options):
        return Capabilities(images=False, enforces_limits=True, config_env=(KEY,))


class FlowGood(Good):
    """Correct, and its sandboxes see the launcher's files (as acme's do): runs flows on the local datastore."""

    @hookimpl
    def sandbox_capabilities(self, options):
        return Capabilities(images=False, shares_host_filesystem=True, config_env=(KEY,))


class DropsStderr(FlowGood):
    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, on_stdout, on_stderr, exec_id):
        return acme.sandbox_exec(handle, command, env, cwd, on_stdout, None, exec_id)


class LocalEnforcing:
    """The embedded local backend (which applies CPU affinity and a memory cgroup), declaring it."""

    name = "local-enforcing"

    @hookimpl
    def sandbox_capabilities(self, options):
        return dataclasses.replace(local.sandbox_capabilities(options), enforces_limits=True)

    @hookimpl
    def sandbox_check_config(self, options):
        return True

    @hookimpl
    def sandbox_create(self, spec):
        return dataclasses.replace(local.sandbox_create(spec), backend=self.name)

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, timeout, on_stdout, on_stderr, exec_id):
        return local.sandbox_exec(handle, command, env, cwd, timeout, on_stdout, on_stderr, exec_id)

    @hookimpl
    def sandbox_exec_kill(self, handle, exec_id):
        return local.sandbox_exec_kill(handle, exec_id)

    @hookimpl
    def sandbox_upload(self, handle, files):
        return local.sandbox_upload(handle, files)

    @hookimpl
    def sandbox_download(self, handle, files):
        return local.sandbox_download(handle, files)

    @hookimpl
    def sandbox_destroy(self, handle):
        return local.sandbox_destroy(handle)


GOOD = Good("kitgood")
HOLDS_EXEC = ReadsUntilPipesClose("holds-exec")
IGNORES_TTL = IgnoresTtl("ignores-ttl")
DESTROY_NEEDS_NATIVE = DestroyNeedsNative("destroy-needs-native")
LEAKS_ENV = LeaksLauncherEnv("leaks-launcher-env")
CLAIMS_LIMITS = ClaimsLimits("claims-limits")
LOCAL_ENFORCING = LocalEnforcing()
DROPS_STDERR = DropsStderr("drops-stderr")
EXEC_NONE = ExecReturnsNone("exec-none")
RAISES_NONZERO = RaisesOnNonZeroExit("raises-nonzero")
MIXES_STREAMS = MixesStderrIntoStdout("mixes-streams")
BUFFERS = BuffersOutput("buffers")
IGNORES_TIMEOUT = IgnoresTimeout("ignores-timeout")
NO_KILL = TimeoutWithoutKill("timeout-no-kill")
KILL_NOOP = KillDoesNothing("kill-noop")
KILL_SPARES_CHILDREN = KillSparesChildren("kill-spares-children")
DESTROY_TWICE_TRUE = DestroyNotIdempotent("destroy-twice-true")
DROPS_HIGH_BYTES = UploadDropsHighBytes("drops-high-bytes")
MISSING_RAISES = MissingFileRaises("missing-raises")
NO_CREDENTIALS_CHECK = CredentialsNotReported("no-credentials-check")
