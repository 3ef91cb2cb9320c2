"""The lifeline's reaper: what a dead owner left is destroyed, what it released is not.

Owners are real processes killed with SIGKILL; the reaper is the real server (in a thread, with a
scripted backend injected, or as the real detached process for its own lifetime).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
from metaflow_sandbox import Backend, SandboxHandle, SandboxSpec, hookimpl
from metaflow_sandbox import lifeline as lifeline_mod
from metaflow_sandbox.lifeline import OWNER_LABEL, Lifeline, Reaper, spawn
from metaflow_sandbox.plugins import build_plugin_manager


class Recorder:
    """A backend that records destroys and answers list() from what a test put in ``listed``."""

    def __init__(self):
        self.destroyed: Counter[str] = Counter()
        self.listed: list[SandboxHandle] = []
        self.list_calls: list[dict] = []
        self.created: list[SandboxSpec] = []
        self.hang: threading.Event | None = None  # set: destroy blocks like a provider that never answers

    @hookimpl
    def sandbox_create(self, spec):
        self.created.append(spec)
        return SandboxHandle("rec", "sb-%d" % len(self.created), labels=dict(spec.labels))

    @hookimpl
    def sandbox_exec(self, handle, command, env, cwd, timeout, on_stdout, on_stderr):
        raise NotImplementedError

    @hookimpl
    def sandbox_upload(self, handle, files):
        return []

    @hookimpl
    def sandbox_download(self, handle, files):
        return []

    @hookimpl
    def sandbox_destroy(self, handle):
        if self.hang is not None:
            self.hang.wait(60)
        self.destroyed[handle.sandbox_id] += 1
        return True

    @hookimpl
    def sandbox_list(self, labels, options):
        self.list_calls.append(dict(labels))
        return [h for h in self.listed if all(h.labels.get(k) == v for k, v in labels.items())]


@pytest.fixture
def reaper(tmp_path, monkeypatch):
    monkeypatch.setattr(lifeline_mod, "SWEEP_DELAYS", (0.0, 0.2))
    monkeypatch.setattr(lifeline_mod, "ORPHAN_TERM_AFTER", 0.5)
    rec = Recorder()
    path = str(tmp_path / "r.sock")
    server = Reaper(path, backend_factory=lambda name, options: Backend(name, pm=build_plugin_manager(name, rec), options=options))
    lifeline_mod.FIRST_CONNECTION_WAIT, saved = 60.0, lifeline_mod.FIRST_CONNECTION_WAIT
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield path, rec, server
    lifeline_mod.FIRST_CONNECTION_WAIT = saved


def _owner(path: str, script: str) -> subprocess.Popen:
    """A real owner process: connects, runs ``script`` (with ``line``), says ready, then waits to be killed."""
    code = "import sys, time\nfrom metaflow_sandbox.lifeline import Lifeline\nline = Lifeline.connect(sys.argv[1])\n"
    code += textwrap.dedent(script) + "\nprint('ready', flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _cmdline(pid: int) -> bytes:
    try:
        return open("/proc/%d/cmdline" % pid, "rb").read()
    except OSError:
        return b""


def _eventually(check, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_sigkilled_owner_s_sandbox_is_destroyed(reaper):
    path, rec, _ = reaper
    owner = _owner(path, "k = line.intent('rec', {}); line.own(k, 'sb-7', '/w', {})")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert _eventually(lambda: rec.destroyed["sb-7"] == 1), rec.destroyed


def test_released_sandbox_is_left_alone(reaper):
    path, rec, _ = reaper
    owner = _owner(path, "k = line.intent('rec', {}); line.own(k, 'sb-8', '/w', {}); line.release(k)")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    time.sleep(0.5)
    assert rec.destroyed == Counter()


def test_create_in_flight_is_found_by_its_owner_label(reaper):
    path, rec, _ = reaper
    owner = _owner(path, "k = line.intent('rec', {})")
    # The owner died during the create: the provider finished it anyway, labelled with the key.
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert _eventually(lambda: rec.list_calls), "the reaper never looked for the sandbox"
    wanted = rec.list_calls[0][OWNER_LABEL]
    rec.listed.append(SandboxHandle("rec", "sb-late", labels={OWNER_LABEL: wanted}))
    rec.listed.append(SandboxHandle("rec", "sb-other", labels={OWNER_LABEL: "someone-else"}))
    assert _eventually(lambda: rec.destroyed["sb-late"] == 1), rec.destroyed
    assert rec.destroyed["sb-other"] == 0


def test_facade_labels_owns_and_releases(reaper):
    path, rec, _ = reaper
    line = Lifeline.connect(path)
    backend = Backend("rec", pm=build_plugin_manager("rec", rec), lifeline=line)
    sbx = backend.create(SandboxSpec(labels={"a": "b"}))
    assert rec.created[0].labels[OWNER_LABEL] and rec.created[0].labels["a"] == "b"
    kept = backend.create(SandboxSpec())
    sbx.destroy()  # released: the reaper must not destroy it again
    line.close()  # the owner "dies" holding `kept`
    assert _eventually(lambda: rec.destroyed[kept.id] == 1), rec.destroyed  # by the reaper
    assert rec.destroyed[sbx.id] == 1


def test_launcher_gone_stops_owners_that_did_not_notice(reaper):
    path, rec, server = reaper
    launcher = Lifeline.connect(path, role="launcher")
    owner = _owner(path, "import signal\nsignal.signal(signal.SIGTERM, lambda *a: (print('term', flush=True), sys.exit(3)))")
    assert _eventually(lambda: owner.pid in server.owner_pids)
    launcher.close()
    assert owner.stdout.readline().strip() == "term"
    assert owner.wait(10) == 3


def test_detached_reaper_outlives_its_spawner_group_and_exits_when_idle(tmp_path):
    path = spawn(str(tmp_path / "d.sock"))
    line = Lifeline.connect(path, wait=10)
    (pid,) = [int(p) for p in os.listdir("/proc") if p.isdigit() and path.encode() in _cmdline(int(p))]
    assert os.getsid(pid) != os.getsid(0), "a signal to our session/group must not reach the reaper"
    line.close()
    assert _eventually(lambda: not os.path.exists(path), timeout=10), "the reaper did not exit once idle"
    with pytest.raises(OSError):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)


def test_reaper_gives_up_on_a_provider_that_never_answers(reaper, monkeypatch):
    path, rec, server = reaper
    monkeypatch.setattr(lifeline_mod, "REAP_GIVE_UP", 1.0)
    monkeypatch.setattr(lifeline_mod, "IDLE_EXIT", 0.1)
    rec.hang = hang = threading.Event()
    owner = _owner(path, "k = line.intent('rec', {}); line.own(k, 'sb-9', '/w', {})")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert _eventually(lambda: server.reaping == 1)
    assert _eventually(lambda: not os.path.exists(path), timeout=10), "the reaper must exit, leaving the sandbox to its lease"
    hang.set()
