"""@sandbox steps and production schedulers (issue 12): under Argo Workflows and Airflow the pod is
the step's launcher and the step runs in its sandbox; Step Functions is refused at deploy time, and
any scheduler's container refuses a template compiled without that check. Never run unsandboxed.

Offline: the compilers run for real (`--only-json`, a DAG file); the container commands come out
of the compiled template and run here as the pods would, one step after the other (S3 on SeaweedFS).
"""

from __future__ import annotations

import ast
import fcntl
import json
import re
import shutil
import subprocess
from pathlib import Path

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


def test_step_functions_deploy_with_a_sandboxed_step_is_refused_with_the_fix(s3_target):
    scheduler = "step-functions"
    run = s3_target.flow("orch_flow.py", *DEPLOY[scheduler], timeout=180)
    assert run.returncode == 1, run.output[-3000:]
    assert "Step work has @sandbox, which `%s create` does not support" % scheduler in run.output
    assert "Fix: deploy to Argo Workflows or Airflow instead" in run.output and "python orch_flow.py run" in run.output
    assert "Traceback" not in run.output
    assert "apiVersion" not in run.stdout and "StartAt" not in run.stdout, "nothing was compiled"
    assert not (s3_target.tmp / "dag.py").exists()


def test_deploy_refuses_sandboxes_attached_with_with_too(s3_target):
    # `--with daytona` at deploy time puts @daytona on every step: refused the same way, naming @daytona.
    run = s3_target.flow("plain_flow.py", "--with", "daytona", "step-functions", "create", "--only-json", timeout=180)
    assert run.returncode == 1, run.output[-3000:]
    assert "has @daytona, which `step-functions create` does not support" in run.output
    assert "StartAt" not in run.stdout


def test_read_only_scheduler_commands_still_work(s3_target):
    # `airflow list-runs`-like commands compile nothing: our check stays out of their way.
    run = s3_target.flow("orch_flow.py", "step-functions", "list-runs", timeout=120)
    assert "does not support" not in run.output


