"""The fast path: a thin client per task, one sandbox server per run that forks ready trampolines.

Both clients (bash, the default; Python where there is no bash) are checked against a small stand-in
server (what it sends, exit codes, signals, the fallback; for the shell client the server's own
reading of its request from /proc), then real flows on the `local` backend: through the server, with a crash and a retry;
with the fast path turned off (today's trampoline); and with the server killed mid-run.
"""

from __future__ import annotations

import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from metaflow_extensions.sandbox_core.plugins import sandbox_server
from metaflow_sandbox import thin_client

from .conftest import FLOWS, PYTHON, Target, base_env, child_pids, cmdline, local_leftovers

CLIENT = thin_client.__file__
SHELL_CLIENT = sandbox_server.client_path(shell=True)
BASH = sandbox_server._bash()
CLIENTS = ["shell", "python"]
TOKEN = "t0ken"
FAST_LINE = "fast path: trampoline ran"
NOTICE = "fast path not used"


class StandInServer:
    """Accepts one request like the sandbox server: records it, starts `task_argv` as the task, reports its end."""

    def __init__(self, path: str, task_argv: list[str]):
        self.listener = self.listen(path)
        self.path = path
        self.task_argv = task_argv
        self.request: dict = {}
        self.task: subprocess.Popen | None = None
        self.refused = ""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @staticmethod
    def listen(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(1)
        return sock

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
        need = 4 + struct.unpack("!I", data[:4])[0]
        while len(data) < need:
            data += conn.recv(65536)
        self.request = marshal.loads(data[4:need])
        self.request["nfds"] = len(fds)
        # The task writes into the client's own stdout, as the forked trampoline does.
        self.task = subprocess.Popen(self.task_argv, stdin=fds[0], stdout=fds[1], stderr=fds[2])
        for fd in fds:
            os.close(fd)
        conn.sendall(b"pid %d\n" % self.task.pid)
        code = self.task.wait()
        conn.sendall(b"exit %d\n" % code)
        conn.close()


class StandInShellServer(StandInServer):
    """The same for the shell client, over TCP: its request is read by the sandbox server's own code (from /proc),
    and its "sig N" lines are passed on to the task, as the forked trampoline does to itself."""

    def __init__(self, task_argv: list[str]):
        super().__init__("", task_argv)
        self.path = str(self.listener.getsockname()[1])

    @staticmethod
    def listen(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        return sock

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        try:
            self.request, fds = sandbox_server._receive_shell(conn, TOKEN)
        except sandbox_server.StdioUnusable as err:  # as the sandbox server does: the client runs the trampoline
            conn.sendall(b"fallback %s\n" % str(err).encode())
            conn.close()
            return
        except ValueError as err:  # as the sandbox server does: no answer, the connection closed
            self.refused = str(err)
            conn.close()
            return
        self.request["nfds"] = len(fds)
        self.task = subprocess.Popen(self.task_argv, stdin=fds[0], stdout=fds[1], stderr=fds[2])
        for fd in fds:
            os.close(fd)
        conn.sendall(b"pid %d\n" % self.task.pid)
        threading.Thread(target=self.forward, args=(conn,), daemon=True).start()
        code = self.task.wait()
        conn.sendall(b"exit %d\n" % code)
        conn.close()

    def forward(self, conn) -> None:
        for line in conn.makefile("rb"):
            kind, _, value = line.decode().partition(" ")
            if kind == "sig" and self.task.poll() is None:
                self.task.send_signal(int(value))


def _stand_in(kind: str, tmp_path: Path, task_argv: list[str]) -> StandInServer:
    if kind == "shell":
        if BASH is None:
            pytest.skip("no bash here: the Python client is the one used")
        return StandInShellServer(task_argv)
    return StandInServer(str(tmp_path / "s.sock"), task_argv)


def _client(kind: str, args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    if kind == "shell":
        argv = [BASH, SHELL_CLIENT, PYTHON] + args
    else:
        argv = [PYTHON, "-S", "-X", "importtime", CLIENT] + args
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _client_env(tmp_path: Path, server: str, server_pid: int) -> dict[str, str]:
    """``server``: the Python client's socket path, or the shell client's port (digits)."""
    env = base_env(tmp_path)
    env.update(METAFLOW_SANDBOX_SERVER_PID=str(server_pid), METAFLOW_SANDBOX_LAUNCHER_PYTHON=PYTHON)
    if server.isdigit():
        env.update(METAFLOW_SANDBOX_SERVER_PORT=server, METAFLOW_SANDBOX_SERVER_TOKEN=TOKEN)
    else:
        env["METAFLOW_SANDBOX_SERVER"] = server
    return env


def _imported(stderr: str) -> list[str]:
    return [line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


@pytest.mark.parametrize("kind", CLIENTS)
def test_client_hands_over_its_task_and_exits_with_its_code(tmp_path, kind):
    server = _stand_in(kind, tmp_path, [sys.executable, "-c", "import sys; print('task output'); sys.exit(7)"])
    argv = ["flow.py", "sandbox", "step", "work", "--run-id", "5", "--tag", "a b"]
    proc = _client(kind, argv, _client_env(tmp_path, server.path, os.getpid()), cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    server.thread.join(10)
    assert proc.returncode == 7, err
    assert "task output" in out  # written by the task straight into the client's stdout
    assert server.request["argv"] == argv
    assert server.request["cwd"] == str(tmp_path) and server.request["nfds"] == 3
    assert server.request["env"]["METAFLOW_SANDBOX_LAUNCHER_PYTHON"] == PYTHON
    if kind == "python":
        modules = _imported(err)
        heavy = ("metaflow", "metaflow_sandbox", "site", "enum", "json", "collections")
        assert "select" in modules and not [m for m in modules if m.split(".")[0] in heavy]


def test_shell_client_whose_stdout_is_a_socket_runs_the_trampoline(tmp_path):
    """Its stdio cannot be opened through /proc: the server answers "fallback", as the Python client falls back
    where it cannot pass its fds; the trampoline then runs with the client's own stdio, after a notice."""
    if BASH is None:
        pytest.skip("no bash here")
    server = StandInShellServer([sys.executable, "-c", "print('must not run')"])
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([BASH, SHELL_CLIENT, PYTHON, "-c", "print('the trampoline ran')"],
                            env=_client_env(tmp_path, server.path, os.getpid()), stdout=theirs, stderr=subprocess.PIPE, text=True)
    theirs.close()
    err = proc.communicate(timeout=60)[1]
    server.thread.join(10)
    out = b""
    while chunk := ours.recv(4096):
        out += chunk
    assert proc.returncode == 0, err
    assert server.task is None and out.decode().strip() == "the trampoline ran"
    notices = [line for line in err.splitlines() if NOTICE in line]
    assert len(notices) == 1 and "cannot be opened through /proc" in notices[0], err


def test_shell_client_with_a_wrong_token_gets_nothing(tmp_path):
    if BASH is None:
        pytest.skip("no bash here")
    server = StandInShellServer([sys.executable, "-c", "print('must not run')"])
    env = _client_env(tmp_path, server.path, os.getpid())
    env["METAFLOW_SANDBOX_SERVER_TOKEN"] = "guessed"
    proc = _client("shell", ["flow.py"], env)
    out, err = proc.communicate(timeout=60)
    server.thread.join(10)
    assert server.refused == "wrong token"
    assert server.task is None and "must not run" not in out  # refused: no task, no stdio handed over
    assert proc.returncode == 1 and "lost this task" in err


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_client_forwards_signals_and_dies_the_task_s_death(tmp_path, signame, kind):
    server = _stand_in(kind, tmp_path, [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    proc = _client(kind, ["flow.py", "sandbox", "step", "work"], _client_env(tmp_path, server.path, os.getpid()))
    assert proc.stdout.readline().strip() == "up"
    proc.send_signal(getattr(signal, signame))
    proc.wait(20)
    server.thread.join(10)
    assert server.task.returncode == -getattr(signal, signame)  # the task got the signal
    assert proc.returncode == -getattr(signal, signame)  # and the runtime sees the client die of it


@pytest.mark.parametrize("kind", CLIENTS)
def test_client_falls_back_to_the_trampoline_with_a_notice(tmp_path, kind):
    dead = subprocess.Popen(["true"])
    dead.wait()
    if kind == "shell" and BASH is None:
        pytest.skip("no bash here")
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = str(free.getsockname()[1])
    free.close()  # nothing listens there
    env = _client_env(tmp_path, port if kind == "shell" else str(tmp_path / "nothing.sock"), dead.pid)
    proc = _client(kind, ["-c", "print('the trampoline ran')"], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "the trampoline ran"
    notices = [line for line in err.splitlines() if NOTICE in line]
    assert len(notices) == 1 and "not running" in notices[0]


# ---------------------------------------------------------------- real flows


@pytest.fixture
def local(tmp_path):
    env = {"METAFLOW_SANDBOX_BACKEND": "local", "METAFLOW_SANDBOX_FORWARD_ENV": "FP_CRASH,FP_SLEEP"}
    env["METAFLOW_SANDBOX_DEBUG_FAST_PATH"] = "1"  # each forked trampoline says so on its stderr
    t = Target("local-localds", "local", "local", env, lambda: local_leftovers(tmp_path), tmp_path)
    yield t
    assert t.live_sandboxes() == [], "sandboxes left alive after the test"


def _artifacts(t: Target, run) -> dict:
    code = (
        "r = Run('FastPathFlow/%s'); d = r['join'].task.data; "
        "out = {k: getattr(d, k) for k in ('values', 'attempts', 'in_sandbox', 'launcher_modules', 'cpus')}; "
        "out['server_during_start'] = r['start'].task.data.server_during_start; emit(out)"
    )
    return t.client(code % run.run_id(), run)


@pytest.mark.parametrize("client", CLIENTS)
def test_flow_on_the_fast_path_with_a_crash_and_a_retry(local, client):
    run = local.flow("fastpath_flow.py", "run", "--max-workers", "4", env={"FP_CRASH": "1", "METAFLOW_SANDBOX_THIN_CLIENT": client})
    assert run.returncode == 0, run.output[-6000:]
    assert run.output.count("%s client" % client) == 5, run.output[-6000:]  # METAFLOW_SANDBOX_THIN_CLIENT=python picks it
    assert NOTICE not in run.output and "fast path off" not in run.output
    # every attempt (4 tasks + the retry of the crashed one) ran as a forked trampoline
    assert run.output.count(FAST_LINE) == 5, run.output[-6000:]
    data = _artifacts(local, run)
    assert data["values"] == [0, 10, 20, 30]
    assert data["attempts"] == {"0": 0, "1": 1, "2": 0, "3": 0}
    assert data["in_sandbox"] == ["1"] * 4
    assert data["launcher_modules"] == []  # inside the sandbox the task does not import the core nor pluggy
    assert data["server_during_start"] is True  # started with the run: the first sandboxed task does not wait for it
    assert sum("line-2" in line for line in run.output.splitlines()) == 1  # live log, once
    assert "crashing on purpose" in run.output


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to spread sandboxes over")
def test_concurrent_sandboxes_are_spread_over_the_cpus(local):
    """Each task's trampoline places its own sandbox: the placement must see the others' (16 tasks on 2 CPUs
    once landed 10 and 6, and the busier CPU set the run's wall time)."""
    run = local.flow("fastpath_flow.py", "run", "--max-workers", "4", env={"FP_SLEEP": "3"})
    assert run.returncode == 0, run.output[-6000:]
    cpus = _artifacts(local, run)["cpus"]
    assert all(len(c) == 1 for c in cpus), cpus
    counts = [sum(c == [cpu] for c in cpus) for cpu in os.sched_getaffinity(0)]
    assert max(counts) - min(counts) <= 1, "4 concurrent one-CPU sandboxes pinned to %s" % cpus


def test_flow_on_the_fallback_path(local):
    run = local.flow("fastpath_flow.py", "run", "--max-workers", "4", env={"METAFLOW_SANDBOX_FAST_PATH": "0", "FP_CRASH": "1"})
    assert run.returncode == 0, run.output[-6000:]
    notices = [line for line in run.output.splitlines() if "fast path off" in line]
    assert len(notices) == 1 and "METAFLOW_SANDBOX_FAST_PATH=0" in notices[0]
    assert FAST_LINE not in run.output
    data = _artifacts(local, run)
    assert data["values"] == [0, 10, 20, 30] and data["attempts"]["1"] == 1
    assert data["server_during_start"] is False


def test_a_killed_server_fails_no_task(local):
    """Tasks already forked finish and report their exit codes; later tasks run the trampoline."""
    env = base_env(local.tmp)
    env.update(local.env, FP_SLEEP="4", FP_TASKS="4")
    log = local.tmp / "flow.log"
    proc = subprocess.Popen(
        [PYTHON, str(FLOWS / "fastpath_flow.py"), "--no-pylint", "run", "--max-workers", "2"],
        cwd=local.tmp, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        server = []
        while time.time() < deadline and not (server and "line-" not in log.read_text() and len(local_leftovers(local.tmp)) >= 2):
            server = [p for p in child_pids(proc.pid) if " sandbox serve " in cmdline(p)]
            time.sleep(0.1)
        assert server, "no sandbox server started:\n" + log.read_text()[-3000:]
        os.kill(server[0], signal.SIGKILL)
        assert proc.wait(180) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    # Nothing of the killed server is left: the trampoline it had forked ahead of the next request exits too.
    deadline = time.time() + 10
    while time.time() < deadline and _server_processes(local.tmp):
        time.sleep(0.2)
    assert _server_processes(local.tmp) == []
    assert output.count(FAST_LINE) == 2, output[-4000:]  # the two forked before the kill
    assert output.count(NOTICE) == 2  # the two after it, each with its notice
    assert sorted(int(line.split("line-")[1].split()[0]) for line in output.splitlines() if "] line-" in line) == [0, 1, 2, 3]


def test_a_spare_trampoline_killed_before_its_task_fails_no_task(local):
    """The trampoline the server forked ahead dies while it waits: the next task is forked afresh, on the fast path."""
    env = base_env(local.tmp)
    env.update(local.env, FP_SLEEP="3", FP_TASKS="4")
    log = local.tmp / "flow.log"
    proc = subprocess.Popen(
        [PYTHON, str(FLOWS / "fastpath_flow.py"), "--no-pylint", "run", "--max-workers", "2"],
        cwd=local.tmp, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    killed = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            servers = [p for p in child_pids(proc.pid) if " sandbox serve " in cmdline(p)]
            forked = [p for server in servers for p in child_pids(server)]
            busy = [p for p in forked if child_pids(p)]  # a running task's trampoline has its sandbox's processes
            spares = [p for p in forked if p not in busy] if len(busy) >= 2 else []  # the waiting spare has none
            for pid in spares:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)
        assert killed, "no spare trampoline seen:\n" + log.read_text()[-3000:]
        assert proc.wait(180) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert output.count(FAST_LINE) == 4 and NOTICE not in output, output[-4000:]  # every task on the fast path
    assert sorted(int(line.split("line-")[1].split()[0]) for line in output.splitlines() if "] line-" in line) == [0, 1, 2, 3]


def _server_processes(cwd: Path) -> list[int]:
    """Processes with a sandbox server's command line (the server, its forks) running in `cwd`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and " sandbox serve " in cmdline(int(entry)):
            try:
                if os.readlink("/proc/%s/cwd" % entry) == str(cwd):
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("how", ["value", "file"])
def test_a_flow_with_a_config_runs_on_the_fast_path(local, how):
    """The run's Config (given as a value or as a file) reaches every forked trampoline and its sandboxed task."""
    if how == "value":
        args = ["--config-value", "settings", '{"scale": 7, "label": "given"}']
    else:
        (local.tmp / "settings.json").write_text('{"scale": 7, "label": "given"}')
        args = ["--config", "settings", "settings.json"]
    run = local.flow("config_flow.py", *args, "run", "--max-workers", "2")
    assert run.returncode == 0, run.output[-6000:]
    assert NOTICE not in run.output and "fast path off" not in run.output
    assert run.output.count(FAST_LINE) == 2, run.output[-6000:]
    data = local.client("d = Run('ConfigFlow/%s')['join'].task.data; emit([d.values, d.labels])" % run.run_id(), run)
    assert data == [[7, 14], ["given"]]
