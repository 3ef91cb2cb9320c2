"""Emulator fidelity: the real, unpatched daytona SDK used directly, as the reference notes describe it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


@pytest.fixture
def sdk():
    from daytona import Daytona

    return Daytona()


@pytest.fixture
def sandbox(sdk):
    from daytona import CreateSandboxFromSnapshotParams

    sb = sdk.create(CreateSandboxFromSnapshotParams(labels={"test": "emulator"}, env_vars={"BASE": "b"}), timeout=0)
    yield sb
    try:
        sb.delete(timeout=0)
    except Exception:
        pass


def test_session_is_a_persistent_shell(sandbox):
    from daytona import SessionExecuteRequest

    p = sandbox.process
    p.create_session("s")
    p.execute_session_command("s", SessionExecuteRequest(command="mkdir -p sub && cd sub && export KEEP=kept"))
    out = p.execute_session_command("s", SessionExecuteRequest(command='pwd; echo "$KEEP $BASE"; echo oops >&2'))
    assert out.exit_code == 0
    assert out.stdout == "%s/sub\nkept b\n" % sandbox.get_work_dir()
    assert out.stderr == "oops\n"
    p.delete_session("s")


def test_async_command_log_stream_demuxes_and_closes_cleanly(sandbox):
    from daytona import SessionExecuteRequest

    p = sandbox.process
    p.create_session("w")
    cmd = p.execute_session_command("w", SessionExecuteRequest(command="echo a; echo b >&2; sleep 0.3; echo c; exit 7", run_async=True))
    assert cmd.exit_code is None
    seen: list[tuple[str, str]] = []
    asyncio.run(p.get_session_command_logs_async("w", cmd.cmd_id, lambda t: seen.append(("out", t)), lambda t: seen.append(("err", t))))
    assert "".join(t for k, t in seen if k == "out") == "a\nc\n"
    assert "".join(t for k, t in seen if k == "err") == "b\n"
    assert p.get_session_command("w", cmd.cmd_id).exit_code == 7
    logs = p.get_session_command_logs("w", cmd.cmd_id)
    assert (logs.stdout, logs.stderr) == ("a\nc\n", "b\n")


def test_process_exec_combined_output_and_timeout(sandbox):
    from daytona.common.errors import DaytonaTimeoutError

    res = sandbox.process.exec("echo out; echo err >&2; exit 3", env={"X": "1"})
    assert res.exit_code == 3 and sorted(res.result.split()) == ["err", "out"]
    with pytest.raises(DaytonaTimeoutError):
        sandbox.process.exec("sleep 5", timeout=1)


def test_files_stream_to_and_from_disk(sandbox, tmp_path):
    from daytona.common.errors import DaytonaNotFoundError

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 * 1024 * 1024))
    sandbox.fs.upload_file(str(big), "data/big.bin")
    sandbox.fs.upload_file(b"small", "/tmp/x/small.txt")
    back = tmp_path / "back.bin"
    sandbox.fs.download_file("data/big.bin", str(back))
    assert back.read_bytes() == big.read_bytes()
    assert sandbox.fs.download_file("/tmp/x/small.txt") == b"small"
    with pytest.raises(DaytonaNotFoundError):
        sandbox.fs.download_file("data/missing.txt")


def test_image_create_waits_for_started(sdk, emulator):
    from daytona import CreateSandboxFromImageParams, Resources

    emulator.set_faults(image_build_polls=3)
    sb = sdk.create(CreateSandboxFromImageParams(image="python:3.12-slim", resources=Resources(cpu=2, memory=2)), timeout=0)
    try:
        assert str(sb.state).lower().endswith("started")
        assert (sb.cpu, sb.memory) == (2, 2)
    finally:
        sb.delete(timeout=0)
    emulator.set_faults(image_build_polls=1)


def test_wrong_key_is_rejected(emulator):
    from daytona import Daytona, DaytonaConfig
    from daytona.common.errors import DaytonaAuthenticationError

    with pytest.raises(DaytonaAuthenticationError):
        list(Daytona(DaytonaConfig(api_key="nope", api_url=emulator.url, target="us")).list())


def test_cli_serves_on_the_given_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    faults = {"latency_ms": 1, "error_endpoints": ["list", "get"], "error_rate": 0.25, "seed": 3}
    cmd = [sys.executable, "-m", "metaflow_sandbox_daytona.emulator", "--port", str(port), "--faults", json.dumps(faults)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "DAYTONA_API_URL': 'http://127.0.0.1:%d/api'" % port in line, line
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        served = json.loads(opener.open("http://127.0.0.1:%d/_emulator/faults" % port, timeout=10).read())
        assert served["error_rate"] == 0.25 and served["error_endpoints"] == ["list", "get"] and served["seed"] == 3
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_sdk_falls_back_to_polling_without_socketio(emulator):
    """With socket.io refused (404) a fresh SDK client still sees an image build finish, by polling."""
    from daytona import CreateSandboxFromImageParams, Daytona

    emulator.set_faults(socketio=False, image_build_ms=60_000, image_build_polls=2)
    emulator.clear_requests()
    sb = Daytona().create(CreateSandboxFromImageParams(image="python:3.12-slim"), timeout=30)
    try:
        assert str(sb.state).lower().endswith("started")
        log = emulator.requests()
        assert [r["status"] for r in log if r["endpoint"] == "socketio"][:1] == [404]
        assert len([r for r in log if r["endpoint"] == "get"]) >= 2
    finally:
        sb.delete(timeout=0)


def test_socketio_pushes_state_events(emulator):
    """With socket.io on, the SDK learns "started" from the pushed event (well before its 1 s safety poll)."""
    from daytona import CreateSandboxFromImageParams, Daytona

    emulator.set_faults(image_build_ms=200, image_build_polls=10_000)
    d = Daytona()
    start = time.monotonic()
    sb = d.create(CreateSandboxFromImageParams(image="python:3.12-slim"), timeout=30)
    try:
        assert str(sb.state).lower().endswith("started")
        assert time.monotonic() - start < 5
    finally:
        sb.delete(timeout=0)


def test_unemulated_endpoint_is_a_clear_sdk_error(sandbox):
    from daytona.common.errors import DaytonaError

    with pytest.raises(DaytonaError, match="not emulated") as err:
        sandbox.fs.list_files("/tmp")
    assert err.value.status_code == 501
