"""E2B backend behaviour beyond the kit: templates, labels/list, idempotent create, long and chatty commands,
timeouts, plan caps, credentials. The real e2b SDK talks to the emulator over HTTP throughout."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid

import pytest
from metaflow_sandbox import (
    MARKER_LABEL,
    Backend,
    BackendNotConfiguredError,
    Resources,
    SandboxError,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
    UnsupportedOptionError,
)
from metaflow_sandbox_e2b.emulator import EmulatorHandle
from metaflow_sandbox_e2b.settings import PLANS
from metaflow_sandbox_e2b.templates import ladder, pick_template, template_name

from .conftest import _execs


@pytest.fixture
def backend() -> Backend:
    return Backend("e2b")


@pytest.fixture
def labels() -> dict[str, str]:
    return {MARKER_LABEL: "1", "flow": "BackendFlow", "run": uuid.uuid4().hex[:8], "step": "start", "task": "1"}


def _by_id(emulator: EmulatorHandle, sandbox_id: str) -> dict:
    (info,) = [s for s in emulator.live_sandboxes() if s["id"] == sandbox_id]
    return info


# -- templates ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cpu, memory, expected",
    [
        (1, 512, "c1-m1024"),
        (1, 1024, "c1-m1024"),
        (2, None, "c2-m1024"),
        (3, 3000, "c4-m4096"),
        (None, 5000, "c1-m8192"),
        (8, 8192, "c8-m8192"),
        (0.5, 2048, "c1-m2048"),
    ],
)
def test_template_ladder_picks_smallest_fit(cpu, memory, expected) -> None:
    name = pick_template(Resources(cpu=cpu, memory_mb=memory), "python:3.11-slim", {})
    assert name == "metaflow-sandbox-python-3-11-slim-" + expected


def test_no_resources_no_image_uses_stock_base_template() -> None:
    assert pick_template(Resources(), None, {}) == "base"
    assert pick_template(Resources(cpu=2), None, {}) == "metaflow-sandbox-base-c2-m1024"


def test_template_option_overrides_mapping() -> None:
    assert pick_template(Resources(cpu=8, memory_mb=8192), "python:3.11", {"template": "my-own"}) == "my-own"


def test_too_big_for_plan_names_the_fix() -> None:
    with pytest.raises(UnsupportedOptionError) as info:
        pick_template(Resources(cpu=4, memory_mb=16384), None, {})
    assert "METAFLOW_SANDBOX_E2B_PLAN" in str(info.value)
    assert pick_template(Resources(cpu=4, memory_mb=16384), None, {"plan": "pro"}).endswith("-c4-m16384")


def test_ladder_capped_by_plan() -> None:
    assert max(m for _, m in ladder(PLANS["hobby"])) == 8192
    assert max(m for _, m in ladder(PLANS["pro"])) == 16384
    assert len(ladder(PLANS["hobby"])) == 16 and len(ladder(PLANS["pro"])) == 20


def test_created_sandbox_has_the_template_size(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    with backend.create(SandboxSpec(resources=Resources(cpu=3, memory_mb=3000), labels=labels, ttl_seconds=600)) as sb:
        info = _by_id(emulator, sb.id)
        assert info["template"] == template_name(None, 4, 4096)
        assert (info["cpu"], info["memory_mb"]) == (4, 4096)


def test_too_big_request_refused_before_any_request(backend: Backend, emulator: EmulatorHandle) -> None:
    before = emulator.stats().get("api_requests", 0)
    with pytest.raises(UnsupportedOptionError, match=r"at most 8(\.0)? CPUs"):
        backend.create(SandboxSpec(resources=Resources(cpu=16)))
    with pytest.raises(UnsupportedOptionError, match="no GPUs"):
        backend.create(SandboxSpec(resources=Resources(gpu=1)))
    assert emulator.stats().get("api_requests", 0) == before


def test_unknown_template_error_names_the_build_command(emulator: EmulatorHandle) -> None:
    with pytest.raises(UnsupportedOptionError) as info:
        Backend("e2b", options={"template": "never-built"}).create(SandboxSpec(ttl_seconds=60))
    assert "metaflow_sandbox_e2b.templates build" in str(info.value)


def test_custom_template_option(emulator: EmulatorHandle, labels) -> None:
    with Backend("e2b", options={"template": "custom-big"}).create(SandboxSpec(labels=labels, ttl_seconds=60)) as sb:
        assert _by_id(emulator, sb.id)["cpu"] == 4


def test_templates_command_dry_run_prints_the_plan() -> None:
    cmd = [sys.executable, "-m", "metaflow_sandbox_e2b.templates", "build", "--base", "python:3.11", "--dry-run"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    names = [line.split("\t")[0] for line in out.splitlines() if line.startswith("metaflow-sandbox-")]
    assert len(names) == 16
    assert "metaflow-sandbox-python-3-11-c4-m8192\tcpu=4\tmemory_mb=8192\tbase=python:3.11" in out
    pro = subprocess.run(cmd + ["--plan", "pro", "--only", "c8-m16384"], capture_output=True, text=True, timeout=60)
    assert pro.returncode == 0 and "metaflow-sandbox-python-3-11-c8-m16384" in pro.stdout


def test_templates_command_without_key_fails_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "E2B_API_KEY"}
    cmd = [sys.executable, "-m", "metaflow_sandbox_e2b.templates", "build", "--only", "c1-m1024"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "E2B_API_KEY" in proc.stderr


# -- labels, list, idempotency -----------------------------------------------------------------
def test_labels_become_metadata_and_list_filters(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    a = backend.create(SandboxSpec(labels=labels, env={"STEP_VAR": "x"}, ttl_seconds=600))
    b = backend.create(SandboxSpec(labels={**labels, "step": "end"}, ttl_seconds=600))
    try:
        assert _by_id(emulator, a.id)["labels"] == labels
        assert {s.id for s in backend.list({"run": labels["run"]})} == {a.id, b.id}
        listed = backend.list({"run": labels["run"], "step": "start"})
        assert [s.id for s in listed] == [a.id]
        assert listed[0].handle.labels == labels
        # a listed handle is usable: it reconnects on first use
        assert listed[0].run(["sh", "-c", 'printf "$STEP_VAR"'])[:2] == (0, "x")
        assert listed[0].destroy() is True
        assert a.destroy() is False
    finally:
        b.destroy()
        a.destroy()


def test_idempotent_create_same_key_one_sandbox(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    spec = SandboxSpec(labels=labels, ttl_seconds=600, idempotency_key="Run_1/start/1 attempt:0")
    first = backend.create(spec)
    second = backend.create(spec)
    try:
        assert first.id == second.id
        assert len([s for s in emulator.live_sandboxes() if s["labels"].get("run") == labels["run"]]) == 1
    finally:
        first.destroy()


def test_create_response_lost_then_retried_makes_one_sandbox(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    """The SDK retries create on 503; with our idempotency key the retry returns the same sandbox."""
    before = emulator.stats()
    emulator.set_faults(lost_reply_next=1, lost_reply_status=503, lost_reply_endpoints=["create"])
    sb = backend.create(SandboxSpec(labels=labels, ttl_seconds=600, idempotency_key="lost-" + labels["run"]))
    try:
        after = emulator.stats()
        assert after.get("create", 0) - before.get("create", 0) == 1
        assert after.get("create_idempotent_hit", 0) - before.get("create_idempotent_hit", 0) == 1
        assert [s["id"] for s in emulator.live_sandboxes() if s["labels"].get("run") == labels["run"]] == [sb.id]
    finally:
        sb.destroy()


def test_without_key_the_same_fault_duplicates(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    """Shows the fault is real: with no idempotency key, the SDK's retry creates a second sandbox."""
    emulator.set_faults(lost_reply_next=1, lost_reply_status=503, lost_reply_endpoints=["create"])
    sb = backend.create(SandboxSpec(labels=labels, ttl_seconds=600))
    mine = [s["id"] for s in emulator.live_sandboxes() if s["labels"].get("run") == labels["run"]]
    try:
        assert len(mine) == 2 and sb.id in mine
    finally:
        for leftover in backend.list({"run": labels["run"]}):
            leftover.destroy()


