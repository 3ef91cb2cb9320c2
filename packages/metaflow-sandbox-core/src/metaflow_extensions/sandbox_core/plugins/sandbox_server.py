"""The fast path: one sandbox server per run forks a ready trampoline for each sandboxed task.

A trampoline (`python flow.py sandbox step`) spends most of its ~250 ms and ~50 MB importing
Metaflow and the backend SDK. The launcher starts one server per run (`flow.py <top-level
options> sandbox serve`, its own session) at the first sandboxed task; it imports all of that once,
then waits on a unix socket. Metaflow's runtime launches a thin client instead of
the trampoline: `metaflow_sandbox/thin_client.sh` (bash, ~1 ms to start) where bash is, else
`thin_client.py` (no Metaflow import, ~10 ms). The Python client sends its argv, environment, cwd
and stdio fds over a unix socket; the shell client sends its pid and a token over TCP on 127.0.0.1,
and the server reads the rest from /proc/<pid>. Either way the server forks a child that runs the flow file's
code with that argv: exactly today's trampoline (CLI parse, `sandbox step`, retries, @catch, logs,
metadata), minus the imports, writing straight into the runtime's pipes.

Lifeline: the server dies with the launcher (PR_SET_PDEATHSIG, and a ppid check); a child
SIGTERMs itself (which destroys its sandbox) when its client's connection closes (the client was
killed by any signal); the client forwards signals and watches the launcher. The child reports its
exit code, and the server reports how the child ended (a signal, a crash), so the runtime sees the
trampoline's exit status. Where the fast path cannot be used the client runs the trampoline itself
(docs/performance.md says when).
"""

import builtins
import gc
import hmac
import marshal
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import types

from metaflow_sandbox.thin_client import MARSHAL_VERSION  # the client's request format: the spare gets it too

FAST_PATH_ENV = "METAFLOW_SANDBOX_FAST_PATH"
SERVER_ENV = "METAFLOW_SANDBOX_SERVER"
SERVER_PID_ENV = "METAFLOW_SANDBOX_SERVER_PID"
PORT_ENV = "METAFLOW_SANDBOX_SERVER_PORT"  # the shell client's way in: TCP on 127.0.0.1
TOKEN_ENV = "METAFLOW_SANDBOX_SERVER_TOKEN"  # ... and its proof that the pid it names is its own
CLIENT_ENV = "METAFLOW_SANDBOX_THIN_CLIENT"  # "python": the Python client even where bash is (troubleshooting)
# Read at run time from os.environ (the runtime sets them while the run goes on), not at import.
# PYTHONNOUSERSITE: @pypi/@conda set it for the trampoline, which drops it when it re-execs with the launcher's Python.
# METAFLOW_SANDBOX_ENVIRONMENT_REF: the task's prepared environment (sandbox_environments.REF_ENV), one per step.
RUNTIME_ENV = {"METAFLOW_CODE_SHA", "METAFLOW_CODE_URL", "METAFLOW_CODE_DS", "METAFLOW_CODE_METADATA", SERVER_ENV, SERVER_PID_ENV,
               PORT_ENV, TOKEN_ENV, CLIENT_ENV, "PYTHONNOUSERSITE", "METAFLOW_SANDBOX_ENVIRONMENT_REF"}
#: Signals a client may ask its task to get ("sig N"): the ones it forwards.
FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
#: Seconds the server waits, when it is told to stop, for its forked trampolines to destroy their sandboxes
#: (after an early report the runtime may already be ending the run).
TEARDOWN_WAIT = 30.0
# Top-level options that only the task's own command line can carry (added after runtime_step_cli).
TASK_ONLY_OPTIONS = ("config-value", "local-config-file")

_server = None
#: In a forked trampoline: how to tell its client the task's outcome before the sandbox's teardown.
_early = None


def client_path(shell=False):
    from metaflow_sandbox import thin_client

    path = os.path.abspath(thin_client.__file__)
    return os.path.join(os.path.dirname(path), "thin_client.sh") if shell else path


def _bash():
    """bash for the shell client, or None: then the Python client."""
    if os.environ.get(CLIENT_ENV, "").strip().lower() == "python":
        return None
    return shutil.which("bash")


