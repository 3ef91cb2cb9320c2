"""@sandbox steps and production schedulers: refused at deploy time, and refused in the scheduler's
container for a template compiled without that check. Never run unsandboxed (issue 12).

Offline: the compilers run for real (`--only-json`, a DAG file); the container command comes out
of the compiled template and runs here as the pod would (S3 on SeaweedFS).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest

from .conftest import FLOWS, PYTHON, Target, base_env, local_leftovers, s3_env

DEPLOY = {
    "argo-workflows": ["argo-workflows", "create", "--only-json"],
    "step-functions": ["step-functions", "create", "--only-json"],
    "airflow": ["airflow", "create", "dag.py"],
}


@pytest.fixture
def s3_target(request, tmp_path) -> Target:
    env = {"METAFLOW_SANDBOX_BACKEND": "local", "METAFLOW_S3_RETRY_COUNT": "0"}
    env.update(s3_env(request.getfixturevalue("s3_server"), "orch-%s" % tmp_path.name))
    t = Target("local-s3", "local", "s3", env, lambda: local_leftovers(tmp_path), tmp_path)
    yield t
    assert t.live_sandboxes() == []


@pytest.mark.parametrize("scheduler", sorted(DEPLOY))
def test_deploy_with_a_sandboxed_step_is_refused_with_the_fix(s3_target, scheduler):
    run = s3_target.flow("orch_flow.py", *DEPLOY[scheduler], timeout=180)
    assert run.returncode == 1, run.output[-3000:]
    assert "Step work has @sandbox, which `%s create` does not support" % scheduler in run.output
    assert "Fix: remove @sandbox" in run.output and "python orch_flow.py run" in run.output
    assert "Traceback" not in run.output
    assert "apiVersion" not in run.stdout and "StartAt" not in run.stdout, "nothing was compiled"
    assert not (s3_target.tmp / "dag.py").exists()


def test_deploy_refuses_sandboxes_attached_with_with_too(s3_target):
    # `--with daytona` at deploy time puts @daytona on every step: refused the same way, naming @daytona.
    run = s3_target.flow("plain_flow.py", "--with", "daytona", "argo-workflows", "create", "--only-json", timeout=180)
    assert run.returncode == 1, run.output[-3000:]
    assert "has @daytona, which `argo-workflows create` does not support" in run.output
    assert "apiVersion" not in run.stdout


def test_read_only_scheduler_commands_still_work(s3_target):
    # `airflow list-runs`-like commands compile nothing: our check stays out of their way.
    run = s3_target.flow("orch_flow.py", "step-functions", "list-runs", timeout=120)
    assert "does not support" not in run.output


def _legacy_compile(t: Target, scheduler: str):
    """The template an older metaflow-sandbox deployed (no deploy-time refusal)."""
    env = {**base_env(t.tmp), **t.env}
    proc = subprocess.run(
        [PYTHON, str(FLOWS / "orch_legacy_compile.py"), str(FLOWS / "orch_flow.py"), "--no-pylint", *DEPLOY[scheduler]],
        cwd=t.tmp, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    if scheduler == "argo-workflows":
        spec = json.loads(proc.stdout[proc.stdout.index("{") :])
        work = next(tpl for tpl in spec["spec"]["templates"] if tpl["name"] == "work")["container"]
        return work["command"], {e["name"]: e["value"] for e in work["env"] if e.get("value") is not None}
    source = (t.tmp / "dag.py").read_text()
    config = ast.literal_eval(re.search(r"^CONFIG = (.*)$", source, re.M).group(1))
    work = config["states"]["work"]["operator_args"]
    return work["cmds"], {e["name"]: e["value"] for e in work["env_vars"] if e.get("value") is not None}


@pytest.mark.parametrize("scheduler", ["argo-workflows", "airflow"])
def test_scheduler_container_refuses_to_run_the_step_unsandboxed(s3_target, scheduler):
    t = s3_target
    command, template_env = _legacy_compile(t, scheduler)
    assert "step work" in command[-1], "the scheduler runs the step directly in its container"
    # Run it as the pod would: the template's env, the pod's credentials, scheduler placeholders filled in.
    render = lambda s: re.sub(r"\{\{.*?\}\}", lambda m: "0" if "try_number" in m.group(0) else "x1", s)  # noqa: E731
    pod = t.tmp / "pod"
    pod.mkdir()
    marker = t.tmp / "step-code-ran"
    env = {**base_env(t.tmp), **{k: render(v) for k, v in template_env.items()}}
    env.update({k: t.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    env.update({"METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1", "METAFLOW_DEFAULT_METADATA": "local", "ORCH_MARKER": str(marker)})
    proc = subprocess.run([render(c) for c in command], cwd=pod, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Code package downloaded" in output, output[-3000:]  # the container really got as far as the task
    assert "Step work has @sandbox, but @kubernetes was attached to every step" in output, output[-3000:]
    assert "Refusing to run it" in output
    assert not marker.exists(), "the step's code ran in the scheduler's container, outside any sandbox"
