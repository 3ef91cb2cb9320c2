"""An offline emulator of the Daytona API that the real ``daytona`` SDK talks to.

    from metaflow_sandbox_daytona.emulator import start_emulator
    with start_emulator(port=0, latency_ms=5) as emu:
        os.environ.update(emu.env)      # DAYTONA_API_URL / DAYTONA_API_KEY / DAYTONA_TARGET / NO_PROXY
        ...
        emu.live_sandboxes()            # [{"id", "labels", "state", ...}] not yet deleted
        emu.set_faults(error_next=2, error_endpoints=["list"])

The server runs in a subprocess (``python -m metaflow_sandbox_daytona.emulator``); this module
imports neither aiohttp nor the SDK. Commands run in sandboxes of the core's ``local`` backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

DEFAULT_KEY = "emulator-key"


class EmulatorHandle:
    """A running emulator process and its admin API."""

    def __init__(self, proc: subprocess.Popen, url: str, api_key: str, log_path: str):
        self.proc = proc
        self.url = url
        self.base = url[: -len("/api")]
        self.api_key = api_key
        self.log_path = log_path

    @property
    def env(self) -> dict[str, str]:
        """What a launcher needs in its environment to use the emulator (and stay offline)."""
        no_proxy = "127.0.0.1,localhost"
        return {
            "DAYTONA_API_URL": self.url,
            "DAYTONA_API_KEY": self.api_key,
            "DAYTONA_TARGET": "us",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + "/_emu/" + path, data=data, method=method, headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def live_sandboxes(self) -> list[dict[str, Any]]:
        """Sandboxes not yet deleted: dicts with id, name, labels, state, workdir, request (the create body)."""
        return self._admin("GET", "sandboxes")

    def records(self) -> list[dict[str, Any]]:
        """Every sandbox ever created: id, request (create body), deleted (time or None), reason."""
        return self._admin("GET", "records")

    def requests(self) -> list[dict[str, Any]]:
        """The request log (method, path, query, endpoint, status, ms); admin calls are not logged."""
        return self._admin("GET", "requests")

    def clear_requests(self) -> None:
        self._admin("DELETE", "requests")

    def faults(self) -> dict[str, Any]:
        return self._admin("GET", "faults")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        return self._admin("POST", "faults", faults)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_emulator(port: int = 0, api_key: str = DEFAULT_KEY, timeout: float = 30.0, **faults: Any) -> EmulatorHandle:
    """Start the emulator on 127.0.0.1 in a subprocess and wait until it serves requests."""
    log = tempfile.NamedTemporaryFile(prefix="daytona-emulator-", suffix=".log", delete=False)
    cmd = [
        sys.executable,
        "-m",
        "metaflow_sandbox_daytona.emulator",
        "--port",
        str(port),
        "--api-key",
        api_key,
        "--faults",
        json.dumps(faults),
        "--parent-pid",
        str(os.getpid()),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ))
    found: list[str] = []

    def read_ready() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("DAYTONA_EMULATOR_READY "):
                found.append(line.split(None, 1)[1].strip())
                break

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        proc.wait()
        raise RuntimeError("the Daytona emulator did not start within %ss; its log: %s\n%s" % (timeout, log.name, _tail(log.name)))
    handle = EmulatorHandle(proc, found[0], api_key, log.name)
    _wait_healthy(handle, time.monotonic() + timeout)
    return handle


def _wait_healthy(handle: EmulatorHandle, deadline: float) -> None:
    while True:
        try:
            handle._admin("GET", "health")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _tail(path: str, n: int = 4000) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return None


__all__ = ["EmulatorHandle", "start_emulator"]