def _bash_with_tcp(tcp):
    """bash, if it can connect to ``tcp`` (a listener nobody accepts on yet) through /dev/tcp: not every
    bash is built with it, and without it the shell client would wait for the server in vain."""
    bash = _bash()
    if bash is None:
        return None
    probe = 'exec 3<>"/dev/tcp/127.0.0.1/$1"'
    try:
        done = subprocess.run([bash, "-c", probe, "probe", str(tcp.getsockname()[1])], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    tcp.settimeout(5.0)
    try:
        tcp.accept()[0].close()  # the probe's connection: not a request for the server
    except OSError:
        return None
    finally:
        tcp.settimeout(None)
    return bash


def unavailable_reason():
    """Why the fast path cannot run here, or None."""
    if os.environ.get(FAST_PATH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return "%s=%s" % (FAST_PATH_ENV, os.environ[FAST_PATH_ENV])
    if not sys.platform.startswith("linux"):
        return "needs Linux (fork, SCM_RIGHTS, pidfd), this is %s" % sys.platform
    if not (hasattr(socket, "send_fds") and hasattr(os, "pidfd_open")):
        return "needs Python 3.9+ (socket.send_fds, os.pidfd_open)"
    return None


# ---------------------------------------------------------------- launcher side


def fast_path_cli(cli_args, run_id, logger, shell=True):
    """In runtime_step_cli: run the task through the thin client, starting the run's server once.
    ``shell``: the bash client may be used (its command line must keep bash first)."""
    server = _ensure_server(cli_args, run_id, logger)
    if server is None:
        return
    if server["bash"] and shell:
        cli_args.entrypoint[:1] = [server["bash"], client_path(shell=True), cli_args.entrypoint[0]]
    else:
        cli_args.entrypoint[1:1] = ["-S", client_path()]
    cli_args.env.update({SERVER_ENV: server["path"], SERVER_PID_ENV: str(server["proc"].pid)})
    cli_args.env.update({PORT_ENV: str(server["port"]), TOKEN_ENV: server["token"]})


def start_at_runtime_init(step_name, run_id, task_env, logger):
    """Start the run's server while `start` runs, instead of at the first sandboxed task (which then
    waited ~1.5 s for it to import Metaflow). Needs the top-level options Metaflow gives every task:
    built as Metaflow builds them (CLIArgs) from the runtime that is calling runtime_init. Anything
    unexpected leaves the start to the first sandboxed task, as before."""
    if _server is not None or unavailable_reason() is not None:
        return
    try:
        cli_args = _runtime_cli_args(step_name, run_id)
    except Exception:
        return
    if cli_args is not None:
        cli_args.env.update(task_env)
        _ensure_server(cli_args, run_id, logger)


def _runtime_cli_args(step_name, run_id):
    """A CLIArgs for a would-be task of `step_name`, from the NativeRuntime up the stack (no task created)."""
    from metaflow.runtime import CLIArgs

    frame = sys._getframe(1)
    runtime = None
    while frame is not None and runtime is None:
        candidate = frame.f_locals.get("self")
        if type(candidate).__name__ == "NativeRuntime" and hasattr(candidate, "_entrypoint"):
            runtime = candidate
        frame = frame.f_back
    if runtime is None:
        return None
    flow = runtime._flow
    task = types.SimpleNamespace(
        flow=flow,
        step=step_name,
        decos=getattr(flow, step_name).decorators,
        entrypoint=runtime._entrypoint,
        metadata_type=runtime._metadata.TYPE,
        environment_type=runtime._environment.TYPE,
        datastore_type=runtime._flow_datastore.TYPE,
        datastore_sysroot=runtime._flow_datastore.datastore_root,
        event_logger_type=runtime.event_logger.TYPE,
        monitor_type=runtime._monitor.TYPE,
        run_id=run_id,
        task_id=None,
        input_paths=[],
        split_index=None,
        retries=0,
        user_code_retries=0,
        tags=runtime._metadata.sticky_tags,
        ubf_context=None,
    )
    return CLIArgs(task)


def _ensure_server(cli_args, run_id, logger):
    global _server
    if _server is not None:
        return _server.get("proc") and _server
    reason = unavailable_reason()
    if reason is None:
        try:
            _server = _start_server(cli_args, run_id)
            return _server
        except Exception as err:  # the trampoline still works: never fail a run over its fast path
            reason = "the sandbox server did not start: %s" % err
    _server = {}
    logger("Sandboxed tasks run through the trampoline (fast path off: %s)." % reason, system_msg=True)
    return None


def _start_server(cli_args, run_id):
    import atexit
    import copy

    from metaflow_sandbox.lifeline import new_socket_path

    from .sandbox_task import backend_settings

    path = new_socket_path().replace(".sock", ".srv")
    _sweep(os.path.dirname(path))
    args = copy.copy(cli_args)
    args.entrypoint = [sys.executable] + list(cli_args.entrypoint[1:])
    args.top_level_options = {k: v for k, v in cli_args.top_level_options.items() if k not in TASK_ONLY_OPTIONS}
    args.commands = ["sandbox", "serve"]
    args.command_args = []
    # Made here, so that its port is known before the server has started; connections wait in its backlog.
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(512)
    port = tcp.getsockname()[1]
    bash = _bash_with_tcp(tcp)
    args.command_options = {"socket": path, "launcher-pid": str(os.getpid()), "tcp-fd": str(tcp.fileno())}
    args.command_options["backend-settings"] = ",".join(sorted(backend_settings())) or ","
    token = secrets.token_hex(16)
    env = server_env(cli_args.env, run_id)
    env[TOKEN_ENV] = token
    try:
        with open(path + ".log", "ab") as log:
            proc = subprocess.Popen(
                args.get_args(), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                pass_fds=[tcp.fileno()], start_new_session=True,
            )
    finally:
        tcp.close()  # the server's copy is the one that accepts
    atexit.register(stop_server)
    return {"proc": proc, "path": path, "port": port, "token": token, "bash": bash}


def _sweep(directory):
    """Sockets and logs of servers whose launcher is gone (killed with SIGKILL: no stop_server ran)."""
    for name in os.listdir(directory):
        if name.endswith((".srv", ".srv.log")) and name.split("-", 1)[0].isdigit():
            try:
                os.kill(int(name.split("-", 1)[0]), 0)
            except ProcessLookupError:
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
            except OSError:
                pass


def server_env(task_env, run_id):
    """What the runtime gives a worker (metaflow/runtime.py Worker._launch): the server reads its config from it."""
    env = dict(os.environ)
    env.update(task_env)
    env["PYTHONUNBUFFERED"] = "x"
    env["METAFLOW_RUN_ID"] = str(run_id)
    env.pop("PYTHONNOUSERSITE", None)
    return env


def stop_server():
    """At the end of the run. Running children are not the server's to stop: they end with their clients.
    The server waits for their teardowns (TEARDOWN_WAIT), and this for the server."""
    global _server
    server, _server = _server, None
    if not server or not server.get("proc"):
        return
    proc = server["proc"]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(TEARDOWN_WAIT + 5)  # it waits for its tasks' teardowns: the run ends with no sandbox left
        except subprocess.TimeoutExpired:
            proc.kill()
    for leftover in (server["path"], server["path"] + ".log"):
        try:
            os.unlink(leftover)
        except OSError:
            pass


# ---------------------------------------------------------------- server side


def serve(obj, path, launcher_pid, tcp_fd=None, backend_settings=None):
    """`flow.py sandbox serve`: preload, then fork a trampoline per request until the launcher is gone."""
    _die_with_parent(launcher_pid)
    if backend_settings is not None:
        from .sandbox_task import preset_backend_settings

        preset_backend_settings(backend_settings.split(","))
    _preload(obj)
    flow_file = os.path.abspath(sys.argv[0])
    with open(flow_file, "rb") as f:
        code = compile(f.read(), flow_file, "exec")
    gc.collect()
    gc.freeze()  # keep the collector from touching (and so copying) the shared pages in every child
    tcp = socket.socket(fileno=tcp_fd) if tcp_fd is not None else None
    Server(path, code, flow_file, launcher_pid, tcp).run()
    return 0


def _die_with_parent(launcher_pid):
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass  # the loop's ppid check still ends the server within a second
    if os.getppid() != launcher_pid:
        sys.exit(0)


def _preload(obj):
    """Import, once, what every trampoline imports: the core, the step's backends and their SDKs."""
    import metaflow_sandbox.lifeline  # noqa: F401
    from metaflow_sandbox.plugins import freeze_discovery

    from . import sandbox_cli, sandbox_code_cache, sandbox_environments, sandbox_logs, sandbox_task  # noqa: F401
    from .sandbox_decorator import SandboxDecorator, backend_options, load_backend

    freeze_discovery()  # first: the plugin managers built below are then kept for the forked tasks
    for node in obj.graph:
        for deco in node.decorators:
            if isinstance(deco, SandboxDecorator):
                try:
                    backend = load_backend(deco.backend_name, backend_options(deco.backend_name, deco.attributes.get("options")))
                    backend.check_config()  # its once-per-process probes, inherited by every forked task
                except Exception as err:  # the trampoline will report it, with its fix
                    print("preload of backend %r failed: %s" % (deco.backend_name, err), file=sys.stderr)
    sandbox_task.backend_settings()  # loads every installed backend once (~170 ms), not in every forked task
    if threading.active_count() > 1:  # forking a threaded process copies its locks in whatever state they are
        print("warning: %d threads before forking: %s" % (threading.active_count(), threading.enumerate()), file=sys.stderr)


def _receive(conn, nfds=3):
    """One request, from a client (its stdin/stdout/stderr) or from the server to its spare (plus the
    client's connection): (header dict, the fds). The header is a marshal (the client imports no
    json), behind a 4-byte length; a 0600 socket: only our user sends one."""
    data, fds, _, _ = socket.recv_fds(conn, 65536, nfds)
    try:
        if len(data) < 4:
            raise ValueError("short request")
        need = 4 + struct.unpack("!I", data[:4])[0]
        while len(data) < need:
            more = conn.recv(need - len(data))
            if not more:
                raise ValueError("truncated request")
            data += more
        request = marshal.loads(data[4:need])
        if not isinstance(request, dict):
            raise ValueError("not a request")
        if len(fds) != nfds:
            raise ValueError("expected %d file descriptors, got %d" % (nfds, len(fds)))
        return request, fds
    except Exception:
        for fd in fds:
            os.close(fd)
        raise


def _send(conn, message):
    """One line to the client: "pid N", "exit N" or "fallback <reason>"."""
    ((kind, value),) = message.items()
    try:
        conn.sendall(("%s %s\n" % (kind, str(value).replace("\n", " "))).encode())
    except OSError:
        pass  # the client is gone; its task learns it from the closed connection


class StdioUnusable(Exception):
    """An authentic request whose stdin/stdout/stderr cannot be opened through /proc (e.g. a socket):
    the client runs the trampoline itself, as the Python client does where it cannot pass them."""


def _receive_shell(conn, token):
    """A request from the shell client: a line "TOKEN PID"; the rest is read from /proc/PID, as the
    client's own user may (argv, environment, cwd), and its stdin/stdout/stderr are opened there.
    The token must also be in that process's environment: the pid named is the sender's own."""
    line = b""
    while not line.endswith(b"\n"):  # a byte at a time: what follows ("sig N") is the task's to read
        more = conn.recv(1)
        if not more or len(line) > 200:
            raise ValueError("no request line")
        line += more
    sent, _, pid = line.decode("ascii", "replace").strip().partition(" ")
    if not token or not hmac.compare_digest(sent.encode(), token.encode()):
        raise ValueError("wrong token")
    proc = "/proc/%d" % int(pid)
    with open(proc + "/environ", "rb") as f:
        env = dict(os.fsdecode(item).partition("=")[::2] for item in f.read().split(b"\0") if b"=" in item)
    if not hmac.compare_digest(env.get(TOKEN_ENV, "").encode(), token.encode()):
        raise ValueError("process %s did not send this request" % pid)
    with open(proc + "/cmdline", "rb") as f:
        argv = [os.fsdecode(arg) for arg in f.read().split(b"\0")[:-1]]
    request = {"argv": argv[3:], "env": env, "cwd": os.readlink(proc + "/cwd"), "pid": int(pid)}  # bash, script, python, then the task's
    fds = []
    try:
        for n, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
            fds.append(os.open("%s/fd/%d" % (proc, n), mode | os.O_NONBLOCK | os.O_CLOEXEC))  # a pipe's end, not a copy
            os.set_blocking(fds[-1], True)
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise StdioUnusable("its stdin/stdout/stderr cannot be opened through /proc (%s)" % err.strerror) from None
    return request, fds


class Server:
    def __init__(self, path, code, flow_file, launcher_pid, tcp=None):
        self.path = path
        self.tcp = tcp  # the shell client's listener (None: Python clients only)
        self.token = os.environ.get(TOKEN_ENV, "")
        self.code = code
        self.flow_file = flow_file
        self.launcher_pid = launcher_pid
        self.env = dict(os.environ)
        self.tasks = {}  # pidfd -> (pid, connection)
        self.spare = None  # (pid, socket): the next task's trampoline, forked ahead

    def run(self):
        signal.signal(signal.SIGTERM, _exit_on_signal)
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(512)
        self.listeners = [listener] + ([self.tcp] if self.tcp is not None else [])
        try:
            self._fork_spare()
            while os.getppid() == self.launcher_pid:
                ready, _, _ = select.select(self.listeners + list(self.tasks), [], [], 1.0)
                for item in ready:
                    if item in self.listeners:
                        self._accept(item)
                    else:
                        self._reap(item)
                if not ready:
                    self._fork_spare()  # e.g. one that could not take its task
        finally:
            for sock in self.listeners:
                sock.close()
            self._drop_spare()
            self._wait_for_teardowns(TEARDOWN_WAIT)
            for leftover in (self.path, self.path + ".log"):
                try:
                    if leftover == self.path or os.path.getsize(leftover) == 0:  # a log that says something stays
                        os.unlink(leftover)
                except OSError:
                    pass

    def _accept(self, listener):
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            conn.settimeout(10.0)
            request, fds = _receive(conn) if listener.family == socket.AF_UNIX else _receive_shell(conn, self.token)
            conn.settimeout(None)
        except StdioUnusable as err:
            _send(conn, {"fallback": err})
            conn.close()
            return
        except Exception as err:
            print("bad request: %s" % err, file=sys.stderr)
            conn.close()
            return
        reason = self.incompatible(request)
        if reason:
            _send(conn, {"fallback": reason})
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        pid = self._hand_to_spare(request, fds, conn)
        if pid is None:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, fds, conn, self.code, self.flow_file, self._inherited())  # never returns
        for fd in fds:
            os.close(fd)
        self.tasks[os.pidfd_open(pid)] = (pid, conn)
        _send(conn, {"pid": pid})
        self._fork_spare()

    def _inherited(self):
        """The server's fds a forked child must close: the listeners, other tasks' pidfds and connections, the spare's socket."""
        fds = [sock.fileno() for sock in self.listeners] + list(self.tasks) + [c.fileno() for _, c in self.tasks.values()]
        return fds + ([self.spare[1].fileno()] if self.spare else [])

    def _fork_spare(self):
        """Fork the next task's trampoline ahead of its request: the fork (a few ms for this process) is then
        off the task's path. It waits for its request and fds from the server and exits if the server goes."""
        if self.spare is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            inherited = self._inherited() + [ours.fileno()]
            _spare(theirs, self.code, self.flow_file, inherited)  # never returns
        theirs.close()
        self.spare = (pid, ours)

    def _hand_to_spare(self, request, fds, conn):
        """Give the spare this task (request, the client's stdio and connection); its pid, or None if it cannot take it."""
        if self.spare is None:
            return None
        (pid, ours), self.spare = self.spare, None
        try:
            data = marshal.dumps(request, MARSHAL_VERSION)
            data = len(data).to_bytes(4, "big") + data
            sent = ours.sendmsg([data[:65536]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("4i", *fds, conn.fileno()))])
            ours.sendall(data[sent:])
            return pid
        except OSError as err:  # it died waiting: fork one for this task instead
            print("spare trampoline %d could not take a task: %s" % (pid, err), file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            _end_child(pid)
            return None
        finally:
            ours.close()

    def _drop_spare(self):
        if self.spare is not None:
            (pid, ours), self.spare = self.spare, None
            ours.close()  # it sees EOF and exits
            _end_child(pid)

    def _wait_for_teardowns(self, seconds):
        """Told to stop (the run is ending): tasks that reported early may still be destroying their sandboxes."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + seconds
        while self.tasks and time.monotonic() < deadline:
            ready, _, _ = select.select(list(self.tasks), [], [], max(0.0, deadline - time.monotonic()))
            for pidfd in ready:
                self._reap(pidfd)

    def _reap(self, pidfd):
        pid, conn = self.tasks.pop(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 1
        _send(conn, {"exit": code})
        conn.close()

    def incompatible(self, request):
        """Metaflow reads its config from the environment at import: a task whose config differs needs its own import."""
        env = request.get("env") or {}
        keys = {k for k in set(env) | set(self.env) if k.startswith(("METAFLOW_", "PYTHON")) and k not in RUNTIME_ENV}
        differ = sorted(k for k in keys if env.get(k) != self.env.get(k))
        if differ:
            return "its environment differs from the sandbox server's in %s" % ", ".join(differ[:3])
        if os.path.abspath(os.path.join(request.get("cwd") or "/", (request.get("argv") or [""])[0])) != self.flow_file:
            return "another flow file"
        return None


def _end_child(pid):
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _spare(sock, code, flow_file, inherited):
    """A trampoline forked ahead: wait for a task from the server, then run it as `_child` does.
    Exits quietly when the server goes (EOF) or is told to stop before a task came."""
    try:
        for fd in inherited:
            try:
                os.close(fd)
            except OSError:
                pass
        request, fds = _receive(sock, nfds=4)  # EOF (the server is gone) raises too
        sock.close()
        conn = socket.socket(fileno=fds[3])
    except BaseException:
        os._exit(0)
    _child(request, fds[:3], conn, code, flow_file, [])  # never returns


def _exit_on_signal(signum, frame):
    sys.exit(0)


def _child(request, fds, conn, code, flow_file, inherited):
    """The forked trampoline: the client's stdio, env, cwd and argv, then the flow file as __main__.

    Never returns: whatever happens (a second signal during teardown included), it ends in os._exit,
    so a child can never fall back into the server's loop.
    """
    global _early
    exit_code = 1
    try:
        try:
            log_fd = os.dup(sys.stderr.fileno())  # the server's log: where a teardown after an early report writes
            _become_task(request, fds, inherited)
            client = "python client" if conn.family == socket.AF_UNIX else "shell client"
            _early = {"conn": conn, "log_fd": log_fd, "reported": None, "started": time.monotonic(), "client": client}
            _watch_client(conn)
            exit_code = _run_flow_file(code, flow_file)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            if _early is None or _early["reported"] is None:
                _send(conn, {"exit": exit_code})
            else:
                exit_code = _early["reported"]
        finally:
            os._exit(exit_code & 0xFF)


def report_early(exit_code):
    """The task's outcome is final (its logs saved, its metadata synced): tell the client now, so the
    runtime goes on while this process destroys the sandbox (a provider's delete is a network round
    trip). Its output from here on goes to the server's log; it still exits with this code. The
    lifeline still covers the sandbox: the reaper destroys it if this process dies before it does.
    A no-op outside a forked trampoline."""
    if _early is None or _early["reported"] is not None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _early["reported"] = exit_code
    ran = time.monotonic() - _early["started"]
    _debug_line("fast path: trampoline ran %.3fs, %s (reported before the sandbox's teardown)" % (ran, _early["client"]))
    devnull = os.open(os.devnull, os.O_RDONLY)
    for target, fd in ((0, devnull), (1, _early["log_fd"]), (2, _early["log_fd"])):
        os.dup2(fd, target)  # the runtime's pipes close with the client: it sees the task end
    os.close(devnull)
    _send(_early["conn"], {"exit": exit_code})


def _become_task(request, fds, inherited):
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python process
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    _rebind_stdio()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop("PYTHONNOUSERSITE", None)  # as after the trampoline's re-exec with the launcher's Python
    sys.argv = list(request["argv"])


def _rebind_stdio():
    """sys.std* of the server wrap its log file's buffers; the task writes to the runtime's pipes, unbuffered."""
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _watch_client(conn):
    """The client's connection closes when it dies, by any signal: end the task, which destroys its sandbox.
    The shell client forwards its signals as lines "sig N" (the Python one signals the task itself)."""

    def watch():
        pending = b""
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                if _early is None or _early["reported"] is None:  # after an early report the client just left
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                kind, _, value = line.decode("ascii", "replace").partition(" ")
                if kind == "sig" and value.strip().isdigit() and int(value) in FORWARDED:
                    os.kill(os.getpid(), int(value))

    threading.Thread(target=watch, name="sandbox-client-watch", daemon=True).start()


def _run_flow_file(code, flow_file):
    """What `python flow.py ...` does after its imports: the flow's code as __main__, then its CLI."""
    module = types.ModuleType("__main__")
    module.__file__ = flow_file
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    started = time.monotonic()
    try:
        exec(code, module.__dict__)
        return 0
    except SystemExit as done:
        if done.code is None:
            return 0
        if isinstance(done.code, int):
            return done.code
        print(done.code, file=sys.stderr)
        return 1
    finally:
        if _early is None or _early["reported"] is None:
            _debug_line("fast path: trampoline ran %.3fs, %s" % (time.monotonic() - started, _early["client"] if _early else "?"))


def _debug_line(line):
    if os.environ.get("METAFLOW_SANDBOX_DEBUG_FAST_PATH"):
        print(line, file=sys.stderr, flush=True)
