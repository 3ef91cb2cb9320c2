"""The Sandbox facade: contract checks, retries of idempotent operations only, capability refusals,
cleanup and timings. Scripted backends are real pluggy plugins registered with build_plugin_manager;
cleanup and refusals are also checked against the real ``local`` backend."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from metaflow_sandbox import (
    Backend,
    BackendContractError,
    Capabilities,
    DownloadItem,
    ExecResult,
    FileResult,
    Resources,
    SandboxError,
    SandboxFileError,
    SandboxHandle,
    SandboxNotFoundError,
    SandboxSpec,
    TransientBackendError,
    UnsupportedOptionError,
    UploadItem,
    hookimpl,
    line_splitter,
)
from metaflow_sandbox.plugins import build_plugin_manager


class Scripted:
    """A backend whose answers a test scripts: ``fail[hook] = n`` raises TransientBackendError n times."""

    def __init__(self, caps: Capabilities | None = None):
        self.calls: Counter[str] = Counter()
        self.fail: Counter[str] = Counter()
        self.answer: dict[str, Any] = {}
        self.caps = caps or Capabilities()

    def _do(self, hook: str, default: Any) -> Any:
        self.calls[hook] += 1
        if self.fail[hook] > 0:
            self.fail[hook] -= 1
            raise TransientBackendError("HTTP 503 from the provider")
        answer = self.answer.get(hook, default)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    @hookimpl
    def sandbox_capabilities(self, options):
        return self.caps

    @hookimpl
    def sandbox_create(self, spec):
        return self._do("sandbox_create", SandboxHandle("scripted", "sb-1"))

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, timeout, on_stdout, on_stderr):
        return self._do("sandbox_exec", ExecResult(0))

    @hookimpl
    def sandbox_upload(self, handle, files):
        return self._do("sandbox_upload", [FileResult(f.path) for f in files])

    @hookimpl
    def sandbox_download(self, handle, files):
        return self._do("sandbox_download", [FileResult(f.path, content=b"x") for f in files])

    @hookimpl
    def sandbox_destroy(self, handle):
        return self._do("sandbox_destroy", True)


@pytest.fixture
def scripted() -> tuple[Scripted, Backend]:
    plugin = Scripted()
    return plugin, Backend("scripted", pm=build_plugin_manager("scripted", plugin), backoff=0)


def test_none_answer_is_a_contract_error(scripted) -> None:
    plugin, backend = scripted
    sb = backend.create()
    plugin.answer["sandbox_exec"] = None
    with pytest.raises(BackendContractError) as info:
        sb.exec(["true"])
    assert "sandbox_exec" in str(info.value) and "ExecResult" in str(info.value)
    assert "docs/adding-a-backend.md" in str(info.value)


def test_wrong_type_answer_is_a_contract_error(scripted) -> None:
    plugin, backend = scripted
    plugin.answer["sandbox_create"] = {"id": "sb-1"}
    with pytest.raises(BackendContractError, match="returned 'dict' from sandbox_create"):
        backend.create()


def test_wrong_number_of_file_results_is_a_contract_error(scripted) -> None:
    plugin, backend = scripted
    sb = backend.create()
    plugin.answer["sandbox_upload"] = [FileResult("/a")]
    with pytest.raises(BackendContractError, match="returned 1 results for 2 files"):
        sb.upload([UploadItem("/a", content=b"1"), UploadItem("/b", content=b"2")])


@pytest.mark.parametrize("hook", ["sandbox_download", "sandbox_destroy", "sandbox_upload"])
def test_transient_errors_retried_for_idempotent_ops(scripted, hook: str) -> None:
    plugin, backend = scripted
    sb = backend.create()
    plugin.fail[hook] = 2
    run = {
        "sandbox_download": lambda: sb.download([DownloadItem("/f")]),
        "sandbox_destroy": sb.destroy,
        "sandbox_upload": lambda: sb.upload([UploadItem("/f", content=b"")]),
    }[hook]
    run()
    assert plugin.calls[hook] == 3
    assert len(backend.timings[hook]) == 3  # each attempt is timed


def test_retries_are_bounded(scripted) -> None:
    plugin, backend = scripted
    sb = backend.create()
    plugin.fail["sandbox_download"] = 10
    with pytest.raises(TransientBackendError):
        sb.download([DownloadItem("/f")])
    assert plugin.calls["sandbox_download"] == backend.retries + 1


def test_exec_is_never_retried(scripted) -> None:
    """Re-running user code silently could run it twice: a transient exec failure surfaces at once."""
    plugin, backend = scripted
    sb = backend.create()
    plugin.fail["sandbox_exec"] = 1
    with pytest.raises(TransientBackendError) as info:
        sb.exec(["python", "train.py"])
    assert plugin.calls["sandbox_exec"] == 1
    assert (info.value.backend, info.value.op, info.value.sandbox_id) == ("scripted", "sandbox_exec", "sb-1")


def test_create_retried_only_with_an_idempotency_key(scripted) -> None:
    plugin, backend = scripted
    plugin.fail["sandbox_create"] = 1
    with pytest.raises(TransientBackendError):
        backend.create(SandboxSpec())
    assert plugin.calls["sandbox_create"] == 1
    plugin.fail["sandbox_create"] = 1
    backend.create(SandboxSpec(idempotency_key="run-1/step/task-7/attempt-0"))
    assert plugin.calls["sandbox_create"] == 3


def test_unexpected_exception_becomes_a_named_sandbox_error(scripted) -> None:
    plugin, backend = scripted
    sb = backend.create()
    plugin.answer["sandbox_exec"] = KeyError("sandboxId")
    with pytest.raises(SandboxError) as info:
        sb.exec(["true"])
    assert "sandbox_exec raised KeyError" in str(info.value)
    assert "bug in the 'scripted' backend" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_gpu_on_local_is_refused_before_create() -> None:
    """The real local backend declares no GPUs: asking for one fails loudly with a fix."""
    with pytest.raises(UnsupportedOptionError) as info:
        Backend("local").create(SandboxSpec(resources=Resources(gpu=1)))
    assert "has no GPUs" in str(info.value)
    assert "remove gpu=" in info.value.hint


@pytest.mark.parametrize(
    "spec, caps, says",
    [
        (SandboxSpec(resources=Resources(gpu=1)), Capabilities(), "has no GPUs"),
        (SandboxSpec(resources=Resources(cpu=64)), Capabilities(max_cpu=4), "at most 4 CPUs"),
        (SandboxSpec(resources=Resources(memory_mb=10**6)), Capabilities(max_memory_mb=8192), "at most 8192 MB"),
        (SandboxSpec(ttl_seconds=86400 * 7), Capabilities(max_ttl_seconds=3600), "at most 3600s"),
        (SandboxSpec(network=False), Capabilities(network_toggle=False), "cannot cut the network"),
        (SandboxSpec(image="python:3.12"), Capabilities(images=False), "choosing an image"),
    ],
)
def test_capability_refusals_name_the_fix(spec: SandboxSpec, caps: Capabilities, says: str) -> None:
    plugin = Scripted(caps)
    backend = Backend("scripted", pm=build_plugin_manager("scripted", plugin))
    with pytest.raises(UnsupportedOptionError) as info:
        backend.create(spec)
    assert says in str(info.value) and info.value.hint
    assert plugin.calls["sandbox_create"] == 0


def test_context_manager_destroys_on_exception() -> None:
    """Real local sandbox: an exception inside ``with`` still destroys it, and the exception propagates."""
    with pytest.raises(RuntimeError, match="user code failed"):
        with Backend("local").create() as sb:
            assert sb.run(["true"], timeout=30)[0] == 0
            raise RuntimeError("user code failed")
    assert sb.destroyed
    assert sb.destroy() is False
    with pytest.raises(SandboxNotFoundError):
        sb.exec(["true"], timeout=30)


def test_destroy_failure_does_not_mask_the_original_error(scripted) -> None:
    plugin, backend = scripted
    plugin.answer["sandbox_destroy"] = SandboxError("provider said no")
    with pytest.raises(ValueError, match="original"):
        with backend.create():
            raise ValueError("original")


def test_timings_recorded_per_hook() -> None:
    backend = Backend("local")
    with backend.create() as sb:
        sb.run(["true"], timeout=30)
        sb.write_file(sb.handle.workdir + "/t.txt", b"t")
    for hook in ("sandbox_create", "sandbox_exec", "sandbox_upload", "sandbox_destroy"):
        assert len(backend.timings[hook]) == 1 and backend.timings[hook][0] >= 0


def test_read_file_raises_naming_the_path() -> None:
    with Backend("local").create() as sb:
        missing = sb.handle.workdir + "/missing.txt"
        with pytest.raises(SandboxFileError) as info:
            sb.read_file(missing)
    assert info.value.code == "file_not_found" and missing in str(info.value)


def test_command_must_be_an_argv_list(scripted) -> None:
    _, backend = scripted
    with pytest.raises(TypeError, match="argv list"):
        backend.create().exec("echo hi")  # type: ignore[arg-type]


def test_list_without_the_hook_is_refused(scripted) -> None:
    _, backend = scripted
    with pytest.raises(UnsupportedOptionError, match="cannot list"):
        backend.list()


def test_check_config_without_the_hook_is_true(scripted) -> None:
    assert scripted[1].check_config() is True


def test_line_splitter_joins_chunks_into_lines() -> None:
    lines: list[str] = []
    feed, flush = line_splitter(lines.append)
    for chunk in ["fir", "st\nsec", "ond\n", "\nlast"]:
        feed(chunk)
    assert lines == ["first\n", "second\n", "\n"]
    flush()
    assert lines[-1] == "last"


def test_open_sandbox_runs_a_command_in_a_real_local_sandbox():
    from metaflow_sandbox import open_sandbox

    with open_sandbox("local") as sb:
        code, out, err = sb.run(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    assert (code, out, err) == (3, "hi\n", "oops\n")
    assert sb.destroyed


def test_bare_api_create_is_marked_and_bounded():
    """Backend(name).create() with no spec: still findable by list/gc/kill, still ends on its own."""
    seen: list[SandboxSpec] = []

    class Recording(Scripted):
        @hookimpl
        def sandbox_create(self, spec):
            seen.append(spec)
            return SandboxHandle("scripted", "sb-1")

    backend = Backend("scripted", pm=build_plugin_manager("scripted", Recording(Capabilities(max_ttl_seconds=600))))
    backend.create()
    backend.create(SandboxSpec(labels={"team": "x"}, ttl_seconds=30))
    from metaflow_sandbox import MARKER_LABEL

    assert seen[0].labels[MARKER_LABEL] == "1" and seen[0].ttl_seconds == 600  # the default, capped by the backend
    assert seen[0].lease_seconds and seen[0].lease_seconds > 0
    assert seen[1].labels == {"team": "x", MARKER_LABEL: "1"} and seen[1].ttl_seconds == 30
