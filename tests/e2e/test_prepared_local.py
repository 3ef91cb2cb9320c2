"""Prepared environments on the `local` backend, end to end: real runs, real pip installs from PyPI.

One module-wide pip cache, so each environment is built once: the first run builds it, later runs
and `metaflow-sandbox prepare` find it. A step with prepare=False (or a run with
METAFLOW_SANDBOX_PREPARE=0) installs per task, as before.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from .conftest import PYTHON, FlowRun, base_env

FLOW = """
from metaflow import FlowSpec, sandbox, step


class PreparedFlow(FlowSpec):
    @sandbox(packages=[{req!r}])
    @step
    def start(self):
        import tabulate

        self.prepared_from = tabulate.__file__
        print("TABULATE_FROM " + tabulate.__file__)
        self.items = [1, 2, 3]
        self.next(self.per_task, foreach="items")

    @sandbox(packages=[{req!r}], prepare=False)
    @step
    def per_task(self):  # three at once, each installing into the shared pip cache
        import tabulate

        self.per_task_from = tabulate.__file__
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PreparedFlow()
"""

PIP_LINE = "pip requirement(s) in the sandbox"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A flow directory and a pip cache shared by every test here (environments are built once)."""
    root = tmp_path_factory.mktemp("prepared")
    env = base_env(root)
    env["METAFLOW_SANDBOX_PIP_CACHE"] = str(root / "pip")
    env["METAFLOW_SANDBOX_BACKEND"] = "local"
    return root, env


def write_flow(root: Path, name: str, req: str) -> Path:
    path = root / name
    path.write_text(textwrap.dedent(FLOW.format(req=req)))
    return path


def run(workspace, flow: Path, *args: str, env: dict | None = None) -> FlowRun:
    root, base = workspace
    full = {**base, **(env or {})}
    proc = subprocess.run(
        [PYTHON, str(flow), "--no-pylint", *(args or ("run",))], cwd=root, env=full, capture_output=True, text=True, timeout=300
    )
    return FlowRun(proc.returncode, proc.stdout, proc.stderr, root, full)


def cli(workspace, *args: str) -> subprocess.CompletedProcess:
    root, env = workspace
    return subprocess.run([PYTHON, "-m", "metaflow_sandbox", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def artifact(workspace, run_id: str, step: str, name: str) -> str:
    root, env = workspace
    code = "from metaflow import Step, namespace\nnamespace(None)\nprint(Step('PreparedFlow/%s/%s').task.data.%s)" % (run_id, step, name)
    proc = subprocess.run([PYTHON, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def step_log(run: FlowRun, step: str) -> str:
    return "\n".join(line for line in run.output.splitlines() if "/%s/" % step in line)


def env_root(workspace) -> Path:
    return workspace[0] / "pip" / "environments"


def test_first_run_builds_then_runs_without_pip_and_second_run_finds_it(workspace):
    flow = write_flow(workspace[0], "prepared_flow.py", "tabulate==0.9.0")
    first = run(workspace, flow)
    assert first.returncode == 0, first.output[-4000:]
    assert "Preparing the 'local' environment mfsb-env-" in first.output
    assert "built in" in first.output and "found in" not in first.output
    # The prepared step: no pip in its task, tabulate from the prepared directory.
    assert PIP_LINE not in step_log(first, "start")
    prepared_from = artifact(workspace, first.run_id(), "start", "prepared_from")
    assert prepared_from.startswith(str(env_root(workspace)) + "/"), prepared_from
    # prepare=False: installed by pip inside each task (three at once), into the per-task pip cache.
    assert step_log(first, "per_task").count("Installing 1 " + PIP_LINE) == 3
    per_task_from = artifact(workspace, first.run_id(), "per_task", "per_task_from")
    assert not per_task_from.startswith(str(env_root(workspace))), per_task_from

    second = run(workspace, flow)
    assert second.returncode == 0, second.output[-4000:]
    assert "found in" in second.output and "built in" not in second.output
    assert PIP_LINE not in step_log(second, "start")
    assert artifact(workspace, second.run_id(), "start", "prepared_from") == prepared_from
    assert len([p for p in env_root(workspace).iterdir() if not p.name.startswith(".")]) == 1


def test_prepare_off_for_the_run_installs_per_task(workspace):
    flow = write_flow(workspace[0], "prepared_flow.py", "tabulate==0.9.0")
    off = run(workspace, flow, env={"METAFLOW_SANDBOX_PREPARE": "0"})
    assert off.returncode == 0, off.output[-4000:]
    assert "Preparing the" not in off.output
    assert "Installing 1 " + PIP_LINE in step_log(off, "start")
    assert not artifact(workspace, off.run_id(), "start", "prepared_from").startswith(str(env_root(workspace)))

    bad = run(workspace, flow, env={"METAFLOW_SANDBOX_PREPARE": "maybe"})
    assert bad.returncode != 0
    assert "METAFLOW_SANDBOX_PREPARE" in bad.output and "Fix:" in bad.output and "Traceback" not in bad.output


def test_broken_requirement_fails_at_launch_with_pips_message(workspace):
    flow = write_flow(workspace[0], "broken_flow.py", "mfsb-no-such-package==9.9")
    broken = run(workspace, flow)
    assert broken.returncode != 0
    assert "No matching distribution found for mfsb-no-such-package==9.9" in broken.output
    assert "Fix: check the requirement lines in packages=" in broken.output
    assert "Traceback" not in broken.output
    assert "Task is starting" not in broken.output  # not the sandboxed start step, nor any other
    assert not list(env_root(workspace).glob("*/mfsb_no_such_package*"))
    assert not [p.name for p in env_root(workspace).iterdir() if p.name.startswith(".build-")]


def test_cli_prepare_list_and_rm(workspace):
    changed = write_flow(workspace[0], "changed_flow.py", "tabulate==0.8.10")
    built = cli(workspace, "prepare", str(changed))
    assert built.returncode == 0, built.stdout + built.stderr
    assert "  built  " in built.stdout and "(steps: start)" in built.stdout  # a changed requirement: a new environment
    again = cli(workspace, "prepare", str(changed))
    assert "  found  " in again.stdout, again.stdout + again.stderr
    ref = again.stdout.split("  found  ")[0].split()[-1]
    assert os.path.isfile(os.path.join(ref, "tabulate.py")) or os.path.isdir(os.path.join(ref, "tabulate"))

    broken = write_flow(workspace[0], "broken_flow.py", "mfsb-no-such-package==9.9")
    failed = cli(workspace, "prepare", str(broken))
    assert failed.returncode == 1
    assert "No matching distribution" in failed.stdout + failed.stderr and "Fix:" in failed.stdout + failed.stderr

    listed = cli(workspace, "environments", "list", "--backend", "local")
    assert listed.returncode == 0 and ref in listed.stdout, listed.stdout + listed.stderr
    assert cli(workspace, "environments", "rm", "--backend", "local", "--older-than", "1d").stdout == ""  # all are fresh
    removed = cli(workspace, "environments", "rm", "--backend", "local", ref)
    assert removed.returncode == 0 and "removed local environment %s" % ref in removed.stdout
    assert not os.path.exists(ref)
    gone = cli(workspace, "environments", "rm", "--backend", "local", ref)
    assert gone.returncode == 1 and "no prepared environment matches" in gone.stderr
    rest = cli(workspace, "environments", "rm", "--backend", "local", "--all")
    assert rest.returncode == 0
    assert "no prepared environments" in cli(workspace, "environments", "list", "--backend", "local").stdout
