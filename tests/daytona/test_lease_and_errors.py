"""Daytona's lease (auto-stop renewed while a command runs) and errors that name the setting to check."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from metaflow_sandbox import MARKER_LABEL, Backend, Resources, SandboxError, SandboxSpec


def _labels() -> dict[str, str]:
    return {MARKER_LABEL: "1", "run": uuid.uuid4().hex[:8]}


def _wait_gone(emulator, sandbox_id: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while any(s["id"] == sandbox_id for s in emulator.live_sandboxes()):
        assert time.monotonic() < deadline, "sandbox %s still alive after %ss" % (sandbox_id, seconds)
        time.sleep(0.1)
    (record,) = [r for r in emulator.records() if r["id"] == sandbox_id]
    return record


OWNER = textwrap.dedent(
    """
    import sys
    from metaflow_sandbox import Backend, SandboxSpec
    sb = Backend("daytona", options={"lease_renew_seconds": 0.1}).create(
        SandboxSpec(labels={"metaflow-sandbox": "1", "run": sys.argv[1]}, lease_seconds=60))
    print(sb.id, flush=True)
    sb.exec(["sleep", "60"])
    """
)


def test_lease_alone_deletes_a_sandbox_whose_owner_was_sigkilled(emulator):
    """Every owner gone (SIGKILL: no cleanup ran): no renewal, so auto-stop then auto-delete end the sandbox."""
    emulator.set_faults(time_scale=1.0 / 60)  # the 1-minute lease lasts 1 s
    proc = subprocess.Popen([sys.executable, "-c", OWNER, uuid.uuid4().hex[:8]], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        sandbox_id = proc.stdout.readline().strip()
        assert sandbox_id, "the owner did not create a sandbox"
        time.sleep(2.5)  # the running command outlives its lease only because the owner renews it
        assert any(s["id"] == sandbox_id for s in emulator.live_sandboxes()), "renewed lease must keep it alive"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        record = _wait_gone(emulator, sandbox_id, 10)
        assert record["reason"] == "auto-deleted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("renew, survives", [(0.1, True), (0, False)], ids=["renewed", "not-renewed"])
def test_a_long_command_is_kept_alive_by_its_renewed_lease(emulator, renew, survives):
    """A command longer than the lease survives only because the owner renews the lease (the control shows it)."""
    emulator.set_faults(time_scale=0.5 / 60)  # the 1-minute lease lasts 0.5 s; the command runs 3 s
    backend = Backend("daytona", options={"lease_renew_seconds": renew})
    sb = backend.create(SandboxSpec(labels=_labels(), lease_seconds=60))
    try:
        if survives:
            assert sb.run(["sh", "-c", "sleep 3; echo done"], timeout=30)[:2] == (0, "done\n")
            assert any(s["id"] == sb.id for s in emulator.live_sandboxes())
        else:
            with pytest.raises(SandboxError):
                sb.run(["sh", "-c", "sleep 3; echo done"], timeout=30)
            assert _wait_gone(emulator, sb.id, 10)["reason"] == "auto-deleted"
    finally:
        sb.destroy()


@pytest.fixture
def html_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def _html(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a login page</html>")

        do_GET = do_POST = do_DELETE = _html

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d/api" % server.server_port
    server.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["refused", "not-daytona", "bad-key"])
@pytest.mark.parametrize("op", ["create", "list"])
def test_wrong_url_or_key_names_the_setting(emulator, html_server, case, op):
    url = {"refused": "http://127.0.0.1:%d/api" % _free_port(), "not-daytona": html_server, "bad-key": emulator.url}[case]
    key = "wrong-key" if case == "bad-key" else emulator.api_key
    backend = Backend("daytona", options={"api_url": url, "api_key": key, "retry_seconds": 1})
    before = len(emulator.records())
    start = time.monotonic()
    with pytest.raises(SandboxError) as err:
        if op == "create":
            backend.create(SandboxSpec(labels=_labels()))
        else:
            backend.list({})
    text = str(err.value)
    assert time.monotonic() - start < 15
    assert "Fix:" in text and "Traceback" not in text
    assert "DAYTONA_API_KEY" in text
    if case != "bad-key":
        assert "DAYTONA_API_URL" in text and url in text
    else:
        assert "401" in text and "rejected the API key" in text
    assert len(emulator.records()) == before, "nothing was created"


def test_forbidden_names_the_plan_and_the_key(emulator):
    backend = Backend("daytona", options={"max_cpu": 64})
    with pytest.raises(SandboxError) as err:
        backend.create(SandboxSpec(image="python:3.12-slim", labels=_labels(), resources=Resources(cpu=8)))
    text = str(err.value)
    assert "403" in text and "DAYTONA_API_KEY" in text and "limits" in text
    assert emulator.live_sandboxes() == []