def _compile(t: Target, scheduler: str, legacy: bool = False, flow_file: str = "orch_flow.py") -> dict:
    """{step: (container command, template env)} from the scheduler's real compiler. `legacy`: as an
    older metaflow-sandbox compiled it (no deploy-time check)."""
    env = {**base_env(t.tmp), **t.env}
    flow = str(FLOWS / flow_file)
    head = [PYTHON, str(FLOWS / "orch_legacy_compile.py"), flow] if legacy else [PYTHON, flow]
    proc = subprocess.run(
        head + ["--no-pylint", *DEPLOY[scheduler]], cwd=t.tmp, env=env, capture_output=True, text=True, timeout=180
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    steps = {}
    if scheduler == "argo-workflows":
        spec = json.loads(proc.stdout[proc.stdout.index("{") :])
        for tpl in spec["spec"]["templates"]:
            if tpl["name"] in ("start", "work", "each", "end"):
                c = tpl["container"]
                # Values Kubernetes fills in (`valueFrom`: the pod's name, namespace, ...): made up here.
                env = {e["name"]: e["value"] if e.get("value") is not None else "pod-" + e["name"].lower() for e in c["env"]}
                steps[tpl["name"]] = (c["command"], env)
        return steps
    source = (t.tmp / "dag.py").read_text()
    config = ast.literal_eval(re.search(r"^CONFIG = (.*)$", source, re.M).group(1))
    for name in ("start", "work", "end"):
        op = config["states"][name]["operator_args"]
        steps[name] = (
            op["cmds"],
            {e["name"]: e["value"] if e.get("value") is not None else "pod-" + e["name"].lower() for e in op["env_vars"]},
        )
    return steps


def _pod(t: Target, name: str, command: list, template_env: dict, values: dict, extra: dict | None = None):
    """Run one compiled container command here, as its pod would: the template's env with the scheduler's
    placeholders filled in from `values` (substring of the placeholder -> value), the pod's credentials,
    a private /tmp file for Argo's input paths."""

    def render(text: str) -> str:
        def one(m: re.Match) -> str:
            return next((v for k, v in values.items() if k in m.group(0)), "x1")

        return re.sub(r"\{\{.*?\}\}", one, text).replace("/tmp/mf-input-paths", str(t.tmp / ("%s-input-paths" % name)))

    pod = t.tmp / ("pod-" + name)
    pod.mkdir()
    env = {**base_env(t.tmp), **{k: render(v) for k, v in template_env.items()}}
    env.update({k: t.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    env.update({"METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1", **(extra or {})})
    proc = subprocess.run([render(c) for c in command], cwd=pod, env=env, capture_output=True, text=True, timeout=300)
    return proc, proc.stdout + proc.stderr


def _task_data(t: Target, run_id: str, step: str, task_id: str, flow: str = "OrchFlow") -> dict:
    """The task's artifact and its persisted stdout, read straight from the S3 datastore."""
    code = (
        "import json, os\n"
        "from metaflow.datastore import FlowDataStore\n"
        "from metaflow.plugins.datastores.s3_storage import S3Storage\n"
        "fds = FlowDataStore(%r, None, storage_impl=S3Storage, ds_root=os.environ['METAFLOW_DATASTORE_SYSROOT_S3'])\n"
        "ds = fds.get_task_datastore(%r, %r, %r)\n"
        "logs = b''.join(b for _, b in ds.load_logs(['task'], 'stdout'))\n"
        "print(json.dumps({'in_sandbox': ds['in_sandbox'], 'ok': ds['_task_ok'], 'stdout': logs.decode()}))\n"
    ) % (flow, run_id, step, task_id)
    env = {**base_env(t.tmp), **t.env}
    proc = subprocess.run([PYTHON, "-c", code], cwd=t.tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def pod_outputs():
    """Where the schedulers read a task's outputs: Argo's /mnt/out (an emptyDir in the pod), Airflow's
    /airflow/xcom. Host paths here: made for the test and removed after (only these tests use them)."""
    lock = open("/tmp/metaflow-sandbox-tests-pod-outputs.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one test at a time across xdist workers: the paths are the host's
    made = []
    for d in (Path("/mnt/out"), Path("/airflow/xcom")):
        if not d.exists():
            d.mkdir(parents=True)
            made.append(d)
        for f in d.iterdir():
            f.unlink()
    yield
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
    if Path("/airflow").exists() and not any(Path("/airflow").iterdir()):
        Path("/airflow").rmdir()
    lock.close()


@pytest.mark.parametrize("backend", ["local", "daytona"])
def test_argo_workflows_runs_the_sandboxed_step_in_its_sandbox(s3_target, pod_outputs, request, backend):
    t = s3_target
    steps = _compile(t, "argo-workflows")
    pod_env = {}  # what the pod's secrets give it: the backend and its credentials
    if backend == "daytona":
        emu = request.getfixturevalue("daytona_emulator")
        pod_env = {"METAFLOW_SANDBOX_BACKEND": "daytona", **emu.env}
    values = {"workflow.name": "wf1", "creationTimestamp": "ts1"}
    proc, out = _pod(t, "start", *steps["start"], values)
    assert proc.returncode == 0, out[-4000:]
    start_id = Path("/mnt/out/task_id").read_text().strip()
    Path("/mnt/out/task_id").unlink()
    values["input-paths"] = "argo-wf1/start/%s" % start_id
    proc, out = _pod(t, "work", *steps["work"], values, pod_env)
    assert proc.returncode == 0, out[-4000:]
    assert "Task is starting in %s sandbox" % backend in out, out[-4000:]
    # Argo's output parameter, written in the pod by the trampoline (not in the sandbox): the next step's input.
    work_id = Path("/mnt/out/task_id").read_text().strip()
    assert work_id.startswith("t-") and work_id != start_id
    data = _task_data(t, "argo-wf1", "work", work_id)
    assert data["ok"] is True and data["in_sandbox"] == "1"  # the step's code saw its sandbox's environment
    assert "Task is starting in %s sandbox" % backend in data["stdout"]
    # Argo's bookkeeping metadata for the attempt, registered by the trampoline in the pod.
    meta = t.tmp / "pod-work" / "metaflow" / ".metaflow" / "OrchFlow" / "argo-wf1" / "work" / work_id / "_meta"
    registered = " ".join(f.read_text() for f in meta.glob("*.json"))
    assert '"argo-workflow-name"' in registered and '"wf1"' in registered, registered[:2000]
    if backend == "daytona":
        assert request.getfixturevalue("daytona_emulator").live_sandboxes() == []
        return
    # The next pod picks up from there.
    values["input-paths"] = "argo-wf1/work/%s" % work_id
    proc, out = _pod(t, "end", *steps["end"], values)
    assert proc.returncode == 0, out[-4000:]


def test_argo_workflows_gets_the_foreach_splits_of_a_sandboxed_step(s3_target, pod_outputs):
    """A sandboxed step that fans out: Argo reads the splits from the pod's /mnt/out, and the next
    pod (one foreach task, plain) gets its item."""
    t = s3_target
    steps = _compile(t, "argo-workflows", flow_file="orch_foreach_flow.py")
    values = {"workflow.name": "wf2", "creationTimestamp": "ts2"}
    proc, out = _pod(t, "start", *steps["start"], values)
    assert proc.returncode == 0, out[-4000:]
    values["input-paths"] = "argo-wf2/start/%s" % Path("/mnt/out/task_id").read_text().strip()
    proc, out = _pod(t, "work", *steps["work"], values)
    assert proc.returncode == 0, out[-4000:]
    assert json.loads(Path("/mnt/out/splits").read_text()) == [0, 1, 2]
    assert json.loads(Path("/mnt/out/split_cardinality").read_text()) == 3
    work_id = Path("/mnt/out/task_id").read_text().strip()
    assert _task_data(t, "argo-wf2", "work", work_id, flow="OrchForeachFlow")["in_sandbox"] == "1"
    values.update({"input-paths": "argo-wf2/work/%s" % work_id, "split-index": "2"})
    proc, out = _pod(t, "each", *steps["each"], values)
    assert proc.returncode == 0, out[-4000:]


# What Airflow's KubernetesPodOperator puts in the pod's environment (the downward API), made up here.
AIRFLOW_POD_ENV = {
    "METAFLOW_KUBERNETES_" + k: "pod-" + k.lower() for k in ("POD_NAME", "POD_NAMESPACE", "POD_ID", "SERVICE_ACCOUNT_NAME", "NODE_IP")
}


def test_airflow_runs_the_sandboxed_step_in_its_sandbox(s3_target, pod_outputs):
    t = s3_target
    steps = _compile(t, "airflow")
    values = {"try_number": "0", "run_id_creator": "r1", "task_id_creator": "t1", "xcom_pull": "airflow-t1"}
    for name in ("start", "work", "end"):
        proc, out = _pod(t, name, *steps[name], values, {"METAFLOW_DEFAULT_METADATA": "local", **AIRFLOW_POD_ENV})
        assert proc.returncode == 0, out[-4000:]
        # Airflow's XCom, pushed in the pod by the trampoline for the sandboxed step.
        xcom = json.loads(Path("/airflow/xcom/return.json").read_text())
        assert xcom["metaflow_task_id"] == "airflow-t1"
        if name == "work":
            assert "Task is starting in local sandbox" in out, out[-4000:]
        Path("/airflow/xcom/return.json").unlink()
    data = _task_data(t, "airflow-r1", "work", "airflow-t1")
    assert data["ok"] is True and data["in_sandbox"] == "1"
    assert "Task is starting in local sandbox" in data["stdout"]
    # Airflow's bookkeeping metadata for the attempt, registered by the trampoline in the pod.
    meta = t.tmp / "pod-work" / "metaflow" / ".metaflow" / "OrchFlow" / "airflow-r1" / "work" / "airflow-t1" / "_meta"
    registered = " ".join(f.read_text() for f in meta.glob("*.json"))
    assert '"airflow-dag-run-id"' in registered, registered[:2000]


def test_a_pod_of_another_scheduler_refuses_to_run_the_step_unsandboxed(s3_target):
    """A template compiled without the deploy-time check by a scheduler we do not support (here Argo's
    template with its runtime name taken away, as `--with kubernetes` in an unknown pod would look): the
    task stops in the container before any user code runs."""
    t = s3_target
    command, template_env = _compile(t, "argo-workflows", legacy=True)["work"]
    template_env = {k: v for k, v in template_env.items() if k != "METAFLOW_RUNTIME_NAME"}
    marker = t.tmp / "step-code-ran"
    proc, output = _pod(t, "work", command, template_env, {}, {"METAFLOW_DEFAULT_METADATA": "local", "ORCH_MARKER": str(marker)})
    assert proc.returncode != 0, output[-3000:]
    assert "Code package downloaded" in output, output[-3000:]  # the container really got as far as the task
    assert "Step work has @sandbox, but @kubernetes was attached to every step" in output, output[-3000:]
    assert "Refusing to run it" in output
    assert not marker.exists(), "the step's code ran in the scheduler's container, outside any sandbox"
