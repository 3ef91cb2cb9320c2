"""Prepared environments on Daytona (snapshots) and E2B (templates), end to end: real Metaflow runs on
S3 (SeaweedFS), the real SDKs, the emulators.

Each emulator starts every sandbox from a bare base: a stdlib-only Python where pip fails and records
the attempt, so a task that imports ``toolz`` (absent from the launcher too) and ``boto3`` (which
Metaflow's S3 datastore needs) can only have got them from the snapshot or template built at the
run's start. ``METAFLOW_SKIP_INSTALL_DEPENDENCIES`` is NOT set: the datastore's dependencies go into it.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from .conftest import PYTHON, FlowRun, base_env, s3_env

FLOW = """
from metaflow import FlowSpec, sandbox, step


class PreparedRemoteFlow(FlowSpec):
    @sandbox(packages=[{req!r}])
    @step
    def start(self):
        import boto3
        import toolz

        self.toolz_from = toolz.__file__
        self.boto3_from = boto3.__file__
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PreparedRemoteFlow()
"""


# backend -> (its emulator's module, the emulator's counter of environment builds)
PROVIDERS = {
    "daytona": ("metaflow_sandbox_daytona.emulator", "snapshot_creates"),
    "e2b": ("metaflow_sandbox_e2b.emulator", "template_build"),
}


@pytest.fixture(scope="module", params=sorted(PROVIDERS))
def backend(request):
    """(backend name, its emulator with a bare base), one per module and backend."""
    start_emulator = __import__(PROVIDERS[request.param][0], fromlist=["start_emulator"]).start_emulator
    with start_emulator(bare_base=True) as emu:
        yield request.param, emu


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, s3_server, backend):
    name, emu = backend
    root = tmp_path_factory.mktemp("prepared-" + name)
    env = base_env(root)
    env.update(s3_env(s3_server, root.name))
    env.update(emu.env)
    env["METAFLOW_SANDBOX_BACKEND"] = name
    env.pop("METAFLOW_SKIP_INSTALL_DEPENDENCIES", None)
    return root, env


def run(workspace, req: str, name: str = "prepared_flow.py", *args: str) -> FlowRun:
    root, env = workspace
    flow = root / name
    flow.write_text(textwrap.dedent(FLOW.format(req=req)))
    proc = subprocess.run(
        [PYTHON, str(flow), "--no-pylint", *(args or ("run",))], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    return FlowRun(proc.returncode, proc.stdout, proc.stderr, root, env)


def artifacts(workspace, run: FlowRun) -> dict:
    root, env = workspace
    code = (
        "import json\nfrom metaflow import Step, namespace\nnamespace(None)\n"
        "d = Step('PreparedRemoteFlow/%s/start').task.data\nprint(json.dumps([d.toolz_from, d.boto3_from]))" % run.run_id()
    )
    proc = subprocess.run([PYTHON, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    toolz_from, boto3_from = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    return {"toolz": toolz_from, "boto3": boto3_from}


def builds(backend) -> int:
    name, emu = backend
    return int(emu.stats().get(PROVIDERS[name][1], 0))


def test_built_once_tasks_install_nothing_changed_requirement_builds_anew(workspace, backend):
    name, emu = backend
    before = builds(backend)
    first = run(workspace, "toolz==1.0.0")
    assert first.returncode == 0, first.output[-5000:]
    assert "Preparing the '%s' environment mfsb-env-" % name in first.output and "built in" in first.output
    assert builds(backend) == before + 1
    came_from = artifacts(workspace, first)
    # Both from the snapshot's or template's image directory, not from the (bare) base or the launcher.
    assert "/images/" in came_from["toolz"] and "/images/" in came_from["boto3"], came_from
    assert emu.pip_attempts() == []  # no task ran pip
    assert emu.live_sandboxes() == []

    second = run(workspace, "toolz==1.0.0")
    assert second.returncode == 0, second.output[-5000:]
    assert "found in" in second.output and "built in" not in second.output
    assert builds(backend) == before + 1
    assert artifacts(workspace, second) == came_from

    changed = run(workspace, "toolz==0.12.1")
    assert changed.returncode == 0, changed.output[-5000:]
    assert "built in" in changed.output and builds(backend) == before + 2
    assert artifacts(workspace, changed)["toolz"] != came_from["toolz"]
    assert emu.pip_attempts() == []


def test_broken_requirement_fails_at_launch_with_the_build_log(workspace, backend):
    name, emu = backend
    broken = run(workspace, "mfsb-no-such-package-%s==9.9" % name, "broken_flow.py")
    assert broken.returncode != 0
    assert "No matching distribution found for mfsb-no-such-package-%s==9.9" % name in broken.output
    assert "Fix:" in broken.output and "Traceback" not in broken.output
    assert "Task is starting" not in broken.output
    assert emu.live_sandboxes() == []


def test_cli_prepare_list_and_rm(workspace, backend):
    name, emu = backend
    root, env = workspace
    flow = root / "cli_flow.py"
    flow.write_text(textwrap.dedent(FLOW.format(req="toolz==1.0.0")))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "metaflow_sandbox", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)

    prepared = cli("prepare", str(flow), "--backend", name)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    listed = cli("environments", "list", "--backend", name)
    assert listed.returncode == 0 and "mfsb-env-" in listed.stdout, listed.stdout + listed.stderr
    refs = [w for w in listed.stdout.split() if w.startswith("mfsb-env-")]
    removed = cli("environments", "rm", "--backend", name, *refs)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    again = cli("environments", "list", "--backend", name)
    assert not [w for w in again.stdout.split() if w.startswith("mfsb-env-")], again.stdout
    assert Path(root).exists()