# -- exec ----------------------------------------------------------------------------------------
@pytest.fixture
def sandbox(backend: Backend, labels):
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=900)) as sb:
        yield sb


@pytest.mark.slow
def test_command_longer_than_sdk_default_60s(sandbox) -> None:
    """The SDK's default command timeout is 60 s; steps run longer. 65 s with output every 5 s."""
    lines: list[str] = []
    start = time.monotonic()
    result = sandbox.exec(
        ["sh", "-c", "for i in $(seq 1 13); do echo tick $i; sleep 5; done; echo finished"],
        on_stdout=lines.append,
    )
    assert result.exit_code == 0
    assert time.monotonic() - start >= 64
    text = "".join(lines)
    assert text == "".join("tick %d\n" % i for i in range(1, 14)) + "finished\n"


def test_twenty_megabytes_of_output_in_order(sandbox) -> None:
    count = 2_800_000  # `seq 1 2800000` prints 21,288,896 bytes (> 20 MiB)
    digest, size = hashlib.sha256(), 0

    def collect(chunk: str) -> None:
        nonlocal size
        data = chunk.encode()
        size += len(data)
        digest.update(data)

    result = sandbox.exec(["seq", "1", str(count)], on_stdout=collect, timeout=300)
    expected = "".join("%d\n" % i for i in range(1, count + 1)).encode()
    assert result.exit_code == 0
    assert size == len(expected) == 21_288_896
    assert digest.hexdigest() == hashlib.sha256(expected).hexdigest()


