"""Lifeline: a sandbox ends when its owner dies, by any signal, SIGKILL included.

Owners (the per-task trampolines) hold a unix-socket connection to a small reaper process. The
reaper runs in its own session, so a signal sent to the launcher's process group never reaches it.
Before a create an owner says what it is about to create (a unique owner label), after it which
sandbox it owns, after a destroy that it released it. When an owner's connection closes with
sandboxes not released (SIGKILL, OOM kill, a crash), the reaper destroys them; a create still in
flight is found by its owner label. The launcher holds a connection too: when it is gone, the
reaper stops the run's owners that did not notice by themselves. One reaper serves a run and exits
when its last connection has closed; the provider-side lease bounds the case where it dies too.

The protocol is JSON lines, owner to reaper only, so an owner never waits on the reaper.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Mapping, Optional

log = logging.getLogger("metaflow_sandbox.lifeline")

#: The run's reaper socket, set by the launcher for its trampolines.
SOCKET_ENV = "METAFLOW_SANDBOX_LIFELINE"
#: Label the facade adds to every sandbox created under a lifeline: finds a create in flight.
OWNER_LABEL = "metaflow-sandbox.owner"
#: Seconds the reaper waits for its first connection, and stays up once the last one closed.
FIRST_CONNECTION_WAIT = 30.0
IDLE_EXIT = 1.0
#: After the launcher is gone: seconds before its owners get SIGTERM, then SIGKILL.
ORPHAN_TERM_AFTER, ORPHAN_KILL_AFTER = 3.0, 20.0
#: A create in flight when its owner died may finish later: look for it again after these delays.
SWEEP_DELAYS = (0.0, 3.0, 10.0)
#: With every owner gone, seconds the reaper keeps trying a provider that does not answer; then
#: it exits and leaves those sandboxes to their lease.
REAP_GIVE_UP = 300.0


def _socket_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if len(base) > 60:  # unix socket paths are limited to 107 bytes
        base = "/tmp"
    path = os.path.join(base, "mfsb-lifeline-%d" % os.getuid())
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def new_socket_path() -> str:
    """A fresh, private socket path (short: unix socket paths are limited to 107 bytes)."""
    return os.path.join(_socket_dir(), "%d-%s.sock" % (os.getpid(), uuid.uuid4().hex[:8]))


def spawn(path: Optional[str] = None) -> str:
    """Start a reaper in its own session listening on ``path``; returns the path at once."""
    path = path or new_socket_path()
    with open(os.path.join(os.path.dirname(path), "reaper.log"), "ab") as out:
        subprocess.Popen(
            [sys.executable, "-c", "import sys; from metaflow_sandbox.lifeline import main; sys.exit(main())", path],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            close_fds=True,
            start_new_session=True,
        )
    return path


class Lifeline:
    """An owner's connection to the reaper. Every method is cheap and never raises."""

    def __init__(self, sock: socket.socket, path: str):
        self.sock: Optional[socket.socket] = sock
        self.path = path
        self.lock = threading.Lock()

    @classmethod
    def connect(cls, path: str, role: str = "owner", wait: float = 5.0) -> Lifeline:
        """Connect to the reaper at ``path``, waiting up to ``wait`` s for it to listen."""
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        line = cls(sock, path)
        line._send({"op": "hello", "role": role, "pid": os.getpid()})
        return line

    @classmethod
    def attach(cls, path: Optional[str] = None) -> Optional[Lifeline]:
        """The run's reaper at ``path`` (or ``$METAFLOW_SANDBOX_LIFELINE``), else a new one of our own."""
        path = path or os.environ.get(SOCKET_ENV)
        if path:
            try:
                return cls.connect(path, wait=5.0)
            except OSError:
                log.warning("the run's lifeline at %s is gone; starting one for this task", path)
        try:
            return cls.connect(spawn(), wait=10.0)
        except OSError as err:
            log.warning("no lifeline (%s): a sandbox of a killed task ends only when its lease runs out", err)
            return None

    def _send(self, message: Mapping[str, Any]) -> None:
        data = (json.dumps(message, default=str) + "\n").encode()
        with self.lock:
            if self.sock is None:
                return
            try:
                self.sock.sendall(data)
            except OSError as err:
                log.warning("lifeline to %s lost (%s): a sandbox of a killed task ends only when its lease runs out", self.path, err)
                self.sock.close()
                self.sock = None

    def intent(self, backend: str, options: Mapping[str, Any]) -> str:
        """Say a create is about to start; returns the owner label value to put on the sandbox."""
        key = uuid.uuid4().hex
        self._send({"op": "intent", "key": key, "backend": backend, "options": dict(options)})
        return key

    def own(self, key: str, sandbox_id: str, workdir: str, labels: Mapping[str, str]) -> None:
        self._send({"op": "own", "key": key, "sandbox_id": sandbox_id, "workdir": workdir, "labels": dict(labels)})

    def release(self, key: str) -> None:
        self._send({"op": "release", "key": key})

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None


