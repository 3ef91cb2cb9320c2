"""The hardened local backend through a real Metaflow run (launcher = root here, as in containers/CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FLOW = Path(__file__).parent / "flows" / "hardening_flow.py"


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    full_env = {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "USER": "tester",
        "METAFLOW_HOME": str(home / ".metaflowconfig"),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),
        "METAFLOW_SANDBOX_BACKEND": "local",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(FLOW), "--no-pylint", "run", "--with", "sandbox", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _artifacts(tmp_path: Path) -> dict:
    code = "from metaflow import Flow, namespace; namespace(None); r = Flow('HardeningFlow').latest_run; "
    code += "import json; print(json.dumps({'shadow': r['start'].task.data.shadow, 'uid': r['start'].task.data.uid}))"
    env = dict(os.environ, HOME=str(tmp_path / "home"), METAFLOW_HOME=str(tmp_path / "home" / ".metaflowconfig"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _leftovers(tmp_path: Path) -> list[str]:
    return [str(p) for p in tmp_path.glob("metaflow-sandbox-*/mfsb-*")]


@pytest.mark.skipif(os.geteuid() != 0, reason="the launcher-is-root hardening")
def test_a_step_cannot_read_etc_shadow_and_runs_unprivileged(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    data = _artifacts(tmp_path)  # the local datastore was written by the sandbox's unprivileged user
    assert data == {"shadow": "refused: Permission denied", "uid": 65534}
    assert _leftovers(tmp_path) == []


def test_a_step_forking_past_the_pids_limit_fails_naming_the_setting(tmp_path: Path) -> None:
    run = _run(tmp_path, "--fork", "300", env={"METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT": "120"})
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "pids limit of 120" in out and "Fix: raise METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT" in out, out[-3000:]
    assert _leftovers(tmp_path) == []