def test_timeout_kills_and_command_ran_once(sandbox, emulator: EmulatorHandle) -> None:
    counter = sandbox.handle.workdir + "/runs.txt"
    execs_before = _execs(emulator, sandbox.id)
    start = time.monotonic()
    with pytest.raises(SandboxTimeoutError):
        sandbox.exec(["sh", "-c", 'echo run >> "$0"; sleep 20; echo late >> "$0"', counter], timeout=4)  # room for a slow start
    assert time.monotonic() - start < 10
    time.sleep(1)
    assert sandbox.read_file(counter) == b"run\n"
    assert _execs(emulator, sandbox.id) == execs_before + 1  # one Process/Start: never re-run
    assert sandbox.run(["true"])[0] == 0  # the sandbox stays usable


def test_nonzero_exit_is_a_result_with_streams(sandbox) -> None:
    code, out, err = sandbox.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (code, out, err) == (7, "out\n", "err\n")


def test_argv_is_quoted_not_shell_parsed(sandbox) -> None:
    tricky = "a b; echo INJECTED $HOME 'q' \"dq\" `x`"
    code, out, _ = sandbox.run(["printf", "%s", tricky])
    assert (code, out) == (0, tricky)


def test_env_from_create_and_exec(backend: Backend, labels) -> None:
    with backend.create(SandboxSpec(labels=labels, env={"FROM_CREATE": "c", "BOTH": "create"}, ttl_seconds=60)) as sb:
        code, out, _ = sb.run(["sh", "-c", 'printf "%s %s %s" "$FROM_CREATE" "$BOTH" "$FROM_EXEC"'],
                              env={"BOTH": "exec", "FROM_EXEC": "e"})  # fmt: skip
        assert (code, out) == (0, "c exec e")


# -- lifetime ------------------------------------------------------------------------------------
def test_sandbox_dies_at_its_ttl(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    sb = backend.create(SandboxSpec(labels=labels, ttl_seconds=2))
    time.sleep(3)
    assert sb.id not in [s["id"] for s in emulator.live_sandboxes()]
    with pytest.raises(SandboxNotFoundError):
        sb.exec(["true"])
    assert sb.destroy() is False


def test_lease_renewed_while_a_command_runs(emulator: EmulatorHandle, labels) -> None:
    """Created with a 6 s lease; a 12 s command keeps the sandbox alive by renewing it."""
    backend = Backend("e2b", options={"lease_seconds": 6})
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=600)) as sb:
        assert 0 < _by_id(emulator, sb.id)["expires_in"] <= 6
        assert sb.exec(["sleep", "12"]).exit_code == 0
        assert sb.run(["true"])[0] == 0


def test_ttl_over_plan_cap_fails_naming_the_option(backend: Backend, emulator: EmulatorHandle) -> None:
    with pytest.raises(UnsupportedOptionError):
        backend.create(SandboxSpec(ttl_seconds=2 * 3600))
    from metaflow_sandbox_e2b import plugin

    with pytest.raises(UnsupportedOptionError, match="METAFLOW_SANDBOX_E2B_PLAN"):
        plugin.sandbox_create(spec=SandboxSpec(ttl_seconds=2 * 3600))
    pro = Backend("e2b", options={"plan": "pro"})
    assert pro.capabilities().max_ttl_seconds == 86400


# -- credentials -----------------------------------------------------------------------------------
def test_missing_key_fails_before_any_request(emulator: EmulatorHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("E2B_API_KEY")
    before = emulator.stats().get("api_requests", 0)
    with pytest.raises(BackendNotConfiguredError) as info:
        Backend("e2b").create(SandboxSpec(ttl_seconds=60))
    assert info.value.variable == "E2B_API_KEY"
    assert "METAFLOW_SANDBOX_E2B_API_KEY" in str(info.value)
    with pytest.raises(BackendNotConfiguredError):
        Backend("e2b").check_config()
    assert emulator.stats().get("api_requests", 0) == before
    assert Backend("e2b", options={"api_key": "emulator-key"}).check_config() is True


def test_wrong_key_is_a_clear_error(emulator: EmulatorHandle) -> None:
    with pytest.raises(SandboxError, match="E2B_API_KEY"):
        Backend("e2b", options={"api_key": "wrong"}).create(SandboxSpec(ttl_seconds=60))


def test_capabilities(backend: Backend) -> None:
    caps = backend.capabilities()
    assert (caps.gpu, caps.binds, caps.images, caps.shares_host_filesystem) == (False, False, True, False)
    assert (caps.max_cpu, caps.max_memory_mb, caps.max_ttl_seconds) == (8.0, 8192, 3600.0)
    assert "E2B_API_KEY" in caps.config_env


# -- network ---------------------------------------------------------------------------------------
def test_network_toggle(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    """network=False becomes allow_internet_access=False; the sandbox then cannot reach a host port."""
    port = emulator.url.rsplit(":", 1)[1]
    probe = ["bash", "-c", 'exec 3<>"/dev/tcp/127.0.0.1/$0" && echo open || echo closed', port]
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=60)) as online:
        assert online.run(probe)[1] == "open\n"
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=60, network=False)) as offline:
        assert offline.run(probe)[1].endswith("closed\n")
