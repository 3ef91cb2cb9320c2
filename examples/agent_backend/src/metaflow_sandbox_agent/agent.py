"""The agent: one process per sandbox, the sandbox's only door (like E2B's envd or Daytona's toolbox).

``sandbox_create`` starts it in its own session as ``python -m metaflow_sandbox_agent.agent <dir> <socket>``;
it reads ``<dir>/sandbox.json`` and serves the protocol of ``wire.py``. It owns every process of its
sandbox: a command runs in its own process group, from the sandbox's environment (never the agent's),
under the sandbox's CPU affinity and address-space limit; when the command exits, whatever it left in
its group is killed, so ``sleep 30 &`` cannot hold the output open. At the ttl, or on ``shutdown``, it
kills everything, deletes the directory and exits. Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO, Optional

from metaflow_sandbox_agent.wire import CHUNK, decode, encode, recv, send

#: How long output still held by an escaped process (its own session) may delay a command's exit event.
DRAIN_SECONDS = 2.0


def path_problem(path: str) -> Optional[str]:
    """``invalid_path`` for what no sandbox path may be: relative, with ``..``, or with a NUL byte."""
    if not path.startswith("/") or ".." in path.split("/") or "\0" in path:
        return "invalid_path"
    return None


class Agent:
    def __init__(self, home: str, socket_path: str):
        self.home = home
        self.socket_path = socket_path
        with open(os.path.join(home, "sandbox.json")) as f:
            self.config: dict[str, Any] = json.load(f)
        self.commands: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.cpus = self._cpus(self.config["resources"].get("cpu"))
        memory_mb = self.config["resources"].get("memory_mb")
        self.memory_bytes = int(memory_mb) << 20 if memory_mb else None
        self.server: Optional[socketserver.ThreadingUnixStreamServer] = None

    @staticmethod
    def _cpus(cpu: Optional[float]) -> Optional[set[int]]:
        if not cpu:
            return None
        available = sorted(os.sched_getaffinity(0))
        return set(available[: max(1, math.ceil(cpu))])

    def _limit(self) -> None:
        """Runs in the child before exec: the sandbox's CPUs and memory."""
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)
        if self.memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))

    # ----- requests ----------------------------------------------------------------------------

    def exec(self, request: dict[str, Any], rfile: BinaryIO, wfile: BinaryIO) -> None:
        write = threading.Lock()

        def emit(message: dict[str, Any]) -> None:
            with write:
                send(wfile, message)

        try:
            proc = subprocess.Popen(
                request["argv"],
                cwd=request.get("cwd") or self.config["workdir"],
                env={**self.config["env"], **request["env"]},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=self._limit,
            )
        except OSError as exc:  # like a shell: the reason on stderr, 127 (not found) or 126 (cannot run)
            emit({"ev": "err", "data": encode(("%s: %s\n" % (request["argv"][0], exc.strerror)).encode())})
            emit({"ev": "exit", "code": 127 if isinstance(exc, FileNotFoundError) else 126})
            return
        with self.lock:
            self.commands[request["id"]] = proc
        pumps = [
            threading.Thread(target=self._pump, args=(stream, ev, emit), daemon=True)
            for stream, ev in ((proc.stdout, "out"), (proc.stderr, "err"))
        ]
        for pump in pumps:
            pump.start()
        # The client closing the connection (its timeout, its process killed) kills the command.
        threading.Thread(target=self._kill_on_hangup, args=(rfile, proc), daemon=True).start()
        code = proc.wait()
        _killpg(proc.pid)  # what the command left behind in its group
        for pump in pumps:
            pump.join(DRAIN_SECONDS)
        with self.lock:
            self.commands.pop(request["id"], None)
        emit({"ev": "exit", "code": code if code >= 0 else 128 - code})

    @staticmethod
    def _pump(stream: BinaryIO, ev: str, emit: Any) -> None:
        try:
            for chunk in iter(lambda: stream.read1(CHUNK), b""):
                emit({"ev": ev, "data": encode(chunk)})
        except (OSError, ValueError):
            pass  # the client is gone; the hangup watcher kills the command

    @staticmethod
    def _kill_on_hangup(rfile: BinaryIO, proc: subprocess.Popen) -> None:
        try:
            rfile.read()
        except (OSError, ValueError):
            pass
        if proc.poll() is None:
            _killpg(proc.pid)

    def kill(self, request: dict[str, Any], wfile: BinaryIO) -> None:
        with self.lock:
            proc = self.commands.get(request["id"])
        if proc is not None:
            _killpg(proc.pid)
        send(wfile, {"killed": proc is not None})

    def upload(self, request: dict[str, Any], rfile: BinaryIO, wfile: BinaryIO) -> None:
        path = request["path"]
        error = path_problem(path) or ("is_directory" if os.path.isdir(path) else None)
        part, out = path + ".agent-part", None
        if error is None:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                out = open(part, "wb")
            except PermissionError:
                error = "permission_denied"
            except (NotADirectoryError, FileExistsError):
                error = "invalid_path"  # a parent is a file
        try:
            while True:  # read the whole body even after an error, so the protocol stays in step
                message = recv(rfile)
                if message is None:
                    return  # the client went away: drop the partial file (finally)
                if message.get("end"):
                    break
                if out is not None:
                    out.write(decode(message["data"]))
            if out is not None:
                out.close()
                os.replace(part, path)
                out = None
            send(wfile, {"error": error})
        finally:
            if out is not None:
                out.close()
                os.unlink(part)

    def download(self, request: dict[str, Any], wfile: BinaryIO) -> None:
        path = request["path"]
        error = path_problem(path)
        if error is None and os.path.isdir(path):
            error = "is_directory"
        try:
            source = open(path, "rb") if error is None else None
        except FileNotFoundError:
            source, error = None, "file_not_found"
        except PermissionError:
            source, error = None, "permission_denied"
        send(wfile, {"error": error})
        if source is not None:
            with source:
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    send(wfile, {"data": encode(chunk)})
            send(wfile, {"end": True})

    def end(self) -> None:
        """Kill every command, delete the sandbox and stop listening; the process exits after."""
        with self.lock:
            for proc in self.commands.values():
                _killpg(proc.pid)
        shutil.rmtree(self.home, ignore_errors=True)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # ----- serving -----------------------------------------------------------------------------

    def serve(self) -> None:
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = recv(self.rfile)
                if request is None:
                    return
                op = request.get("op")
                if op == "ping":
                    send(self.wfile, {"ok": True})
                elif op == "exec":
                    agent.exec(request, self.rfile, self.wfile)
                elif op == "kill":
                    agent.kill(request, self.wfile)
                elif op == "upload":
                    agent.upload(request, self.rfile, self.wfile)
                elif op == "download":
                    agent.download(request, self.wfile)
                elif op == "shutdown":
                    agent.end()  # before the answer: once destroy returns, nothing of the sandbox is left
                    send(self.wfile, {"ok": True})
                    os._exit(0)
                else:
                    send(self.wfile, {"error": "unknown op %r" % op})

        socketserver.ThreadingUnixStreamServer.daemon_threads = True
        self.server = socketserver.ThreadingUnixStreamServer(self.socket_path, Handler)
        ttl = self.config.get("ttl_seconds")
        if ttl:
            threading.Thread(target=self._expire, args=(float(ttl),), daemon=True).start()
        self.server.serve_forever()

    def _expire(self, ttl: float) -> None:
        time.sleep(ttl)
        self.end()
        os._exit(0)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> None:
    agent = Agent(sys.argv[1], sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: (agent.end(), os._exit(0)))
    agent.serve()


if __name__ == "__main__":
    main()
