"""Secrets stay off command lines, pip requirements install inside the sandbox, Ctrl-C cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from .conftest import FLOWS, PYTHON, S3_SECRET, base_env


@pytest.mark.parametrize("target", ["local-s3", "daytona-s3", "e2b-s3"], indirect=True)
def test_no_secret_in_any_cmdline_metadata_or_log(target):
    """Scan /proc/*/cmdline while a sandboxed step runs; the S3 secret must never appear."""
    seen: list[str] = []
    stop = threading.Event()

    def scan():
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    raw = open("/proc/%s/cmdline" % pid, "rb").read()
                except OSError:
                    continue
                if S3_SECRET.encode() in raw:
                    seen.append(raw.replace(b"\0", b" ").decode(errors="replace")[:300])
            time.sleep(0.05)

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    try:
        run = target.flow("features_flow.py", env={"WORK_SLEEP": "3", "METAFLOW_SANDBOX_FORWARD_ENV": "WORK_SLEEP"})
    finally:
        stop.set()
        scanner.join()
    assert run.returncode == 0, run.output[-4000:]
    assert seen == [], "secret visible in a process command line: %s" % seen[:3]
    assert S3_SECRET not in run.output
    # Nothing stored by the run (metadata, logs, artifacts) carries it either.
    hits = []
    for root, _, files in os.walk(run.cwd / ".metaflow"):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if S3_SECRET.encode() in f.read():
                    hits.append(os.path.join(root, name))
    assert hits == []
    stored = target.client(
        """
        t = Run('FeaturesFlow/%s')['work'].task
        emit({'meta': [str(m.value) for m in t.metadata], 'logs': t.stdout + t.stderr})
        """ % run.run_id(),
        run,
    )
    assert all(S3_SECRET not in v for v in stored["meta"]) and S3_SECRET not in stored["logs"]


@pytest.mark.parametrize("target", ["local-localds"], indirect=True)
def test_pip_requirement_installs_inside_the_sandbox(target):
    """A package the launcher lacks is installed (from PyPI) inside the sandbox and imported there."""
    with pytest.raises(ImportError):
        __import__("pyjokes")
    # Per task, as with @sandbox(prepare=False): a prepared environment would install it on the launcher instead.
    env = {"METAFLOW_SANDBOX_PIP_CACHE": str(target.tmp / "pipcache"), "METAFLOW_SANDBOX_PREPARE": "0"}
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "PIP_CONSTRAINT"):
        if key in os.environ:
            env["METAFLOW_SANDBOX_FORWARD_ENV"] = ",".join(filter(None, [env.get("METAFLOW_SANDBOX_FORWARD_ENV"), key]))
    run = target.flow("pip_flow.py", env=env, timeout=600)
    assert run.returncode == 0, run.output[-4000:]
    data = target.client("t = Run('PipFlow/%s')['joke'].task\nemit([t.data.joke_text, t.data.module_file])" % run.run_id(), run)
    assert data[0]
    assert data[1].startswith(str(target.tmp / "pipcache")), data[1]


@pytest.mark.parametrize("target", ["local-localds", "daytona-s3", "e2b-s3"], indirect=True)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_destroys_the_sandbox(target, sig):
    """Ctrl-C (SIGINT to the process group) or SIGTERM while a step runs leaves no sandbox behind."""
    env = base_env(target.tmp)
    env.update(target.env)
    env.update({"WORK_SLEEP": "120", "METAFLOW_SANDBOX_FORWARD_ENV": "WORK_SLEEP"})
    proc = subprocess.Popen([PYTHON, str(FLOWS / "features_flow.py"), "--no-pylint", "run"], cwd=target.tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 120
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "out-line-0" in line or time.time() > deadline:
                break
        # the line reached us while the step still sleeps: logs are live
        assert any("out-line-0" in ln for ln in lines), "".join(lines)[-3000:]
        # ... and `python flow.py logs` already shows it, before the task ends
        run_id = next(ln.split("run-id ")[1].split(")")[0] for ln in lines if "run-id " in ln)
        deadline = time.time() + 15
        while True:
            logs = target.flow("features_flow.py", "logs", "%s/work" % run_id)
            if "out-line-4" in logs.stdout or time.time() > deadline:
                break
            time.sleep(0.5)
        assert "out-line-4" in logs.stdout, logs.output[-2000:]
        if proc.poll() is not None:  # say why the run ended early: its whole output
            output = "".join(lines)[-3000:] + proc.stdout.read()[-6000:]
            raise AssertionError("the step must still be running; the run ended with %s:\n%s" % (proc.returncode, output))
        os.killpg(proc.pid, sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    deadline = time.time() + 20
    while target.live_sandboxes() and time.time() < deadline:
        time.sleep(0.5)
    # the fixture asserts again that nothing is left alive
    assert target.live_sandboxes() == [], "".join(lines)[-2000:] + rest[-2000:]


@pytest.mark.parametrize("target", ["daytona-s3", "e2b-s3"], indirect=True)
def test_flow_sandbox_list_and_kill(target):
    """`python flow.py sandbox list|kill` find a running step's sandbox by its labels and end it."""
    env = base_env(target.tmp)
    env.update(target.env)
    env.update({"WORK_SLEEP": "120", "METAFLOW_SANDBOX_FORWARD_ENV": "WORK_SLEEP"})
    proc = subprocess.Popen([PYTHON, str(FLOWS / "features_flow.py"), "--no-pylint", "run"], cwd=target.tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "out-line-0" in line:
            break
    try:
        run_id = next(ln.split("run-id ")[1].split(")")[0] for ln in lines if "run-id " in ln)
        listed = target.flow("features_flow.py", "sandbox", "list", "--run-id", run_id)
        assert listed.returncode == 0, listed.output
        live = target.live_sandboxes()
        assert len(live) == 1 and live[0]["id"] in listed.output, listed.output
        assert "%s/work/" % run_id in listed.output
        killed = target.flow("features_flow.py", "sandbox", "kill", "--run-id", run_id)
        assert killed.returncode == 0 and "Destroyed %s" % live[0]["id"] in killed.output, killed.output
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, "the step whose sandbox was killed must fail"
        assert "disappeared" in rest or "failed" in rest.lower()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("target", ["daytona-s3"], indirect=True)
def test_sandbox_that_cannot_start_is_not_retried(target, daytona_emulator):
    """An infrastructure failure before user code ran ends the task, even under @retry."""
    daytona_emulator.set_faults(error_next=100, error_status=500, error_endpoints=["create"])
    try:
        run = target.flow("failures_flow.py")
    finally:  # the emulator is shared by the session: put the defaults back
        daytona_emulator.clear_faults()
    assert run.returncode != 0
    assert "Could not start a 'daytona' sandbox for step flaky" in run.output
    assert "This failed task will not be retried" in run.output
    assert "flaky attempt" not in run.output, "user code must not have run"
