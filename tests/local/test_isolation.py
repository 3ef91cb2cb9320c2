"""What a command inside a local sandbox can and cannot see or change on the host."""

from __future__ import annotations

import os
import socket
import uuid

from metaflow_sandbox import Sandbox


def sh(sb: Sandbox, script: str) -> tuple[int, str, str]:
    return sb.run(["sh", "-c", script])


def test_host_root_is_read_only(sandbox: Sandbox) -> None:
    name = "/mfsb-%s" % uuid.uuid4().hex
    code, _, err = sh(sandbox, "echo x > %s" % name)
    assert code != 0 and "Read-only" in err
    assert not os.path.exists(name)


def test_host_home_is_hidden_and_unwritable(sandbox: Sandbox) -> None:
    home = os.path.realpath(os.path.expanduser("~"))
    marker = os.path.join(home, ".mfsb-secret-%s" % uuid.uuid4().hex)
    with open(marker, "w") as f:
        f.write("secret")
    try:
        code, _, _ = sh(sandbox, "cat %s" % marker)
        assert code != 0
        code, _, _ = sh(sandbox, "echo x > %s/.mfsb-written" % home)
        assert code != 0
        assert not os.path.exists(os.path.join(home, ".mfsb-written"))
    finally:
        os.unlink(marker)


def test_home_inside_is_the_writable_workdir(sandbox: Sandbox) -> None:
    code, out, _ = sh(sandbox, 'echo hello > "$HOME/f" && pwd && echo "$HOME" && cat f')
    assert code == 0
    assert out.split() == [sandbox.handle.workdir, sandbox.handle.workdir, "hello"]


def test_own_pid_namespace(sandbox: Sandbox) -> None:
    code, out, _ = sh(sandbox, "echo $$; ls /proc | grep -c '^[0-9]'; test -d /proc/%d && echo leaked" % os.getpid())
    pid, nprocs = out.split()[:2]
    assert "leaked" not in out
    assert int(pid) < 10 and int(nprocs) < 10  # only the sandbox's own few processes


def test_own_hostname(sandbox: Sandbox) -> None:
    code, out, _ = sandbox.run(["hostname"])
    assert code == 0
    assert out.strip() == sandbox.id != socket.gethostname()


def test_private_tmp(sandbox: Sandbox, make) -> None:  # type: ignore[no-untyped-def]
    host_file = "/tmp/mfsb-host-%s" % uuid.uuid4().hex
    open(host_file, "w").close()
    try:
        assert sh(sandbox, "test -e %s" % host_file)[0] != 0
        assert sh(sandbox, "echo a > /tmp/inside")[0] == 0
        other = make()
        assert sh(other, "test -e /tmp/inside")[0] != 0  # sandboxes do not share /tmp
        assert sh(sandbox, "cat /tmp/inside")[1] == "a\n"  # but later execs of the same one do
    finally:
        os.unlink(host_file)


def test_launcher_environment_does_not_leak(make, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MFSB_TEST_SECRET", "hunter2")
    sb = make(env={"GIVEN": "yes"})
    code, out, _ = sb.run(["env"])
    assert code == 0
    assert "hunter2" not in out and "GIVEN=yes" in out
    assert "PATH=" in out and "HOME=%s" % sb.handle.workdir in out


def test_launcher_python_is_on_path(sandbox: Sandbox) -> None:
    import sys

    code, out, _ = sandbox.run(["python", "-c", "import sys, metaflow_sandbox; print(sys.prefix)"])
    assert code == 0 and out.strip() == sys.prefix


def test_background_process_ends_with_its_exec(sandbox: Sandbox) -> None:
    from .local_helpers import pids_with, wait_until

    token = "318.%d" % (os.getpid() % 1000)
    code, _, _ = sh(sandbox, "sleep %s >/dev/null 2>&1 &" % token)
    assert code == 0
    assert wait_until(lambda: not pids_with("sleep " + token))


def test_no_capabilities_so_read_only_stays_read_only(sandbox: Sandbox) -> None:
    # A root launcher's sandbox must not be able to remount the host's /usr read-write.
    name = "/usr/mfsb-%s" % uuid.uuid4().hex
    code, out, _ = sh(sandbox, "grep CapEff /proc/self/status; mount -o remount,rw,bind /usr || echo refused; touch %s" % name)
    assert "CapEff:\t0000000000000000" in out and "refused" in out and code != 0
    assert not os.path.exists(name)


def test_run_is_hidden_but_dns_config_is_not(sandbox: Sandbox) -> None:
    visible = os.listdir("/run")
    code, out, _ = sh(sandbox, "ls -A /run; test -r /etc/resolv.conf && echo resolv-ok")
    assert not set(out.split()) & set(visible)  # daemon sockets under /run are out of reach
    assert ("resolv-ok" in out) == os.path.isfile("/etc/resolv.conf")
