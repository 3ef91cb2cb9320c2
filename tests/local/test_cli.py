"""The ``metaflow-sandbox`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

from .local_helpers import PY, pids_with, run_cli, wait_until


def test_exec_prints_output_and_exits_zero() -> None:
    proc = run_cli("exec", "--backend", "local", "--", "python", "-c", "print(1)")
    assert (proc.returncode, proc.stdout) == (0, "1\n")


def test_exec_propagates_exit_code_and_stderr() -> None:
    proc = run_cli("exec", "--backend", "local", "--", "sh", "-c", "echo oops >&2; exit 7")
    assert (proc.returncode, proc.stderr) == (7, "oops\n")


def test_exec_options_reach_the_sandbox() -> None:
    script = 'nproc; echo "$GREETING"; python -c "import socket; socket.create_connection((\'1.1.1.1\', 53), 2)"'
    proc = run_cli("exec", "--backend", "local", "--cpu", "1", "--env", "GREETING=hi", "--no-network", "--", "sh", "-c", script)
    assert proc.returncode == 1 and "Network is unreachable" in proc.stderr  # no route at all without network
    assert proc.stdout.split() == ["1", "hi"]


def test_exec_memory_limit_exit_code() -> None:
    proc = run_cli("exec", "--backend", "local", "--memory", "64", "--", "python", "-c", "b = bytearray(400 << 20)")
    assert proc.returncode == 137 and "memory limit of 64 MB" in proc.stderr


def test_exec_timeout_is_an_error_with_a_fix() -> None:
    proc = run_cli("exec", "--backend", "local", "--timeout", "0.3", "--", "sleep", "20")
    assert proc.returncode == 2 and "Fix:" in proc.stderr and "timeout" in proc.stderr


def test_unknown_backend() -> None:
    proc = run_cli("exec", "--backend", "no-such-backend", "--", "true")
    assert proc.returncode == 2
    assert "No sandbox backend named 'no-such-backend'" in proc.stderr and "Fix:" in proc.stderr


def test_backends_json_lists_local() -> None:
    proc = run_cli("backends", "--json")
    assert proc.returncode == 0, proc.stderr
    local = [b for b in json.loads(proc.stdout) if b["name"] == "local"]
    assert len(local) == 1 and local[0]["loads"] is True and local[0]["configured"] is True
    assert "sandbox_exec" in local[0]["hooks"]


def test_backends_table() -> None:
    proc = run_cli("backends")
    assert proc.returncode == 0 and proc.stdout.startswith("NAME") and "\nlocal " in proc.stdout


def test_list_and_kill_local(sandbox_root) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, METAFLOW_SANDBOX_LOCAL_ROOT=sandbox_root)  # list shows every live sandbox under the root
    assert run_cli("list", "--backend", "local", "--json", env=env).stdout.strip() == "[]"
    proc = run_cli("kill", "--backend", "local", "--label", "run=1", env=env)
    assert proc.returncode == 0 and "no sandboxes" in proc.stdout


def test_sigterm_destroys_the_sandbox() -> None:
    token = "313.%d" % (os.getpid() % 1000)
    before = set(os.listdir("/tmp/metaflow-sandbox-%d" % os.getuid()))
    proc = subprocess.Popen(
        [PY, "-m", "metaflow_sandbox", "exec", "--backend", "local", "--", "sleep", token],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_until(lambda: bool(pids_with("sleep " + token)), timeout=10)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 143
    assert wait_until(lambda: not pids_with("sleep " + token))
    time.sleep(0.1)
    after = set(os.listdir("/tmp/metaflow-sandbox-%d" % os.getuid()))
    assert not [d for d in after - before if "-%d-" % proc.pid in d]


def test_doctor_reports_isolation() -> None:
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    local = json.loads(proc.stdout)["local"]
    assert local["isolation"] == "bubblewrap" and local["works"] is True
    broken = run_cli("doctor", env=dict(os.environ, METAFLOW_SANDBOX_LOCAL_BWRAP="/bin/false"))
    assert broken.returncode == 1 and "local.isolation    NONE" in broken.stdout and "Fix: pip install" in broken.stdout


def test_ctrl_c_destroys_the_sandbox() -> None:
    token = "311.%d" % (os.getpid() % 1000)
    proc = subprocess.Popen(
        [PY, "-m", "metaflow_sandbox", "exec", "--backend", "local", "--", "sleep", token], stderr=subprocess.PIPE, text=True
    )
    assert wait_until(lambda: bool(pids_with("sleep " + token)), timeout=10)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 130
    assert "interrupted; destroying the sandbox" in proc.stderr.read()  # type: ignore[union-attr]
    assert wait_until(lambda: not pids_with("sleep " + token))


def test_list_kill_gc_in_process(make, capsys, monkeypatch, sandbox_root) -> None:  # type: ignore[no-untyped-def]
    # In-process; a private root, since list shows every live sandbox under it (other processes' too).
    from metaflow_sandbox.cli import main

    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ROOT", sandbox_root)

    ours_a = make(labels={"metaflow.run": "7"})  # the facade gives every sandbox the marker label
    ours_b = make(labels={"metaflow.run": "8"})
    capsys.readouterr()
    assert main(["list", "--backend", "local", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(s["id"] for s in listed) == sorted([ours_a.id, ours_b.id])
    assert main(["kill", "--backend", "local", "--label", "metaflow.run=7", "--dry-run"]) == 0
    assert "would destroy local sandbox %s" % ours_a.id in capsys.readouterr().out
    assert main(["kill", "--backend", "local", "--label", "metaflow.run=7"]) == 0
    assert "destroyed local sandbox %s" % ours_a.id in capsys.readouterr().out
    assert ours_b.run(["true"])[0] == 0
    assert main(["gc"]) == 0  # every backend that can list
    assert ours_b.id in capsys.readouterr().out
    assert main(["list", "--backend", "local"]) == 0
    assert capsys.readouterr().out.strip() == "BACKEND  ID  LABELS"


def test_gc_sweeps_what_a_killed_launcher_left() -> None:
    launcher = "from metaflow_sandbox import Backend; sb = Backend('local').create(); print(sb.handle.native.root, flush=True)"
    launcher += "; import time; time.sleep(60)"
    proc = subprocess.Popen([PY, "-c", launcher], stdout=subprocess.PIPE, text=True)
    root = proc.stdout.readline().strip()  # type: ignore[union-attr]
    proc.kill()
    proc.wait()
    assert os.path.isdir(root)
    assert run_cli("gc", "--backend", "local").returncode == 0
    assert not os.path.exists(root)


def test_exec_bind_and_root_option(tmp_path, sandbox_root) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "in.txt").write_text("bound")
    root = pathlib.Path(sandbox_root) / "sandboxes"
    proc = run_cli(
        "exec", "--backend", "local", "--bind", "%s:/data:ro" % tmp_path, "--option", "root=%s" % root, "--",
        "sh", "-c", "cat /data/in.txt; touch /data/x",
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout.startswith("bound") and "Read-only" in proc.stderr
    assert root.is_dir() and os.listdir(root) == []  # the sandbox lived there and was removed


def test_exec_ttl_expiry_leaves_nothing(sandbox_root) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("exec", "--backend", "local", "--option", "root=%s" % sandbox_root, "--ttl", "1", "--", "sleep", "30")
    assert proc.returncode != 0 and "ttl" in proc.stderr and "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(sandbox_root) == []
    assert not [m for m in open("/proc/self/mountinfo") if sandbox_root in m]
