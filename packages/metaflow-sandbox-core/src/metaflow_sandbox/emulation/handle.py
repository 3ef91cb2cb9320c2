"""The launcher's side: start an emulator in a child process, wait for its handshake, drive its admin API.

Nothing here imports aiohttp or a provider SDK. The child prints one line, ``READY`` followed by JSON
(its URLs, the environment the SDK needs, its endpoint names), once it serves; it exits when this
process closes its stdin (``stop()``) or dies, even by SIGKILL (stdin EOF, and PR_SET_PDEATHSIG when
launched from the main thread: the signal follows the launching thread, not the process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

#: The one admin path prefix every emulator serves.
ADMIN = "/_emulator/"
#: The API key an emulator accepts unless told otherwise.
DEFAULT_KEY = "emulator-key"
#: The handshake line's prefix.
READY = "METAFLOW_SANDBOX_EMULATOR_READY "


class EmulatorHandle:
    """A running emulator process and its admin API (the same for every provider)."""

    def __init__(self, proc: subprocess.Popen, info: dict[str, Any], log_path: str):
        self.proc = proc
        self.info = info
        self.log_path = log_path
        self.admin_url = info["admin"]

    @property
    def env(self) -> dict[str, str]:
        """What a launcher needs in its environment for the real SDK (and our backend) to use the emulator, offline."""
        return dict(self.info["env"])

    @property
    def url(self) -> str:
        """The API URL the SDK is given."""
        return str(self.info["url"])

    @property
    def api_key(self) -> str:
        return str(self.info["api_key"])

    @property
    def endpoints(self) -> list[str]:
        """The endpoint names fault switches accept."""
        return list(self.info["endpoints"])

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.admin_url + ADMIN + path, data=data, method=method, headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 400:
                raise ValueError(json.loads(exc.read() or b"{}").get("message", "refused")) from None
            raise

    def live_sandboxes(self) -> list[dict[str, Any]]:
        """Sandboxes not yet ended: id, labels, request (the create body), workdir, expires_in, and the provider's fields."""
        return self._admin("GET", "sandboxes")

    def records(self) -> list[dict[str, Any]]:
        """Every sandbox ever created, ended ones too ("ended": a time, "reason": deleted | expired | vanished | ...)."""
        return self._admin("GET", "sandboxes?all=1")

    def requests(self) -> list[dict[str, Any]]:
        """The request log: app, method, path, query, endpoint, status, ms (and lost_reply); admin calls are not logged."""
        return self._admin("GET", "requests")

    def clear_requests(self) -> None:
        self._admin("DELETE", "requests")

    def stats(self) -> dict[str, Any]:
        """Counters: <app>_requests, injected_<status>, injected_<app>, lost_reply, deleted, expired, vanished, and the provider's."""
        return self._admin("GET", "stats")

    def images(self) -> list[dict[str, Any]]:
        """Images the emulator built or is building (a provider's snapshots/templates): name, state, requirements, size_bytes, error."""
        return self._admin("GET", "images")

    def pip_attempts(self) -> list[str]:
        """Every pip command a sandbox ran on the bare base (``--bare-base``), oldest first; always empty without it."""
        return self._admin("GET", "pip-attempts")

    def faults(self) -> dict[str, Any]:
        return self._admin("GET", "faults")

    def set_faults(self, **switches: Any) -> dict[str, Any]:
        """Change the named switches only (ValueError on an unknown switch or endpoint); returns them all."""
        return self._admin("POST", "faults", switches)

    def clear_faults(self) -> dict[str, Any]:
        """Every switch back to its default, random streams restarted."""
        return self._admin("DELETE", "faults")

    def set_time_scale(self, time_scale: float) -> None:
        """Real seconds per provider second for every timer the provider counts (0.01: a 5-minute lease lasts 3 s)."""
        self.set_faults(time_scale=time_scale)

    def stop(self) -> None:
        """Stop the emulator; it ends (and deletes) every sandbox it still has."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()  # the emulator stops at stdin EOF
        for wait, then in ((20, self.proc.terminate), (15, self.proc.kill), (None, None)):
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                if then is not None:
                    then()

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(module: str, args: Sequence[str] = (), faults: Optional[dict[str, Any]] = None, timeout: float = 30.0) -> EmulatorHandle:
    """Run ``python -m module --ready ...`` and return its handle once it serves (RuntimeError with its log if not)."""
    log = tempfile.NamedTemporaryFile(prefix="%s-" % module.split(".")[0], suffix=".log", delete=False)
    cmd = [sys.executable, "-m", module, *args, "--faults", json.dumps(faults or {}), "--ready", "--parent-pid", str(os.getpid())]
    if threading.current_thread() is threading.main_thread():
        cmd.append("--pdeathsig")
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    found: list[dict[str, Any]] = []

    def read_ready() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY):
                found.append(json.loads(line[len(READY) :]))
                break

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            "the emulator %s did not start within %ss (exit code %s); is its extra installed "
            "(pip install 'metaflow-sandbox[emulator]')? Its log, %s:\n%s" % (module, timeout, proc.returncode, log.name, _tail(log.name))
        )
    return EmulatorHandle(proc, found[0], log.name)


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""
