"""``BackendConformance``: the tests every backend must pass, driven only through the public API.

Two tiers in one class. ``test_offline_*`` need no sandbox (entry point, plugin manager, no network at
import, credentials errors). ``test_lifecycle_*``, ``test_exec_*`` and ``test_files_*`` run against live
sandboxes: one class-scoped ``sandbox`` shared by most tests, plus fresh ones for tests that destroy or
need their own spec (a short ttl, limits, a launcher variable that must not leak).
Select a tier with ``-k offline`` or ``-k "not offline"``. The flow tier is ``FlowConformance``.

Capability flags are properties whose defaults are the strictest behaviour; turning one off turns the
tests that need it into an explicit ``pytest.skip`` with the reason, never a silent pass. What the
backend declares in ``Capabilities`` (``enforces_limits``, ``min_ttl_seconds``) drives the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from metaflow_sandbox import (
    GROUP,
    MARKER_LABEL,
    Backend,
    BackendNotConfiguredError,
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    Resources,
    Sandbox,
    SandboxCancelledError,
    SandboxFileError,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
    UploadItem,
    available_backends,
    get_plugin_manager,
)
from metaflow_sandbox.running import KILL_GRACE_SECONDS

REQUIRED_HOOKS = ("sandbox_create", "sandbox_exec", "sandbox_upload", "sandbox_download", "sandbox_destroy")
LARGE_FILE_BYTES = 50 * 1024 * 1024
#: ``seq 1 1500000`` prints 10,888,896 bytes: more than 10 MiB, deterministic, order-checkable.
LARGE_OUTPUT_COUNT = 1_500_000
#: Set on the class sandbox's spec; commands must see it unless exec(env=...) overrides it.
SPEC_ENV = {"KIT_SPEC_ENV": "from-spec", "KIT_SPEC_OTHER": "kept"}
UNICODE_TEXT = "h\u00e9llo \U0001f389 \u6f22\u5b57 \u304b\u306a e\u0301 \u0645\u0631\u062d\u0628\u0627 \u2603"

# Runs in a fresh interpreter: deny every network call, then import the backend through discovery.
_NO_NETWORK_PROBE = textwrap.dedent(
    """
    import json, socket, sys
    attempts = []
    _connect = socket.socket.connect

    def deny(what, target):
        attempts.append("%s(%r)" % (what, target))
        raise OSError("network call blocked by the metaflow-sandbox conformance kit")

    def connect(self, address):
        if getattr(socket, "AF_UNIX", None) is not None and self.family == socket.AF_UNIX:
            return _connect(self, address)
        deny("socket.connect", address)

    def connect_ex(self, address):
        connect(self, address)
        return 0

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.create_connection = lambda address, *a, **k: deny("socket.create_connection", address)
    socket.getaddrinfo = lambda host, *a, **k: deny("socket.getaddrinfo", host)
    error = None
    try:
        from metaflow_sandbox import get_plugin_manager
        get_plugin_manager(sys.argv[1])
    except BaseException as exc:
        error = "%s: %s" % (type(exc).__name__, exc)
    print("KIT-RESULT " + json.dumps({"attempts": attempts, "error": error}))
    """
)


#: How short a lifetime the TTL test asks for (raised to ``Capabilities.min_ttl_seconds`` up to the cap below).
KIT_TTL_SECONDS = 3.0
KIT_TTL_MAX_SECONDS = 5.0
#: A launcher variable that must not reach a sandbox (only ``spec.env`` and ``exec(env=...)`` do).
LAUNCHER_ONLY_ENV = "KIT_LAUNCHER_ONLY_SECRET"
#: The limits test: a sandbox of 1 CPU and this much memory; a command then writes 3x as much.
KIT_MEMORY_MB = 256

# Runs in a fresh interpreter: destroy a sandbox from a bare handle, as the lifeline's reaper does.
_BARE_DESTROY = textwrap.dedent(
    """
    import json, sys
    from metaflow_sandbox import Backend, SandboxHandle
    name, sandbox_id, workdir, labels, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
    backend = Backend(name, options=options)
    handle = SandboxHandle(name, sandbox_id, workdir=workdir, labels=labels, options=options)
    print("KIT-RESULT " + json.dumps(backend.call("sandbox_destroy", idempotent=True, sandbox_id=sandbox_id, handle=handle)))
    """
)

# What a Metaflow task needs from the environment it is started in.
_TASK_ENV_PROBE = (
    'for tool in python bash tar gzip mkdir cp; do command -v "$tool" >/dev/null || echo "missing:$tool"; done; '
    "python -c \"import sys; print('python:' + str(sys.version_info[0]))\"; "
    'if [ -n "$HOME" ] && [ -d "$HOME" ] && [ -w "$HOME" ]; then echo home:ok; else echo "home:bad:$HOME"; fi; '
    'echo "leak:${%s:-none}"' % LAUNCHER_ONLY_ENV
)

# Sees at most ceil(cpu) CPUs: through affinity (nproc) or a cgroup CPU quota.
_CPU_PROBE = 'n=$(nproc); q=none; if [ -r /sys/fs/cgroup/cpu.max ]; then q=$(cat /sys/fs/cgroup/cpu.max); fi; echo "$n|$q"'


def _collect() -> tuple[list[str], Callable[[str], None]]:
    chunks: list[str] = []
    return chunks, chunks.append


class BackendConformance:
    """Subclass as ``class TestMyBackend(BackendConformance): backend = "name"``.

    Not named ``Test*``, so pytest collects only your subclass. Do not override the ``test_*``
    methods; if your backend truly diverges, override with ``@pytest.mark.xfail(reason=...)``.
    """

    #: Entry-point name in the ``metaflow_sandbox.backends`` group.
    backend: str = ""
    #: Environment variables the backend needs (credentials). Live tests skip naming them when unset;
    #: the offline tier checks that removing each one gives ``BackendNotConfiguredError`` naming it.
    required_env: tuple[str, ...] = ()
    #: Slack allowed on top of a timeout before ``SandboxTimeoutError`` must have been raised.
    timeout_slack_seconds: float = 5.0

    # ----- what the author may override -------------------------------------------------------

    def backend_options(self) -> dict[str, Any]:
        """Backend options (``METAFLOW_SANDBOX_<BACKEND>_<KEY>`` in production), e.g. an emulator URL."""
        return {}

    def _options(self) -> dict[str, Any]:
        options = self.backend_options
        return dict(options() if callable(options) else options)  # a method, or a property (also accepted)

    def sandbox_spec(self, labels: dict[str, str]) -> SandboxSpec:
        """The spec every kit sandbox is created with; override to pick an image or template."""
        return SandboxSpec(labels=labels, ttl_seconds=900)

    @property
    def streams_output(self) -> bool:
        """False if the provider can only return output after the command ended (skips the streaming test)."""
        return True

    @property
    def distinct_file_errors(self) -> bool:
        """False if the backend cannot tell ``invalid_path``/``is_directory`` apart (skips those tests)."""
        return True

    # ----- fixtures --------------------------------------------------------------------------

    # Class-scoped fixtures are classmethods (pytest 9 deprecates instance-method ones); they build
    # a throwaway instance to reach the author's overridable methods.

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_backend(cls) -> Backend:
        """The backend under test, selected by name through real discovery."""
        missing = [var for var in cls.required_env if not os.environ.get(var)]
        if missing:
            pytest.skip("%s not set: the live conformance tests need it" % ", ".join(missing))
        assert cls.backend, 'set `backend = "<entry-point name>"` on %s' % cls.__name__
        return Backend(cls.backend, options=cls()._options())

    @pytest.fixture(scope="class")
    @classmethod
    def kit_labels(cls) -> dict[str, str]:
        return {MARKER_LABEL: "1", "conformance-run": uuid.uuid4().hex[:12]}

    @pytest.fixture(scope="class")
    @classmethod
    def sandbox(cls, conformance_backend: Backend, kit_labels: dict[str, str]) -> Iterator[Sandbox]:
        """One sandbox shared by the class (cloud sandboxes are slow to create); destroyed at teardown."""
        spec = cls().sandbox_spec(dict(kit_labels))
        sb = conformance_backend.create(dataclasses.replace(spec, env={**spec.env, **SPEC_ENV}))
        yield sb
        sb.destroy()

    @pytest.fixture
    def fresh_sandbox(self, conformance_backend: Backend, kit_labels: dict[str, str]) -> Iterator[Callable[..., Sandbox]]:
        """Factory for sandboxes a test may destroy; any left alive are destroyed after the test."""
        made: list[Sandbox] = []

        def make(**labels: str) -> Sandbox:
            sb = conformance_backend.create(self.sandbox_spec({**kit_labels, **labels}))
            made.append(sb)
            return sb

        yield make
        for sb in made:
            with contextlib.suppress(Exception):  # the test itself reports what went wrong
                sb.destroy()

    @pytest.fixture
    def tdir(self, sandbox: Sandbox, request: pytest.FixtureRequest) -> str:
        """A per-test directory under the sandbox workdir, created by upload (not exec)."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
        path = posixpath.join(sandbox.handle.workdir, "kit", name)
        (result,) = sandbox.upload([UploadItem(posixpath.join(path, ".keep"), content=b"")])
        assert result.error is None, "could not create %s by upload: %s" % (path, result.error)
        return path

    # ----- offline tier ----------------------------------------------------------------------

    def test_offline_entry_point_registered(self) -> None:
        """The backend is installed under its name in the entry-point group, once, and loads.

        Troubleshooting: if this fails, your pyproject.toml must declare
        ``[project.entry-points."metaflow_sandbox.backends"] <name> = "<your_package>.plugin"`` and the
        distribution must be installed (``pip install -e .``).
        """
        found = available_backends()
        assert self.backend in found, "no '%s' in entry-point group %s; installed: %s" % (
            self.backend,
            GROUP,
            sorted(found),
        )
        eps = found[self.backend]
        assert len(eps) == 1, "'%s' is claimed by %d distributions" % (self.backend, len(eps))
        assert eps[0].load() is not None

    def test_offline_plugin_manager_validates(self) -> None:
        """Discovery builds a validated plugin manager with all five required hooks.

        Troubleshooting: if this fails, your plugin module must define ``sandbox_create``, ``sandbox_exec``,
        ``sandbox_upload``, ``sandbox_download`` and ``sandbox_destroy`` decorated with
        ``@metaflow_sandbox.hookimpl``, with parameter names taken from the hookspecs.
        """
        pm = get_plugin_manager(self.backend)
        for hook in REQUIRED_HOOKS:
            assert getattr(pm.hook, hook).get_hookimpls(), "%s is not implemented" % hook

    def test_offline_import_makes_no_network_call(self) -> None:
        """Importing the backend and building its plugin manager makes no network call.

        Runs in a fresh interpreter with every socket connect and DNS lookup denied (unix sockets
        allowed). Listing backends or running ``metaflow-sandbox backends`` must work offline.
        Troubleshooting: if this fails, your plugin module must not connect at import time: create SDK
        clients lazily inside ``sandbox_create`` (or cache them on first use), not at module level.
        """
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run(
            [sys.executable, "-c", _NO_NETWORK_PROBE, self.backend],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("KIT-RESULT ")]
        assert lines, "the probe interpreter crashed (exit %s):\n%s" % (proc.returncode, proc.stderr[-3000:])
        report = json.loads(lines[-1][len("KIT-RESULT ") :])
        assert not report["attempts"], "network calls while importing '%s': %s" % (self.backend, report["attempts"])
        assert report["error"] is None, "loading '%s' failed with the network denied: %s" % (
            self.backend,
            report["error"],
        )

    def test_offline_missing_credentials_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each variable in ``required_env`` is reported by name when it is missing (no network call).

        With no ``required_env`` declared, ``check_config()`` must succeed with no options at all.
        Troubleshooting: if this fails, your ``sandbox_check_config(options)`` must raise
        ``BackendNotConfiguredError("<backend>", "<VARIABLE>")`` when neither ``options`` nor the
        environment provide the setting (and return True otherwise).
        """
        if not self.required_env:
            assert Backend(self.backend).check_config() is True
            return
        for var in self.required_env:
            with monkeypatch.context() as m:
                m.delenv(var, raising=False)
                with pytest.raises(BackendNotConfiguredError) as info:
                    Backend(self.backend).check_config()
                assert info.value.variable == var
                assert var in str(info.value)

    def test_offline_capabilities_declared(self) -> None:
        """If the backend declares capabilities, they are a ``Capabilities`` that lists ``required_env``.

        Troubleshooting: if this fails, your ``sandbox_capabilities(options)`` must return
        ``Capabilities(..., config_env=(<every variable in required_env>, ...))`` without network calls.
        """
        backend = Backend(self.backend, options=self._options())
        caps = backend.capabilities()
        assert isinstance(caps, Capabilities)
        if backend.implements("sandbox_capabilities"):
            missing = set(self.required_env) - set(caps.config_env)
            assert not missing, "Capabilities.config_env does not list %s" % sorted(missing)

    def test_offline_no_silent_overrides(self) -> None:
        """Kit tests are not overridden or deleted without saying so.

        Troubleshooting: if this fails, you replaced a kit test; keep it, or override it with
        ``@pytest.mark.xfail(reason="why this backend diverges")`` so the divergence is visible.
        """
        silent = []
        for name, base in vars(BackendConformance).items():
            if not name.startswith("test_"):
                continue
            mine = getattr(type(self), name, None)
            if mine is base:
                continue
            marks = getattr(mine, "pytestmark", [])
            if not any(getattr(m, "name", "") == "xfail" and m.kwargs.get("reason") for m in marks):
                silent.append(name)
        assert not silent, "overridden without @pytest.mark.xfail(reason=...): %s" % silent

    # ----- lifecycle -------------------------------------------------------------------------

    def test_lifecycle_create_returns_handle(self, sandbox: Sandbox) -> None:
        """``create`` returns a handle with an id, this backend's name and an absolute workdir.

        Troubleshooting: if this fails, your ``sandbox_create`` must return
        ``SandboxHandle(backend="<entry-point name>", sandbox_id=<provider id>, workdir=<absolute dir>)``.
        """
        handle = sandbox.handle
        assert isinstance(handle.sandbox_id, str) and handle.sandbox_id
        assert handle.backend == self.backend
        assert posixpath.isabs(handle.workdir)

    def test_lifecycle_destroy_is_idempotent(self, fresh_sandbox: Callable[..., Sandbox]) -> None:
        """``destroy`` returns True the first time, then False (any number of times).

        Troubleshooting: if this fails, your ``sandbox_destroy`` must return False, not raise, when the
        sandbox is already gone (treat the provider's 404 as "already destroyed").
        """
        sb = fresh_sandbox()
        assert sb.destroy() is True
        assert sb.destroy() is False
        assert sb.destroy() is False

    def test_lifecycle_exec_after_destroy_raises_not_found(self, fresh_sandbox: Callable[..., Sandbox]) -> None:
        """Running a command in a destroyed sandbox raises ``SandboxNotFoundError``.

        Troubleshooting: if this fails, your ``sandbox_exec`` must translate the provider's "no such
        sandbox" answer into ``SandboxNotFoundError`` (not a generic error, not an exit code).
        """
        sb = fresh_sandbox()
        assert sb.destroy() is True
        with pytest.raises(SandboxNotFoundError):
            sb.exec(["echo", "hi"], timeout=30)

    def test_lifecycle_labels_kept(self, fresh_sandbox: Callable[..., Sandbox]) -> None:
        """Labels given at create are on the handle.

        Troubleshooting: if this fails, your ``sandbox_create`` must attach ``spec.labels`` to the
        provider's sandbox and return them in ``SandboxHandle.labels``.
        """
        sb = fresh_sandbox(kit_case="labels")
        for key, value in sb.handle.labels.items():
            assert isinstance(key, str) and isinstance(value, str)
        assert sb.handle.labels.get("kit_case") == "labels"
        assert sb.handle.labels.get(MARKER_LABEL) == "1"

    def test_lifecycle_list_by_labels(self, conformance_backend: Backend, fresh_sandbox: Callable[..., Sandbox]) -> None:
        """With ``sandbox_list``: a sandbox is listed by its labels while alive, and not after destroy.

        Troubleshooting: if this fails, your ``sandbox_list(labels, options)`` must return handles of the
        live sandboxes carrying ALL the given labels, and nothing already destroyed.
        """
        if not conformance_backend.implements("sandbox_list"):
            pytest.skip("backend does not implement the optional sandbox_list hook")
        tag = uuid.uuid4().hex[:10]
        sb = fresh_sandbox(kit_list=tag)
        other = fresh_sandbox(kit_list="other-" + tag)
        listed = {s.id for s in conformance_backend.list({"kit_list": tag})}
        assert sb.id in listed
        assert other.id not in listed
        assert sb.destroy() is True
        assert sb.id not in {s.id for s in conformance_backend.list({"kit_list": tag})}

    def test_lifecycle_ttl_honoured(self, conformance_backend: Backend, kit_labels: dict[str, str]) -> None:
        """A sandbox created with a short ``ttl_seconds`` dies by itself: exec then raises ``SandboxNotFoundError``.

        The kit asks for 3 s (or ``Capabilities.min_ttl_seconds``, up to 5 s) and waits at most
        ``ttl + 2 * timeout_slack_seconds``. Troubleshooting: if this fails, your ``sandbox_create`` must
        make the sandbox end on its own after ``spec.ttl_seconds`` (a provider-side timeout, or a watchdog
        that survives the launcher), and your ``sandbox_exec`` must raise ``SandboxNotFoundError`` afterwards.
        """
        floor = conformance_backend.capabilities().min_ttl_seconds or 0.0
        if floor > KIT_TTL_MAX_SECONDS:
            pytest.skip("backend declares Capabilities.min_ttl_seconds=%s (the kit waits at most %ss)" % (floor, KIT_TTL_MAX_SECONDS))
        ttl = max(KIT_TTL_SECONDS, floor)
        spec = self.sandbox_spec({**kit_labels, "kit_case": "ttl"})
        sb = conformance_backend.create(dataclasses.replace(spec, ttl_seconds=ttl))
        born = time.monotonic()
        try:
            assert sb.run(["true"], timeout=30)[0] == 0, "the sandbox did not run a command right after create"
            deadline = born + ttl + 2 * self.timeout_slack_seconds
            while True:
                try:
                    sb.exec(["true"], timeout=30)
                except SandboxNotFoundError:
                    break
                assert time.monotonic() < deadline, "sandbox still alive %.1fs after a ttl of %ss" % (time.monotonic() - born, ttl)
                time.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                sb.destroy()

    def test_lifecycle_destroy_from_bare_handle_in_another_process(
        self, conformance_backend: Backend, fresh_sandbox: Callable[..., Sandbox]
    ) -> None:
        """Another process destroys a sandbox knowing only its id: ``SandboxHandle(backend, id, options=...)``.

        This is how the lifeline's reaper (and ``metaflow-sandbox kill``) ends a dead owner's sandbox:
        ``native`` is None and nothing your create kept in memory is there. Troubleshooting: if this
        fails, your ``sandbox_destroy`` must find the sandbox from ``handle.sandbox_id`` and
        ``handle.options`` alone (reconnect to the provider), return True, and False once it is gone.
        """
        sb = fresh_sandbox(kit_case="bare-destroy")
        options = conformance_backend.options
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        args = [self.backend, sb.id, sb.handle.workdir, json.dumps(dict(sb.handle.labels)), json.dumps(options, default=str)]
        proc = subprocess.run(
            [sys.executable, "-c", _BARE_DESTROY, *args], capture_output=True, text=True, timeout=180, env=env, check=False
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("KIT-RESULT ")]
        assert lines, "destroy from a bare handle failed in another process (exit %s):\n%s" % (proc.returncode, proc.stderr[-3000:])
        assert json.loads(lines[-1][len("KIT-RESULT ") :]) is True, "sandbox_destroy(bare handle) did not return True"
        with pytest.raises(SandboxNotFoundError):
            sb.exec(["echo", "hi"], timeout=30)
        bare = SandboxHandle(self.backend, sb.id, workdir=sb.handle.workdir, options=options)
        assert conformance_backend.call("sandbox_destroy", idempotent=True, sandbox_id=sb.id, handle=bare) is False

    # ----- exec ------------------------------------------------------------------------------

    def test_exec_leftover_processes_do_not_hold_exec(self, sandbox: Sandbox) -> None:
        """A command that leaves a background process holding stdout still returns as soon as it exits.

        ``sh -c 'sleep 30 & echo hi'`` must return ``hi`` and exit 0 within 5 s: a Metaflow task leaves
        such processes, and a backend that waits for the pipes to close stalls every flow.
        Troubleshooting: if this fails, your ``sandbox_exec`` must return when the command's own process
        exits: kill what it left in its process group (or stop reading its pipes) instead of reading
        stdout until every holder of the pipe has closed it.
        """
        start = time.monotonic()
        try:
            code, out, _ = sandbox.run(["sh", "-c", "sleep 30 & echo hi"], timeout=15)
        except SandboxTimeoutError:
            pytest.fail("exec did not return in 15 s: it waits for the background 'sleep 30' that holds stdout")
        elapsed = time.monotonic() - start
        assert (code, out) == (0, "hi\n")
        assert elapsed < 5.0, "exec returned %.1fs after a command that exits at once (a leftover process held it)" % elapsed

    def test_exec_task_environment(self, conformance_backend: Backend, kit_labels: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
        """A command finds what a Metaflow task needs, and nothing of the launcher's environment.

        ``python`` (3) on PATH with ``bash``, ``tar``, ``gzip`` and coreutils; ``HOME`` set to a
        writable directory; a variable set only in the launcher's environment is not visible (only
        ``spec.env`` and ``exec(env=...)`` reach a command). Troubleshooting: if this fails, your sandbox
        image (or ``sandbox_create``) must provide python 3 on PATH and a writable HOME, and your
        ``sandbox_exec`` must start commands from the sandbox's own environment, never ``os.environ``.
        """
        monkeypatch.setenv(LAUNCHER_ONLY_ENV, "leaked")
        sb = conformance_backend.create(self.sandbox_spec({**kit_labels, "kit_case": "task-env"}))
        try:
            code, out, err = sb.run(["sh", "-c", _TASK_ENV_PROBE], timeout=60)
        finally:
            with contextlib.suppress(Exception):
                sb.destroy()
        lines = out.splitlines()
        assert [line for line in lines if line.startswith("missing:")] == [], "not on PATH in the sandbox: %s" % lines
        assert "python:3" in lines, "python 3 is not runnable as `python`: %s %s" % (lines, err[-500:])
        assert "home:ok" in lines, "HOME is unset or not a writable directory: %s" % lines
        assert "leak:none" in lines, "a variable of the launcher's environment reached the sandbox: %s" % lines
        assert code == 0, err

    def test_exec_limits_enforced_when_declared(self, conformance_backend: Backend, kit_labels: dict[str, str]) -> None:
        """With ``Capabilities.enforces_limits``: cpu=1 shows at most 1 CPU, and memory above the limit is killed.

        The kit creates a sandbox with ``Resources(cpu=1, memory_mb=256)``; ``nproc`` must be 1 (or a cgroup
        quota at most one CPU), writing 64 MB must work, writing 768 MB must end with a non-zero exit or
        ``oom_killed``. A backend that cannot enforce limits leaves the flag False: this test is then a named
        skip and the limits are advisory (documented, never silently claimed). Troubleshooting: if this
        fails, your ``sandbox_create`` must apply ``spec.resources`` (CPU affinity or quota, a hard memory
        limit), or your ``sandbox_capabilities`` must not declare ``enforces_limits=True``.
        """
        if not conformance_backend.capabilities().enforces_limits:
            pytest.skip("backend declares Capabilities.enforces_limits=False: cpu and memory are advisory")
        spec = self.sandbox_spec({**kit_labels, "kit_case": "limits"})
        sb = conformance_backend.create(dataclasses.replace(spec, resources=Resources(cpu=1, memory_mb=KIT_MEMORY_MB)))
        try:
            code, out, _ = sb.run(["sh", "-c", _CPU_PROBE], timeout=60)
            assert code == 0
            nproc, quota = out.strip().split("|")
            assert int(nproc) <= 1 or _quota_cpus(quota) <= 1.0, "cpu=1 but the command sees %s CPUs (cpu.max %s)" % (nproc, quota)
            small = sb.run(["python", "-c", "b = b'x' * (64 << 20); print('allocated')"], timeout=60)
            assert small[:2] == (0, "allocated\n"), "64 MB under a %d MB limit failed: %r" % (KIT_MEMORY_MB, small)
            big_out, collect_big = _collect()
            too_much = "b = b'x' * (%d << 20); print('allocated')" % (3 * KIT_MEMORY_MB)
            big = sb.exec(["python", "-c", too_much], timeout=60, on_stdout=collect_big)
            stopped = (big.exit_code != 0 or big.oom_killed) and "allocated" not in "".join(big_out)
            assert stopped, "wrote %d MB under a %d MB limit and was not stopped" % (3 * KIT_MEMORY_MB, KIT_MEMORY_MB)
        finally:
            with contextlib.suppress(Exception):
                sb.destroy()

    def test_exec_exit_codes_are_results(self, sandbox: Sandbox) -> None:
        """Exit codes 0, 1 and 42 come back in ``ExecResult.exit_code``; non-zero is not an exception.

        Troubleshooting: if this fails, your ``sandbox_exec`` must return ``ExecResult(exit_code=code)``
        for every exit code and raise only for infrastructure failures.
        """
        for code in (0, 1, 42):
            result = sandbox.exec(["sh", "-c", "exit %d" % code], timeout=60)
            assert isinstance(result, ExecResult)
            assert result.exit_code == code

    def test_exec_stdout_stderr_separate(self, sandbox: Sandbox) -> None:
        """stdout goes to ``on_stdout`` and stderr to ``on_stderr``, never mixed.

        Troubleshooting: if this fails, your ``sandbox_exec`` must read the two streams separately and
        call ``on_stdout``/``on_stderr`` with each one's text.
        """
        code, out, err = sandbox.run(["sh", "-c", "echo to-out; echo to-err >&2; echo more-out"], timeout=60)
        assert code == 0
        assert out == "to-out\nmore-out\n"
        assert err == "to-err\n"

    def test_exec_streams_before_exit(self, sandbox: Sandbox) -> None:
        """Output reaches the callback while the command still runs, in order.

        The command prints "first", sleeps 2 s, prints "second": "first" must arrive at least 1 s
        before ``exec`` returns. Troubleshooting: if this fails, your ``sandbox_exec`` must forward
        output chunks to ``on_stdout`` as they arrive instead of collecting them until the end.
        """
        if not self.streams_output:
            pytest.skip("backend declares streams_output = False (output only after the command ends)")
        seen: list[tuple[float, str]] = []
        result = sandbox.exec(
            ["sh", "-c", "echo first; sleep 2; echo second"],
            timeout=60,
            on_stdout=lambda chunk: seen.append((time.monotonic(), chunk)),
        )
        returned = time.monotonic()
        assert result.exit_code == 0
        text = "".join(chunk for _, chunk in seen)
        assert text == "first\nsecond\n"
        first_at = next(t for t, so_far in _prefix_times(seen) if "first" in so_far)
        assert returned - first_at >= 1.0, "'first' arrived only %.2fs before exec returned" % (returned - first_at)

    def test_exec_unicode_round_trip(self, sandbox: Sandbox) -> None:
        """Non-ASCII text survives argv, stdout and stderr, including multi-byte chars split across chunks.

        Troubleshooting: if this fails, your ``sandbox_exec`` must pass argv as UTF-8 and decode output
        with an incremental UTF-8 decoder (``codecs.getincrementaldecoder``), not chunk by chunk.
        """
        code, out, err = sandbox.run(["sh", "-c", 'printf "%s" "$1"; printf "%s" "$1" >&2', "sh", UNICODE_TEXT], timeout=60)
        assert code == 0
        assert out == UNICODE_TEXT
        assert err == UNICODE_TEXT
        code, out, _ = sandbox.run(["sh", "-c", "yes '\U0001f389\u6f22' | head -n 50000"], timeout=60)
        assert code == 0
        assert out == "\U0001f389\u6f22\n" * 50000

    def test_exec_large_output_complete_in_order(self, sandbox: Sandbox) -> None:
        """More than 10 MiB of stdout arrives complete and in order.

        Troubleshooting: if this fails, your ``sandbox_exec`` must not truncate, drop or reorder
        output chunks (check buffer limits and that you drain the stream before returning).
        """
        expected = "".join("%d\n" % i for i in range(1, LARGE_OUTPUT_COUNT + 1))
        chunks, collect = _collect()
        result = sandbox.exec(["seq", "1", str(LARGE_OUTPUT_COUNT)], timeout=120, on_stdout=collect)
        assert result.exit_code == 0
        text = "".join(chunks)
        assert len(text) == len(expected), "got %d characters, expected %d" % (len(text), len(expected))
        assert _sha(text) == _sha(expected), "output is complete in size but not in order"

    def test_exec_env_visible(self, sandbox: Sandbox) -> None:
        """Variables passed to ``exec(env=...)`` are visible to the command, values unchanged.

        Troubleshooting: if this fails, your ``sandbox_exec`` must add ``env`` to the command's
        environment (without shell-quoting bugs: values may contain spaces, quotes and ``=``).
        """
        value = "a b='c' \"d\" =e $HOME"
        code, out, _ = sandbox.run(["sh", "-c", 'printf "%s|%s" "$KIT_ONE" "$KIT_TWO"'], env={"KIT_ONE": value, "KIT_TWO": "2"}, timeout=60)
        assert code == 0
        assert out == "%s|2" % value

    def test_exec_spec_env_visible(self, sandbox: Sandbox) -> None:
        """``SandboxSpec.env`` is visible to every command; ``exec(env=...)`` overrides it for one command.

        Troubleshooting: if this fails, your ``sandbox_create`` must set ``spec.env`` as the sandbox's
        environment, and your ``sandbox_exec`` must apply ``env`` on top of it.
        """
        script = 'printf "%s|%s" "$KIT_SPEC_ENV" "$KIT_SPEC_OTHER"'
        assert sandbox.run(["sh", "-c", script], timeout=60) == (0, "from-spec|kept", "")
        assert sandbox.run(["sh", "-c", script], env={"KIT_SPEC_ENV": "from-exec"}, timeout=60) == (
            0,
            "from-exec|kept",
            "",
        )

    def test_exec_cwd_honoured(self, sandbox: Sandbox, tdir: str) -> None:
        """``exec(cwd=...)`` runs the command in that directory.

        Troubleshooting: if this fails, your ``sandbox_exec`` must start the command in ``cwd``.
        """
        code, out, _ = sandbox.run(["sh", "-c", "pwd -P; ls -a"], cwd=tdir, timeout=60)
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == _physical(sandbox, tdir)
        assert ".keep" in lines[1:]

    def test_exec_default_cwd_is_workdir(self, sandbox: Sandbox) -> None:
        """Without ``cwd`` a command starts in ``handle.workdir``.

        Troubleshooting: if this fails, your ``sandbox_exec`` must use ``handle.workdir`` when ``cwd`` is None.
        """
        code, out, _ = sandbox.run(["sh", "-c", "pwd -P"], timeout=60)
        assert code == 0
        assert out.strip() == _physical(sandbox, sandbox.handle.workdir)

    def test_exec_timeout_raises_and_kills(self, fresh_sandbox: Callable[..., Sandbox]) -> None:
        """Past its timeout a command's whole process group stops and ``SandboxTimeoutError`` is raised.

        The facade keeps the deadline and stops the command through your ``sandbox_exec_kill`` (a backend
        without it: through its own ``timeout``, else the facade destroys the sandbox). The command and a
        background child both write a heartbeat file; the error must come within ``timeout +
        KILL_GRACE_SECONDS + timeout_slack_seconds`` and both heartbeats must stop within 1 s.
        Troubleshooting: if this fails, your ``sandbox_exec_kill`` must kill the command's whole process
        group (not only its first process), or, without that hook, your ``sandbox_exec`` must kill it at
        ``timeout`` and raise SandboxTimeoutError.
        """
        sb = fresh_sandbox(kit_case="timeout")
        start = time.monotonic()
        with pytest.raises(SandboxTimeoutError):
            _start_heartbeats(sb, timeout=1)
        elapsed = time.monotonic() - start
        assert elapsed < 1 + KILL_GRACE_SECONDS + self.timeout_slack_seconds, "raised only after %.1fs" % elapsed
        _assert_heartbeats_stopped(sb, "the timed-out command")

    def test_exec_cancel_stops_command(self, fresh_sandbox: Callable[..., Sandbox]) -> None:
        """``Sandbox.cancel()`` from another thread stops the running command's process group.

        The running ``exec`` raises ``SandboxCancelledError`` within ``KILL_GRACE_SECONDS +
        timeout_slack_seconds`` and both heartbeats stop (Ctrl-C and SIGTERM of a run take the same path).
        Troubleshooting: if this fails, your ``sandbox_exec_kill`` must kill the command's whole process
        group, and your ``sandbox_exec`` must return once it is killed.
        """
        sb = fresh_sandbox(kit_case="cancel")
        timer = threading.Timer(1.0, sb.cancel)
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(SandboxCancelledError):
                _start_heartbeats(sb, timeout=120)
        finally:
            timer.cancel()
        elapsed = time.monotonic() - start
        assert elapsed < 1 + KILL_GRACE_SECONDS + self.timeout_slack_seconds, "exec returned %.1fs after the cancel" % (elapsed - 1)
        _assert_heartbeats_stopped(sb, "the cancelled command")

    def test_exec_kill_keeps_sandbox_usable(self, conformance_backend: Backend, fresh_sandbox: Callable[..., Sandbox]) -> None:
        """With ``sandbox_exec_kill``: a killed command leaves its sandbox running the next command.

        Troubleshooting: if this fails, your ``sandbox_exec_kill`` did not end the command within
        ``KILL_GRACE_SECONDS`` (so the facade destroyed the sandbox to stop it): kill the process group
        of ``exec_id`` and make your ``sandbox_exec`` return once it is dead.
        """
        if not conformance_backend.implements("sandbox_exec_kill"):
            pytest.skip("backend does not implement the optional sandbox_exec_kill hook: a timeout or cancel ends its sandbox")
        sb = fresh_sandbox(kit_case="kill")
        with pytest.raises(SandboxTimeoutError):
            sb.exec(["sh", "-c", "sleep 60"], timeout=1)
        try:
            assert sb.run(["sh", "-c", "echo alive"], timeout=60)[:2] == (0, "alive\n")
        except SandboxNotFoundError:
            pytest.fail("the sandbox was destroyed: sandbox_exec_kill did not stop the command within %ss" % KILL_GRACE_SECONDS)

    # ----- files -----------------------------------------------------------------------------

    def test_files_all_byte_values_round_trip(self, sandbox: Sandbox, tdir: str) -> None:
        """All 256 byte values survive upload and download exactly.

        Troubleshooting: if this fails, your ``sandbox_upload``/``sandbox_download`` must move raw bytes
        (no text decoding, no newline translation, no base64 mix-ups).
        """
        data = bytes(range(256)) * 4
        path = posixpath.join(tdir, "bytes.bin")
        assert sandbox.upload([UploadItem(path, content=data)]) == [FileResult(path)]
        (result,) = sandbox.download([DownloadItem(path)])
        assert result.error is None
        assert result.content == data

    def test_files_large_file_streams(self, sandbox: Sandbox, tdir: str, tmp_path: Any) -> None:
        """A 50 MiB file round trips through ``source``/``destination`` paths, byte for byte.

        Troubleshooting: if this fails, your ``sandbox_upload`` must stream ``UploadItem.source`` from
        disk and your ``sandbox_download`` must write ``DownloadItem.destination`` completely.
        """
        src, dst = tmp_path / "big.bin", tmp_path / "big.out"
        src.write_bytes(random.Random(7).randbytes(LARGE_FILE_BYTES))
        path = posixpath.join(tdir, "big.bin")
        (up,) = sandbox.upload([UploadItem(path, source=str(src))])
        assert up.error is None
        code, out, _ = sandbox.run(["sh", "-c", 'wc -c < "$1"', "sh", path], timeout=120)
        assert code == 0 and out.strip() == str(LARGE_FILE_BYTES)
        (down,) = sandbox.download([DownloadItem(path, destination=str(dst))])
        assert down.error is None
        assert _file_sha(dst) == _file_sha(src)

    def test_files_missing_parent_dirs_created(self, sandbox: Sandbox, tdir: str) -> None:
        """Uploading to a path whose parent directories do not exist creates them.

        Troubleshooting: if this fails, your ``sandbox_upload`` must create missing parents (``mkdir -p``).
        """
        path = posixpath.join(tdir, "a", "b", "c", "deep.txt")
        (result,) = sandbox.upload([UploadItem(path, content=b"deep")])
        assert result.error is None
        assert sandbox.read_file(path) == b"deep"

    def test_files_missing_download_is_file_not_found(self, sandbox: Sandbox, tdir: str) -> None:
        """Downloading a missing file gives ``error="file_not_found"``; ``read_file`` raises naming the path.

        Troubleshooting: if this fails, your ``sandbox_download`` must return
        ``FileResult(path, error="file_not_found")`` for a missing file instead of raising.
        """
        path = posixpath.join(tdir, "nope.txt")
        (result,) = sandbox.download([DownloadItem(path)])
        assert result.path == path
        assert result.error == "file_not_found"
        assert result.content is None
        with pytest.raises(SandboxFileError) as info:
            sandbox.read_file(path)
        assert info.value.code == "file_not_found"
        assert path in str(info.value)

    def test_files_batch_results_in_order(self, sandbox: Sandbox, tdir: str) -> None:
        """A batch with a good and a bad item gets one result per item, in order; the good one happens.

        Troubleshooting: if this fails, your ``sandbox_upload``/``sandbox_download`` must return a list
        with one ``FileResult`` per requested item, same order, a failure in one not stopping the others.
        """
        good, missing = posixpath.join(tdir, "good.txt"), posixpath.join(tdir, "missing.txt")
        up = sandbox.upload([UploadItem(good, content=b"good"), UploadItem(posixpath.join(tdir, "other.txt"), content=b"x")])
        assert [r.path for r in up] == [good, posixpath.join(tdir, "other.txt")]
        assert [r.error for r in up] == [None, None]
        down = sandbox.download([DownloadItem(missing), DownloadItem(good)])
        assert [r.path for r in down] == [missing, good]
        assert [r.error for r in down] == ["file_not_found", None]
        assert down[1].content == b"good"

    def test_files_relative_path_is_invalid(self, sandbox: Sandbox, tdir: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """A relative path, a NUL byte or a ``..`` part is ``invalid_path`` (per item) for upload and download.

        The facade answers these for every backend (``valid_sandbox_path``) before ``sandbox_upload`` or
        ``sandbox_download`` is called; the valid item next to them still happens. Troubleshooting: if this
        fails, your ``sandbox_upload``/``sandbox_download`` returned results out of order, or you call your
        hooks around the facade instead of through ``metaflow_sandbox.Backend``.
        """
        if not self.distinct_file_errors:
            pytest.skip("backend declares distinct_file_errors = False")
        monkeypatch.chdir(tmp_path)  # a backend that writes relative paths anyway must not litter your repo
        good = posixpath.join(tdir, "ok.txt")
        bad = ["relative/file.txt", posixpath.join(tdir, "nul\0byte"), posixpath.join(tdir, "..", "up.txt")]
        up = sandbox.upload([UploadItem(p, content=b"x") for p in bad] + [UploadItem(good, content=b"ok")])
        assert [(r.path, r.error) for r in up] == [(p, "invalid_path") for p in bad] + [(good, None)]
        down = sandbox.download([DownloadItem(p) for p in bad] + [DownloadItem(good)])
        assert [(r.path, r.error) for r in down] == [(p, "invalid_path") for p in bad] + [(good, None)]

    def test_files_directory_download_is_is_directory(self, sandbox: Sandbox, tdir: str) -> None:
        """Downloading a directory gives ``error="is_directory"``.

        Troubleshooting: if this fails, your ``sandbox_download`` must map "this is a directory" to
        ``FileResult(path, error="is_directory")``.
        """
        if not self.distinct_file_errors:
            pytest.skip("backend declares distinct_file_errors = False")
        (result,) = sandbox.download([DownloadItem(tdir)])
        assert (result.path, result.error) == (tdir, "is_directory")

    def test_files_upload_visible_to_commands(self, sandbox: Sandbox, tdir: str) -> None:
        """A file uploaded is readable by a command in the sandbox, byte for byte.

        Troubleshooting: if this fails, your ``sandbox_upload`` must write where commands see it (the
        same filesystem ``sandbox_exec`` runs in), and finish writing before returning.
        """
        path = posixpath.join(tdir, "in.txt")
        sandbox.write_file(path, b"line one\nline two\n")
        code, out, _ = sandbox.run(["sh", "-c", 'wc -l < "$1"; cat "$1"', "sh", path], timeout=60)
        assert code == 0
        assert out.split("\n", 1)[0].strip() == "2"
        assert out.split("\n", 1)[1] == "line one\nline two\n"

    def test_files_command_output_downloadable(self, sandbox: Sandbox, tdir: str) -> None:
        """A file written by a command can be downloaded.

        Troubleshooting: if this fails, your ``sandbox_download`` must read from the filesystem commands
        write to.
        """
        path = posixpath.join(tdir, "out.txt")
        code, _, _ = sandbox.run(["sh", "-c", 'printf "made by a command\\n" > "$1"', "sh", path], timeout=60)
        assert code == 0
        assert sandbox.read_file(path) == b"made by a command\n"


# The command and a background child of it (same process group) append to a heartbeat file each 0.1 s.
_HEARTBEATS = (
    'd=$1; mkdir -p "$d"; (while :; do echo x >> "$d/child"; sleep 0.1; done) & while :; do echo x >> "$d/parent"; sleep 0.1; done'
)


def _start_heartbeats(sb: Sandbox, timeout: float) -> None:
    sb.exec(["sh", "-c", _HEARTBEATS, "sh", posixpath.join(sb.handle.workdir, "kit-heartbeats")], timeout=timeout)


def _assert_heartbeats_stopped(sb: Sandbox, what: str) -> None:
    """Both heartbeats ran, and neither grows 1 s after the exec raised. A destroyed sandbox stopped them too."""
    probe = 'for f in parent child; do wc -c < "$1/$f" 2>/dev/null || echo 0; done'
    where = posixpath.join(sb.handle.workdir, "kit-heartbeats")
    time.sleep(1.0)
    try:
        first = sb.run(["sh", "-c", probe, "sh", where], timeout=60)[1].split()
        time.sleep(1.0)
        second = sb.run(["sh", "-c", probe, "sh", where], timeout=60)[1].split()
    except SandboxNotFoundError:
        return  # the facade destroyed the sandbox (it says so): nothing of it runs
    assert all(int(n) > 0 for n in first), "the command's heartbeats never started: %s" % first
    assert first == second, "%s kept running: heartbeat sizes (command, its child) went from %s to %s" % (what, first, second)


def _prefix_times(seen: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """(time, text received so far) pairs, so a word split across chunks is still found."""
    out, text = [], ""
    for t, chunk in seen:
        text += chunk
        out.append((t, text))
    return out


def _quota_cpus(cpu_max: str) -> float:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line ("max 100000" is unlimited)."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return float("inf")
    return int(parts[0]) / int(parts[1])


def _physical(sandbox: Sandbox, path: str) -> str:
    code, out, _ = sandbox.run(["sh", "-c", 'cd "$1" && pwd -P', "sh", path], timeout=60)
    assert code == 0, "cannot cd into %s" % path
    return out.strip()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha(path: Any) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["BackendConformance"]