class Reaper:
    """The server side: one thread per connection; destroys what a closed connection left."""

    def __init__(self, path: str, backend_factory: Optional[Callable[..., Any]] = None):
        self.path = path
        self.backend_factory = backend_factory  # tests inject scripted backends; default: the facade
        self.lock = threading.Lock()
        self.connections = 0
        self.reaping = 0
        self.ever_connected = False
        self.last_change = time.monotonic()
        self.owner_pids: set[int] = set()

    def serve(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(self.path)
        finally:
            os.umask(old)
        server.listen(256)
        server.settimeout(0.2)
        started = time.monotonic()
        try:
            while not self._done(started):
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with self.lock:
                    self.connections += 1
                    self.ever_connected = True
                    self.last_change = time.monotonic()
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        finally:
            server.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _done(self, started: float) -> bool:
        with self.lock:
            if self.connections:
                return False
            if self.reaping:
                if time.monotonic() - self.last_change > REAP_GIVE_UP:
                    log.error("giving up on %d reap(s) after %ds: no answer from the provider; leases end them", self.reaping, REAP_GIVE_UP)
                    return True
                return False
            if not self.ever_connected:
                return time.monotonic() - started > FIRST_CONNECTION_WAIT
            return time.monotonic() - self.last_change > IDLE_EXIT

    def _handle(self, conn: socket.socket) -> None:
        owned: dict[str, dict[str, Any]] = {}
        role, pid = "owner", 0
        try:
            for raw in conn.makefile("rb"):
                try:
                    msg = json.loads(raw)
                    op = msg.get("op")
                    if op in ("intent", "own", "release") and not isinstance(msg.get("key"), str):
                        continue
                except (ValueError, AttributeError):
                    continue  # a garbled line must not end the connection's bookkeeping
                if op == "hello":
                    role, pid = str(msg.get("role", "owner")), int(msg.get("pid") or 0)
                    if role == "owner" and pid:
                        with self.lock:
                            self.owner_pids.add(pid)
                elif op == "intent" and isinstance(msg.get("backend"), str):
                    owned[msg["key"]] = {"backend": msg["backend"], "options": msg.get("options") or {}}
                elif op == "own" and msg["key"] in owned and isinstance(msg.get("sandbox_id"), str):
                    owned[msg["key"]].update(sandbox_id=msg["sandbox_id"], workdir=msg.get("workdir"), labels=msg.get("labels") or {})
                elif op == "release":
                    owned.pop(msg.get("key"), None)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.owner_pids.discard(pid)
                self.reaping += 1
                self.connections -= 1
                self.last_change = time.monotonic()
        try:
            if role == "launcher":
                self._stop_orphans()
            for key, entry in owned.items():
                self._reap(key, entry, pid)
        finally:
            with self.lock:
                self.reaping -= 1
                self.last_change = time.monotonic()

    def _stop_orphans(self) -> None:
        """The launcher is gone: owners that did not notice by themselves are stopped."""
        for sig, delay in ((signal.SIGTERM, ORPHAN_TERM_AFTER), (signal.SIGKILL, ORPHAN_KILL_AFTER)):
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                with self.lock:
                    if not self.owner_pids:
                        return
                time.sleep(0.1)
            with self.lock:
                pids = list(self.owner_pids)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    log.warning("launcher gone: sent %s to owner %d", sig.name, pid)
                except OSError:
                    pass

    def _reap(self, key: str, entry: Mapping[str, Any], pid: int) -> None:
        from .model import SandboxHandle
        from .session import Backend, Sandbox

        try:
            backend = (self.backend_factory or Backend)(entry["backend"], options=entry["options"])
        except Exception as err:
            log.error("cannot load backend %r to reap owner %d's sandbox: %s", entry["backend"], pid, err)
            return
        if entry.get("sandbox_id"):
            labels, workdir = entry.get("labels") or {}, entry.get("workdir") or "/tmp"
            handle = SandboxHandle(backend.name, entry["sandbox_id"], workdir=workdir, labels=labels, options=entry["options"])
            self._destroy(Sandbox(backend, handle), pid)
            return
        if not backend.implements("sandbox_list"):
            return
        for delay in SWEEP_DELAYS:  # the owner died during create: find the sandbox by its owner label
            time.sleep(delay)
            try:
                found = backend.list({OWNER_LABEL: key})
            except Exception as err:
                log.error("could not list %s sandboxes of dead owner %d: %s", backend.name, pid, err)
                continue
            for sbx in found:
                self._destroy(sbx, pid)

    def _destroy(self, sbx: Any, pid: int) -> None:
        for attempt in range(5):
            try:
                sbx.destroy()
                log.warning("owner %d is gone: destroyed its %s sandbox %s", pid, sbx.backend.name, sbx.id)
                return
            except Exception as err:
                log.error("could not destroy %s sandbox %s of dead owner %d (try %d): %s", sbx.backend.name, sbx.id, pid, attempt + 1, err)
                time.sleep(min(10, 2**attempt))
        log.error("gave up on %s sandbox %s: its lease ends it", sbx.backend.name, sbx.id)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s lifeline[%(process)d] %(message)s")
    # Only a closed connection ends a sandbox. A supervisor that SIGTERMs every process still
    # SIGKILLs what stays, and by then the owners are gone and reaped; the reaper exits by itself.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    Reaper(argv[0]).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
