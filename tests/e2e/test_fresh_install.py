"""README's first quick-start command, for real: a fresh venv with only the core installed.

Also proves that `@daytona` without the Daytona package fails at launch naming the pip command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def core_only_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(REPO / "packages" / "metaflow-sandbox-core")],
        capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return venv


def _env(venv: Path, home: Path) -> dict[str, str]:
    home.mkdir(exist_ok=True)
    return {"PATH": "%s:/usr/bin:/bin" % (venv / "bin"), "HOME": str(home), "USER": "tester", "LANG": "C.UTF-8",
            "TMPDIR": str(home)}


def test_quick_start_example_flow_runs_on_the_embedded_default(core_only_venv, tmp_path):
    env = _env(core_only_venv, tmp_path / "home")
    backends = subprocess.run(["metaflow-sandbox", "backends"], env=env, capture_output=True, text=True)
    assert backends.returncode == 0 and "local" in backends.stdout and "daytona" not in backends.stdout
    one = subprocess.run(["metaflow-sandbox", "exec", "--backend", "local", "--", "python", "-c", "print(1)"], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0 and one.stdout.strip() == "1", one.stderr
    run = subprocess.run(["python", str(REPO / "examples" / "hello_sandbox.py"), "run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "results: ['FAST', 'ISOLATED', 'REPRODUCIBLE']" in run.stdout + run.stderr


def test_daytona_without_its_package_names_the_pip_command(core_only_venv, tmp_path):
    env = _env(core_only_venv, tmp_path / "home")
    env.update({"METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": "s3://bucket/x"})
    run = subprocess.run(["python", str(REPO / "tests" / "e2e" / "flows" / "daytona_flow.py"), "--no-pylint", "run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "pip install 'metaflow-sandbox[daytona]'" in run.stdout + run.stderr
