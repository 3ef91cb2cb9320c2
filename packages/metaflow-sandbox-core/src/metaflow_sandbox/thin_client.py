"""The fast path's worker process: what Metaflow's runtime launches for a sandboxed task.

    python -S thin_client.py flow.py <top-level options> sandbox step <step> ...

Run as a script with no site-packages and no Metaflow import (about 10 ms and 10 MB instead of a
trampoline's 250 ms and 50 MB). It hands its argv, environment, cwd and its stdin/stdout/stderr
(SCM_RIGHTS) to the run's sandbox server, which forks a trampoline that already has Metaflow
loaded; that trampoline writes straight into the runtime's pipes. The client forwards SIGINT,
SIGTERM and SIGHUP to it, SIGTERMs it when the launcher dies, and exits with its exit code (or
dies by its signal), so the runtime sees what it sees from a trampoline. Where the server cannot
be reached the client becomes the trampoline itself (exec), after a one-line notice.

Standard library only, and its C modules where the Python ones import more (`socket` and `signal`
pull in `enum`, `json` pulls in `re`, `array` pulls in `collections`: 2.5 ms of each task's start):
a running client holds about 3 MB of its own. Never imported by Metaflow: keep it that way.

Protocol: the request is a 4-byte big-endian length and a marshal (format 4) of a dict (argv, env,
cwd, pid): built in C, and read in microseconds where a repr() took the server a millisecond to
parse. The three fds ride on its first bytes; the server answers lines "pid N", then "exit N"
(negative: killed by that signal) or "fallback <reason>".
"""

import _signal as signal
import _socket as socket
import _struct
import marshal
import os
import select
import sys
import time

SERVER_ENV = "METAFLOW_SANDBOX_SERVER"
SERVER_PID_ENV = "METAFLOW_SANDBOX_SERVER_PID"
LAUNCHER_PID_ENV = "METAFLOW_SANDBOX_LAUNCHER_PID"
LAUNCHER_PYTHON_ENV = "METAFLOW_SANDBOX_LAUNCHER_PYTHON"
#: Seconds a client waits for a server that is still starting (importing Metaflow).
CONNECT_WAIT = 60.0
WATCH_PERIOD = 0.25
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CHUNK = 65536
#: marshal's format 4 (Python 3.4+): the client may run under a step's own Python, the server under the launcher's.
MARSHAL_VERSION = 4


def _alive(pid):
    """Not gone, and not a zombie (the launcher reaps its server only at the end of the run)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def connect(path, server_pid, wait=CONNECT_WAIT):
    """The server's socket; waits while the server is alive but not listening yet. None if gone."""
    deadline = time.monotonic() + wait
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
        if time.monotonic() > deadline or (server_pid and not _alive(server_pid)):
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def fall_back(argv, reason):
    """Become today's trampoline (`python flow.py ... sandbox step ...`), after a one-line notice."""
    python = os.environ.get(LAUNCHER_PYTHON_ENV) or sys.executable
    sys.stderr.write("metaflow-sandbox: fast path not used (%s); running the trampoline instead\n" % reason)
    sys.stderr.flush()
    os.execv(python, [python] + argv)


def send_request(sock, argv):
    header = marshal.dumps({"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid()}, MARSHAL_VERSION)
    data = len(header).to_bytes(4, "big") + header
    fds = _struct.pack("3i", 0, 1, 2)
    sent = sock.sendmsg([data[:CHUNK]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    sock.sendall(data[sent:])


class Task:
    """The forked trampoline on the server's side, seen from here."""

    def __init__(self, sock):
        self.sock = sock
        self.pid = None
        self.pending = []  # signals that arrived before the server told us the task's pid
        self.buffer = b""
        self.result = None

    def signal(self, signum, frame=None):
        if self.pid is None:
            self.pending.append(signum)
            return
        try:
            os.kill(self.pid, signum)
        except OSError:
            pass

    def read(self):
        """Handle what the server sent; False once the connection is closed."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            kind, _, value = line.decode("utf-8", "replace").partition(" ")
            if kind == "pid" and self.pid is None:
                self.pid = int(value)
                for signum in self.pending:
                    self.signal(signum)
                self.pending = []
            elif self.result is None and kind in ("exit", "fallback"):
                self.result = (kind, value)
        return True


def run(argv):
    if os.environ.get("METAFLOW_SANDBOX_FAST_PATH", "1").strip().lower() in ("0", "false", "no", "off"):
        fall_back(argv, "METAFLOW_SANDBOX_FAST_PATH is off")
    if not hasattr(socket.socket, "sendmsg"):
        fall_back(argv, "this Python (%s) cannot pass file descriptors" % sys.version.split()[0])
    path = os.environ.get(SERVER_ENV)
    server_pid = int(os.environ.get(SERVER_PID_ENV) or 0)
    launcher = os.getppid()
    sock = connect(path, server_pid) if path else None
    if sock is None:
        fall_back(argv, "the run's sandbox server is not running" if path else "no sandbox server for this run")
    task = Task(sock)
    for signum in FORWARDED:
        signal.signal(signum, task.signal)
    try:
        send_request(sock, argv)
    except OSError as err:
        fall_back(argv, "the sandbox server refused the task: %s" % err)
    told_launcher_gone = False
    while task.result is None:
        ready, _, _ = select.select([sock], [], [], WATCH_PERIOD)
        if ready and not task.read():
            break
        if not told_launcher_gone and os.getppid() != launcher:
            told_launcher_gone = True  # the launcher died: end the task, which destroys its sandbox
            task.signal(signal.SIGTERM)
    sock.close()
    if task.result is None:
        sys.stderr.write("metaflow-sandbox: the sandbox server lost this task (its process ended without an exit code)\n")
        return 1
    if task.result[0] == "fallback":
        fall_back(argv, task.result[1])
    code = int(task.result[1])
    if code < 0:  # died by a signal: so do we, so the runtime sees the same status
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
