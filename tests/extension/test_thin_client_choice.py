"""Which thin client the fast path uses: bash only where it can reach the server through /dev/tcp."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
from metaflow_extensions.sandbox_core.plugins import sandbox_server


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def _nothing_queued(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.accept()[0].close()
        return False
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_a_bash_that_reaches_the_listener_is_chosen_and_its_probe_leaves_nothing_queued(listener, monkeypatch):
    monkeypatch.delenv(sandbox_server.CLIENT_ENV, raising=False)
    assert sandbox_server._bash_with_tcp(listener) == shutil.which("bash")
    assert _nothing_queued(listener)  # the server will not see the probe as a request


def test_a_bash_without_dev_tcp_means_the_python_client(listener, monkeypatch, tmp_path):
    fake = tmp_path / "bash"
    fake.write_text("#!/bin/sh\n# a bash built without network redirections: /dev/tcp is just a missing file\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "%s%s%s" % (tmp_path, os.pathsep, os.environ.get("PATH", "")))
    monkeypatch.delenv(sandbox_server.CLIENT_ENV, raising=False)
    assert sandbox_server._bash_with_tcp(listener) is None


def test_the_python_client_on_request(listener, monkeypatch):
    monkeypatch.setenv(sandbox_server.CLIENT_ENV, "python")
    assert sandbox_server._bash_with_tcp(listener) is None
