"""The local backend's prepared environments through the facade: real pip installs, real bwrap sandboxes.

One session-wide directory, so the tiny package is installed once for all of these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from metaflow_sandbox import ENVIRONMENT_LABEL, Backend, EnvironmentBuildError, EnvironmentSpec, SandboxSpec, UnsupportedOptionError

PY = "%d.%d" % sys.version_info[:2]


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("environments"))


@pytest.fixture(scope="module")
def local(env_dir):
    return Backend("local", options={"environments_dir": env_dir})


@pytest.fixture(scope="module")
def prepared(local):
    logs: list[str] = []
    env = local.prepare_environment(EnvironmentSpec(PY, ("tabulate==0.9.0",)), on_log=logs.append)
    return env, logs


def test_build_then_find(local, prepared, env_dir):
    env, logs = prepared
    assert env.built and env.state == "ready" and env.backend == "local"
    assert os.path.dirname(env.ref) == env_dir and env.key == EnvironmentSpec(PY, ("tabulate==0.9.0",)).key
    assert os.path.isfile(os.path.join(env.ref, "tabulate", "__init__.py"))
    assert any("tabulate" in line for line in logs)  # pip's own output streamed
    assert env.labels[ENVIRONMENT_LABEL] == env.key
    again = local.prepare_environment(EnvironmentSpec(PY, ("tabulate==0.9.0", "tabulate==0.9.0")))  # duplicates: same key
    assert again.ref == env.ref and not again.built


def test_sandbox_from_environment_imports_it_and_cannot_write_it(local, prepared):
    env, _ = prepared
    out: list[str] = []
    err: list[str] = []
    with local.create(SandboxSpec(environment=env.ref)) as sb:
        code = "import tabulate, os; print(tabulate.__file__, flush=True); open(os.path.join(os.path.dirname(tabulate.__file__), 'x'), 'w')"
        result = sb.exec([sys.executable, "-c", code], on_stdout=out.append, on_stderr=err.append)
    assert "".join(out).strip() == os.path.join(env.ref, "tabulate", "__init__.py")
    assert result.exit_code != 0 and "Read-only file system" in "".join(err)
    assert not os.path.exists(os.path.join(env.ref, "x"))


def test_without_environment_the_package_is_absent(local):
    with local.create(SandboxSpec()) as sb:
        assert sb.exec([sys.executable, "-c", "import tabulate"]).exit_code != 0


def test_two_processes_preparing_one_key_build_once(env_dir):
    script = textwrap.dedent(
        """
        import json, sys
        from metaflow_sandbox import Backend, EnvironmentSpec
        local = Backend("local", options={"environments_dir": sys.argv[1]})
        env = local.prepare_environment(EnvironmentSpec(sys.argv[2], ("toolz==0.12.1",)))
        print(json.dumps([env.ref, env.built]))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, env_dir, PY], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert results[0][0] == results[1][0]
    assert sorted(r[1] for r in results) == [False, True]
    assert not [n for n in os.listdir(env_dir) if n.startswith(".build-")]


def test_failed_build_raises_with_pips_output_and_leaves_nothing(local, env_dir):
    spec = EnvironmentSpec(PY, ("mfsb-no-such-package==9.9",))
    with pytest.raises(EnvironmentBuildError) as info:
        local.prepare_environment(spec)
    assert "No matching distribution found for mfsb-no-such-package==9.9" in info.value.build_log
    assert "packages=" in str(info.value) and "Fix:" in str(info.value)
    assert not os.path.exists(os.path.join(env_dir, spec.key))
    assert not [n for n in os.listdir(env_dir) if n.startswith(".build-")]
    assert spec.key not in [e.key for e in local.environments()]


def test_list_and_remove(local, env_dir):
    env = local.prepare_environment(EnvironmentSpec(PY, ("tabulate==0.9.0", "toolz==0.12.1")))
    listed = {e.ref: e for e in local.environments()}
    assert env.ref in listed
    entry = listed[env.ref]
    assert entry.size_bytes and entry.size_bytes > 10_000 and entry.created_at and entry.last_used_at
    assert local.remove_environment(env.ref) is True
    assert not os.path.exists(env.ref) and env.ref not in [e.ref for e in local.environments()]
    assert local.remove_environment(env.ref) is False
    with pytest.raises(UnsupportedOptionError) as info:
        local.create(SandboxSpec(environment=env.ref))
    assert "metaflow-sandbox prepare" in str(info.value)
    with pytest.raises(EnvironmentBuildError):
        local.remove_environment("/etc")  # not one of ours


def test_the_install_runs_in_a_sandbox(local, tmp_path):
    """A package's setup code runs at install time: it sees a sandbox (its hostname, no launcher home), not the launcher."""
    import io
    import socket
    import tarfile
    import uuid

    home = os.path.expanduser("~")
    marker = os.path.join(home, ".mfsb-probe-%s" % uuid.uuid4().hex[:8])
    setup_py = textwrap.dedent(
        """
        import os, socket
        from setuptools import setup
        with open("mfsbprobe.py", "w") as f:
            f.write("HOSTNAME = %%r\\nSEES_MARKER = %%r\\n" %% (socket.gethostname(), os.path.exists(%r)))
        setup(name="mfsbprobe", version="1.0", py_modules=["mfsbprobe"])
        """
        % marker
    )
    # Outside /tmp and any home, so the sandbox sees it (read-only); an sdist, so pip builds it in its temp dir.
    sdist = "/var/tmp/mfsbprobe-%s/mfsbprobe-1.0.tar.gz" % uuid.uuid4().hex[:8]
    os.makedirs(os.path.dirname(sdist))
    open(marker, "w").close()  # a file in the launcher's home: the install must not see it
    try:
        with tarfile.open(sdist, "w:gz") as tar:
            for name, text in (("setup.py", setup_py), ("PKG-INFO", "Metadata-Version: 2.1\nName: mfsbprobe\nVersion: 1.0\n")):
                data = text.encode()
                info = tarfile.TarInfo("mfsbprobe-1.0/" + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        env = local.prepare_environment(EnvironmentSpec(PY, ("mfsbprobe @ file://" + sdist,)))
    finally:
        import shutil

        shutil.rmtree(os.path.dirname(sdist), ignore_errors=True)
        os.unlink(marker)
    probe = open(os.path.join(env.ref, "mfsbprobe.py")).read()
    assert "HOSTNAME = 'local-" in probe and socket.gethostname() not in probe, probe
    assert "SEES_MARKER = False" in probe, probe
    assert local.remove_environment(env.ref)


def test_a_killed_builds_leftovers_are_removed_by_the_next_build(local, env_dir):
    spec = EnvironmentSpec(PY, ("toolz==0.12.1", "tabulate==0.9.0"))
    leftover = os.path.join(env_dir, ".build-%s-999999" % spec.key, "target")
    os.makedirs(leftover)  # what a launcher killed mid-build leaves
    env = local.prepare_environment(spec)
    assert not os.path.exists(os.path.dirname(leftover))
    assert local.remove_environment(env.ref)
