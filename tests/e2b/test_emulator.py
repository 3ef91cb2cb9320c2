"""The emulator speaks E2B's wire protocol: the raw, unpatched e2b SDK exercised directly against it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid

import e2b
import pytest
from metaflow_sandbox_e2b.emulator import EmulatorHandle, start_emulator


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def sbx(tag: str):
    sandbox = e2b.Sandbox.create(timeout=120, metadata={"emu-test": tag}, envs={"FROM_CREATE": "yes"})
    yield sandbox
    sandbox.kill()


def test_create_run_files_kill_round_trip(sbx) -> None:
    sbx.files.write("/home/user/job/a.txt", "text via multipart")
    sbx.files.write("job/b.bin", io.BytesIO(b"\x00\xff" * 50_000))  # relative to home, octet-stream
    result = sbx.commands.run("cat a.txt; wc -c < b.bin; echo $FROM_CREATE $EXTRA", cwd="/home/user/job",
                              envs={"EXTRA": "1"}, timeout=0)  # fmt: skip
    assert result.stdout == "text via multipart100000\nyes 1\n"
    assert sbx.files.read("/home/user/job/a.txt") == "text via multipart"
    assert bytes(sbx.files.read("/home/user/job/b.bin", format="bytes")) == b"\x00\xff" * 50_000
    with sbx.files.read("/home/user/job/b.bin", format="stream") as stream:
        assert sum(len(c) for c in stream) == 100_000
    with pytest.raises(e2b.FileNotFoundException):
        sbx.files.read("/home/user/nope")
    assert sbx.is_running() is True


def test_exit_codes_background_and_kill(sbx) -> None:
    with pytest.raises(e2b.CommandExitException) as info:
        sbx.commands.run("echo out; exit 7")
    assert (info.value.exit_code, info.value.stdout, info.value.error) == (7, "out\n", "exit status 7")
    ticks: list[str] = []
    handle = sbx.commands.run("for i in 1 2 3; do echo tick $i; sleep 0.2; done", background=True)
    assert handle.wait(on_stdout=ticks.append).exit_code == 0
    assert "".join(ticks) == "tick 1\ntick 2\ntick 3\n"
    slow = sbx.commands.run("sleep 30", background=True, timeout=0)
    assert [p.pid for p in sbx.commands.list()] == [slow.pid]
    start = time.monotonic()
    assert slow.kill() is True
    with pytest.raises(e2b.CommandExitException) as killed:
        slow.wait()
    assert (killed.value.exit_code, killed.value.error) == (-1, "signal: killed")
    assert time.monotonic() - start < 3
    assert slow.kill() is False  # NOT_FOUND once it is gone


def test_sdk_command_timeout_is_enforced_server_side(sbx) -> None:
    start = time.monotonic()
    with pytest.raises(e2b.TimeoutException):
        sbx.commands.run("sleep 5; touch /home/user/late", timeout=1)
    assert time.monotonic() - start < 10
    time.sleep(5)
    assert sbx.files.exists("/home/user") is True
    assert sbx.files.exists("/home/user/late") is False  # envd kills the command at its deadline


def test_keepalives_during_silence(sbx, emulator: EmulatorHandle) -> None:
    emulator.set_faults(keepalive_every=0.3)
    before = emulator.stats().get("keepalive", 0)
    assert sbx.commands.run("sleep 2; echo after-silence", timeout=0).stdout == "after-silence\n"
    assert emulator.stats().get("keepalive", 0) - before >= 3


def test_list_paging_metadata_and_info(tag: str) -> None:
    made = [e2b.Sandbox.create(timeout=60, metadata={"emu-test": tag, "i": str(i), "odd key": "a=b&c"}) for i in range(3)]
    try:
        pages = e2b.Sandbox.list(query=e2b.SandboxQuery(metadata={"emu-test": tag}), limit=2)
        first = pages.next_items()
        assert len(first) == 2 and pages.has_next
        second = pages.next_items()
        assert len(second) == 1 and not pages.has_next
        assert {s.sandbox_id for s in first + second} == {s.sandbox_id for s in made}
        odd = e2b.Sandbox.list(query=e2b.SandboxQuery(metadata={"odd key": "a=b&c", "i": "1"})).next_items()
        assert [s.sandbox_id for s in odd] == [made[1].sandbox_id]
        info = made[0].get_info()
        assert (info.cpu_count, info.memory_mb, info.metadata["i"]) == (2, 512, "0")
    finally:
        for s in made:
            s.kill()


def test_timeout_connect_and_expiry(emulator: EmulatorHandle, tag: str) -> None:
    sandbox = e2b.Sandbox.create(timeout=60, metadata={"emu-test": tag})
    sandbox.set_timeout(1)  # shortening is allowed
    time.sleep(2)
    assert sandbox.sandbox_id not in [s["id"] for s in emulator.live_sandboxes()]
    assert sandbox.is_running() is False
    with pytest.raises(e2b.SandboxNotRunningException):
        sandbox.commands.run("true")
    with pytest.raises(e2b.SandboxNotFoundException):
        e2b.Sandbox.connect(sandbox.sandbox_id)
    assert e2b.Sandbox.kill(sandbox.sandbox_id) is False
    assert emulator.stats().get("expired", 0) >= 1


def test_auth_checked(emulator: EmulatorHandle) -> None:
    with pytest.raises(e2b.AuthenticationException):
        e2b.Sandbox.create(api_key="wrong-key")


def test_plan_cap_and_concurrency_limit() -> None:
    with start_emulator(port=0, plan="hobby", max_sandboxes=1) as emu:
        params = {"api_key": emu.api_key, "api_url": emu.url, "sandbox_url": emu.info["sandbox_url"]}
        with pytest.raises(e2b.SandboxException, match="400"):
            e2b.Sandbox.create(timeout=7200, **params)
        first = e2b.Sandbox.create(timeout=60, **params)
        with pytest.raises(e2b.RateLimitException, match="maximum number of concurrent"):
            e2b.Sandbox.create(timeout=60, retries=0, **params)
        first.kill()
        assert emu.live_sandboxes() == []


def test_cli_starts_and_stops() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "metaflow_sandbox_e2b.emulator", "--port", "0", "--ready", "--parent-pid", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("METAFLOW_SANDBOX_EMULATOR_READY ") and '"E2B_API_URL": "http://127.0.0.1:' in line
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(timeout=15) == 0


def test_multi_file_multipart_and_gzip_upload(sbx) -> None:
    infos = sbx.files.write_files([{"path": "/home/user/m/one.txt", "data": "1"}, {"path": "/home/user/m/two.txt", "data": b"22"}])
    assert [i.path for i in infos] == ["/home/user/m/one.txt", "/home/user/m/two.txt"]
    sbx.files.write("/home/user/m/zipped.bin", io.BytesIO(b"z" * 10_000), gzip=True)
    out = sbx.commands.run("cat m/one.txt m/two.txt; wc -c < m/zipped.bin", timeout=0).stdout
    assert out == "12210000\n"


def test_unknown_fault_names_are_refused(emulator: EmulatorHandle) -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        emulator.set_faults(latency=0.005)  # the old E2B name: the error lists the known ones
    with pytest.raises(ValueError, match="unknown endpoint"):
        emulator.set_faults(error_endpoints=["Process/Start"])
    with pytest.raises(ValueError, match="vanish"):
        start_emulator(port=0, vanish=1)
