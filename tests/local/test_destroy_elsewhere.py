"""Destroying and listing a local sandbox from a process that did not create it (the lifeline's reaper,
``metaflow-sandbox gc``): real owner processes, killed with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import uuid

import pytest
from metaflow_sandbox import Backend, Sandbox, SandboxHandle, SandboxSpec

from .local_helpers import PY, pids_with, wait_until

OWNER = textwrap.dedent(
    """
    import json, sys
    from metaflow_sandbox import Backend, Resources, SandboxSpec
    isolation, token, run = sys.argv[1:4]
    spec = SandboxSpec(labels={"metaflow-sandbox": "1", "run": run}, resources=Resources(memory_mb=200),
                       options={"isolation": isolation, "root": sys.argv[4]})
    sb = Backend("local").create(spec)
    cg = sb.handle.native.cgroup.path if sb.handle.native.cgroup else None
    print(json.dumps({"id": sb.id, "root": sb.handle.native.root, "cgroup": cg}), flush=True)
    sb.run(["sh", "-c", "sleep %s & sleep %s; wait" % (token, token)])
    """
)


@pytest.fixture
def base(sandbox_root: str) -> str:
    return sandbox_root


def _start_owner(isolation: str, base: str) -> tuple[subprocess.Popen, dict, str, str]:
    token = "323.%d%d" % (os.getpid() % 1000, len(isolation))
    run = uuid.uuid4().hex[:8]
    owner = subprocess.Popen([PY, "-c", OWNER, isolation, token, run, base], stdout=subprocess.PIPE, text=True)
    info = json.loads(owner.stdout.readline())  # type: ignore[union-attr]
    assert wait_until(lambda: len(pids_with("sleep " + token)) == 2, timeout=10)
    return owner, info, token, run


def _bare(sandbox_id: str, base: str, isolation: str) -> Sandbox:
    backend = Backend("local", options={"isolation": isolation, "root": base})
    return Sandbox(backend, SandboxHandle("local", sandbox_id, options={"isolation": isolation, "root": base}))


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_destroy_by_id_after_the_owner_was_sigkilled(isolation: str, base: str) -> None:
    owner, info, token, _ = _start_owner(isolation, base)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    if isolation == "none":  # without bwrap nothing ties the processes to their owner: they live on
        assert pids_with("sleep " + token)
    assert os.path.isdir(info["root"])
    assert _bare(info["id"], base, isolation).destroy() is True
    assert wait_until(lambda: not pids_with("sleep " + token))
    assert not os.path.exists(info["root"])
    if info["cgroup"]:
        assert not os.path.exists(info["cgroup"])
    assert _bare(info["id"], base, isolation).destroy() is False  # nothing there any more


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_list_removes_the_sandbox_of_a_sigkilled_owner(isolation: str, base: str) -> None:
    owner, info, token, run = _start_owner(isolation, base)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    assert os.path.isdir(info["root"])
    assert Backend("local", options={"isolation": isolation, "root": base}).list({"run": run}) == []
    assert wait_until(lambda: not pids_with("sleep " + token))
    assert not os.path.exists(info["root"])
    if info["cgroup"]:
        assert not os.path.exists(info["cgroup"])


def test_destroy_by_id_while_the_owner_still_runs(base: str) -> None:
    owner, info, token, _ = _start_owner("bwrap", base)
    try:
        assert _bare(info["id"], base, "bwrap").destroy() is True
        assert wait_until(lambda: not pids_with("sleep " + token))
        assert not os.path.exists(info["root"])
        owner.wait(10)  # its exec ended: the owner learns the sandbox is gone and exits with the error
        assert owner.returncode != 0
    finally:
        owner.kill()
        owner.wait()


def test_list_sees_other_processes_sandboxes_and_their_labels(base: str) -> None:
    owner, info, _, run = _start_owner("bwrap", base)
    try:
        backend = Backend("local", options={"root": base})
        mine = backend.create(SandboxSpec(labels={"metaflow-sandbox": "1", "run": run, "who": "me"}, options={"root": base}))
        try:
            assert sorted(s.id for s in backend.list({"run": run})) == sorted([info["id"], mine.id])
            assert [s.id for s in backend.list({"who": "me"})] == [mine.id]
            assert backend.list({"run": "nobody"}) == []
        finally:
            mine.destroy()
    finally:
        owner.kill()
        owner.wait()
        _bare(info["id"], base, "bwrap").destroy()


@pytest.mark.parametrize("bad_id", ["local-../../etc", "nope", "", "local-0123456789ab"])
def test_destroy_of_an_unknown_or_malformed_id_is_false(bad_id: str, base: str) -> None:
    assert _bare(bad_id, base, "bwrap").destroy() is False


def test_a_remover_killed_half_way_is_finished_by_the_next_sweep(base: str) -> None:
    owner, info, token, run = _start_owner("bwrap", base)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    root = info["root"]
    half = os.path.join(base, ".%s-gone" % os.path.basename(root))
    os.rename(root, half)  # what a remover leaves when it dies right after its first step
    assert [m for m in open("/proc/self/mountinfo") if half in m]  # its tmpfs still mounted
    assert Backend("local", options={"root": base}).list({"run": run}) == []  # list sweeps
    assert os.listdir(base) == []
    assert not [m for m in open("/proc/self/mountinfo") if base in m]
    if info["cgroup"]:
        assert not os.path.exists(info["cgroup"])
    assert not pids_with("sleep " + token)


def test_cli_gc_in_another_process_destroys_a_live_owners_sandbox(base: str) -> None:
    from .local_helpers import run_cli

    owner, info, token, _ = _start_owner("bwrap", base)
    try:
        env = dict(os.environ, METAFLOW_SANDBOX_LOCAL_ROOT=base)
        listed = run_cli("list", "--backend", "local", "--json", env=env)
        assert listed.returncode == 0 and [s["id"] for s in json.loads(listed.stdout)] == [info["id"]]
        gc = run_cli("gc", "--backend", "local", env=env)
        assert gc.returncode == 0 and "destroyed local sandbox %s" % info["id"] in gc.stdout
        assert wait_until(lambda: not pids_with("sleep " + token))
        assert os.listdir(base) == []
        owner.wait(10)
        assert owner.returncode != 0  # its exec learnt the sandbox is gone
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root launcher stages a sandbox's data outside its root")
def test_staged_data_of_a_dead_owner_whose_root_is_gone_is_swept(tmp_path) -> None:
    """A root launcher stages a sandbox's data (its tmpfs disk, its binds) under /tmp when the sandbox's uid cannot
    reach its root; if the owner dies and its root goes too (a deleted tmp dir), the next sweep still removes it."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    base = str(private / "root")
    owner, info, token, run = _start_owner("bwrap", base)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    name = os.path.basename(info["root"])
    staged = [line.split()[4] for line in open("/proc/self/mountinfo") if "/metaflow-sandbox-stage-" in line and name in line]
    assert staged, "the sandbox's data was not staged"
    subprocess.run(["rm", "-rf", base], check=True)  # its state is gone; its staged data and mounts are not
    Backend("local", options={"root": str(tmp_path / "other")}).list({"run": run})  # a later launcher's sweep
    assert not [line for line in open("/proc/self/mountinfo") if name in line]
    assert not [p for p in staged if os.path.exists(p)]
    assert wait_until(lambda: not pids_with("sleep " + token), timeout=10)
