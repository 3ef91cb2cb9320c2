"""An offline E2B emulator that the real ``e2b`` SDK talks to over HTTP (tests, CI, benchmarks).

    from metaflow_sandbox_e2b.emulator import start_emulator
    with start_emulator(port=0, latency=0.05) as emu:
        os.environ.update(emu.env)      # E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL, NO_PROXY
        ...
        emu.live_sandboxes()            # [{"id", "metadata", "state", ...}]
        emu.set_faults(error_rate=0.3)  # replaces all faults; set_faults() clears them

The server runs in a subprocess (its own event loop; commands run in `local` backend sandboxes),
and exits by itself if this process dies. Faults: see ``state.Faults``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from typing import Any

from .state import Faults

API_KEY = "emulator-key"


class Emulator:
    """A running emulator subprocess. Use as a context manager, or call ``stop()``."""

    def __init__(self, proc: subprocess.Popen, url: str, sandbox_url: str, api_key: str):
        self.proc = proc
        self.url = url
        self.sandbox_url = sandbox_url
        self.api_key = api_key

    @property
    def env(self) -> dict[str, str]:
        """Environment a launcher needs to point the real SDK (and our backend) here, offline."""
        no_proxy = "127.0.0.1,localhost"
        return {
            "E2B_API_KEY": self.api_key,
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.sandbox_url,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def _admin(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        req.add_header("Content-Type", "application/json")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def live_sandboxes(self) -> list[dict[str, Any]]:
        """Sandboxes neither killed nor expired: dicts with id, metadata, state, template, cpu, memory_mb, ..."""
        return self._admin("/_emulator/sandboxes")

    def all_sandboxes(self) -> list[dict[str, Any]]:
        """Every sandbox ever created, dead ones too ("state": running | killed | expired | vanished)."""
        return self._admin("/_emulator/sandboxes?all=1")

    def stats(self) -> dict[str, Any]:
        """Counters: create, create_idempotent_hit, killed, expired, vanished, injected_<status>, execs per sandbox."""
        return self._admin("/_emulator/stats")

    def set_faults(self, **faults: Any) -> None:
        """Replace the fault settings (unnamed ones go back to off). Names: see ``state.Faults``."""
        Faults.from_dict(faults)  # a misspelt fault is a ValueError here, not a silent no-op
        self._admin("/_emulator/faults", faults)

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()  # the emulator stops at stdin EOF (and kills its sandboxes)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_emulator(
    port: int = 0,
    *,
    envd_port: int = 0,
    api_key: str = API_KEY,
    plan: str = "hobby",
    max_sandboxes: int | None = None,
    templates: dict[str, tuple[int, int]] | None = None,
    ready_timeout: float = 30.0,
    **faults: Any,
) -> Emulator:
    """Start the emulator on 127.0.0.1 in a subprocess and wait until it serves."""
    Faults.from_dict(faults)  # fail fast, in this process, on an unknown fault name
    cmd = [
        sys.executable, "-m", "metaflow_sandbox_e2b.emulator",
        "--port", str(port), "--envd-port", str(envd_port), "--api-key", api_key, "--plan", plan,
        "--faults", json.dumps(faults), "--ready-json", "--exit-on-stdin-eof",
    ]  # fmt: skip
    if max_sandboxes is not None:
        cmd += ["--max-sandboxes", str(max_sandboxes)]
    for name, (cpu, mem) in (templates or {}).items():
        cmd += ["--template", "%s=%d:%d" % (name, cpu, mem)]
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(ready_timeout)
    if not line or not line[0]:
        proc.kill()
        raise RuntimeError(
            "the E2B emulator did not start within %ss (exit code %s); is the 'emulator' extra installed? "
            "pip install 'metaflow-sandbox-e2b[emulator]'" % (ready_timeout, proc.poll())
        )
    info = json.loads(line[0])
    return Emulator(proc, info["api_url"], info["sandbox_url"], api_key)


__all__ = ["API_KEY", "Emulator", "start_emulator"]
