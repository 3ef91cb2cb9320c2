"""@pypi/@conda with a sandbox, offline (conda-forge and micromamba's site are unreachable here).

Metaflow's real CondaEnvironment decides the platform to solve for; we only pretend the launcher
is an Apple Silicon laptop, the case where solving for the launcher's platform ships the wrong
binaries into a linux-64 sandbox.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

FLOW = '''
from metaflow import FlowSpec, pypi, sandbox, step

class PypiFlow(FlowSpec):
    @pypi(packages={"pyjokes": "0.8.3"}, python="3.11.7")
    @step
    def start(self):
        self.next(self.remote)

    @sandbox
    @pypi(packages={"pyjokes": "0.8.3"}, python="3.11.7")
    @step
    def remote(self):
        self.next(self.end)

    @step
    def end(self):
        pass
'''


@pytest.fixture
def pypi_flow(tmp_path, monkeypatch):
    path = tmp_path / "pypi_flow.py"
    path.write_text(FLOW)
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_S3", "s3://bucket/prefix")
    # Metaflow reads its config once, at first import, which another test in this process may have done.
    from metaflow.plugins.datastores import s3_storage

    monkeypatch.setattr(s3_storage, "DATASTORE_SYSROOT_S3", "s3://bucket/prefix")
    spec = importlib.util.spec_from_file_location("pypi_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PypiFlow


def _platforms(flow_cls, step_name, monkeypatch):
    from metaflow.decorators import _attach_decorators_to_step
    from metaflow.plugins import DATASTORES
    from metaflow.plugins.pypi import conda_environment

    monkeypatch.setattr(conda_environment, "conda_platform", lambda: "osx-arm64")
    env = conda_environment.CondaEnvironment(flow_cls)
    env.datastore_type = "s3"
    env.datastore = [d for d in DATASTORES if d.TYPE == "s3"][0]
    env.logger = lambda *a, **k: None
    step = getattr(flow_cls, step_name)
    _attach_decorators_to_step(step, list(env.decospecs()))  # what `--environment pypi` does
    for deco in step.decorators:
        deco.external_init()
    resolved = env.get_environment(step)
    return resolved["pypi"]["platforms"], resolved["conda"]["platforms"]


def test_sandboxed_step_is_solved_for_the_sandbox_platform(pypi_flow, monkeypatch):
    pypi_platforms, conda_platforms = _platforms(pypi_flow, "remote", monkeypatch)
    assert pypi_platforms == ["linux-64"]
    assert "linux-64" in conda_platforms


def test_local_step_is_solved_for_the_launcher_platform(pypi_flow, monkeypatch):
    pypi_platforms, _ = _platforms(pypi_flow, "start", monkeypatch)
    assert pypi_platforms == ["osx-arm64"]


def test_trampoline_reexecs_with_the_launcher_python(tmp_path):
    """@conda may point the trampoline at the step's env; it re-execs with the launcher's Python."""
    other = tmp_path / "stepenv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True)
    site = [p for p in sys.path if p.endswith("site-packages")]
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import os, site, sys
        for path in os.environ["PROBE_SITE"].split(os.pathsep):
            site.addsitedir(path)  # .pth files too (editable installs)
        from metaflow_extensions.sandbox_core.plugins.sandbox_cli import _reexec_with_launcher_python
        _reexec_with_launcher_python()
        print(sys.executable, os.environ.get("PYTHONNOUSERSITE"), os.environ.get("METAFLOW_SANDBOX_LAUNCHER_PYTHON"))
    """))
    env = dict(os.environ, PROBE_SITE=os.pathsep.join(site), METAFLOW_SANDBOX_LAUNCHER_PYTHON=sys.executable,
               PYTHONNOUSERSITE="1")
    out = subprocess.run([str(other / "bin" / "python"), str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [sys.executable, "None", "None"]
