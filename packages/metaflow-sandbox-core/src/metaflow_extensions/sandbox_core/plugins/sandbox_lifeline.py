"""The launcher's and the trampoline's side of the lifeline (metaflow_sandbox.lifeline).

The launcher starts one reaper per run and holds a connection to it; each trampoline connects as
an owner and also watches its launcher, so a launcher killed alone (SIGTERM, SIGKILL) takes its
tasks' sandboxes with it instead of leaving the trampolines to run on as orphans.
"""

import os
import signal
import threading
import time

#: Set by the launcher for its trampolines: the pid whose death ends the task.
LAUNCHER_PID_ENV = "METAFLOW_SANDBOX_LAUNCHER_PID"
_launcher_line = None


def launcher_env():
    """Start this run's reaper once (in the launcher); the env its trampolines need to find it."""
    global _launcher_line
    from metaflow_sandbox.lifeline import SOCKET_ENV, Lifeline, spawn

    if _launcher_line is None:
        path = spawn()
        _launcher_line = {"path": path}

        def hold():  # connect off the critical path; the socket stays open for the launcher's life
            try:
                _launcher_line["line"] = Lifeline.connect(path, role="launcher", wait=30.0)
            except OSError:
                pass  # trampolines start a reaper of their own when they find none

        threading.Thread(target=hold, name="sandbox-lifeline", daemon=True).start()
    return {SOCKET_ENV: _launcher_line["path"], LAUNCHER_PID_ENV: str(os.getpid())}


def watch_launcher(period=0.25):
    """In a trampoline: SIGTERM ourselves (which destroys the sandbox) once the launcher is gone."""
    expected = os.environ.get(LAUNCHER_PID_ENV)
    if not expected or not expected.isdigit() or os.getppid() != int(expected):
        return  # not started by a launcher (a scheduler's container, a manual run)

    def watch():
        while os.getppid() == int(expected):
            time.sleep(period)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sandbox-launcher-watch", daemon=True).start()


def attach():
    """The trampoline's lifeline: the run's reaper, else one of its own."""
    from metaflow_sandbox.lifeline import Lifeline

    return Lifeline.attach()
