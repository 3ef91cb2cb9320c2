"""A sandboxed step deployed to Argo Workflows or Airflow: the scheduler's container is its launcher.

The compiled template runs `python flow.py --with kubernetes:... --with <scheduler>_internal step S ...`
in a pod. For a sandboxed step, that process re-execs itself as our trampoline (`sandbox step S
<code package> ...`, the same trampoline, lifeline and log handling as a local run) before any task
starts. The task in the sandbox is a plain Metaflow task: the pod's compute decorator and the
scheduler's bookkeeping decorator are left out of its command line, and the trampoline runs that
bookkeeping in the pod instead, where the scheduler reads it (Argo's `/mnt/out/*` output files,
Airflow's XCom file), from the finished task's own artifacts.
"""

import os
import sys

from .sandbox_decorator import WORKLOAD_ENV, SandboxException

#: METAFLOW_RUNTIME_NAME in the scheduler's container -> its bookkeeping decorator.
SUPPORTED = {"argo-workflows": "argo_workflows_internal", "airflow": "airflow_internal"}
#: Decorators a scheduler attaches to every step that describe its pod, not the sandbox.
POD_DECORATORS = ("kubernetes", "batch")
#: Set on the trampoline a scheduler's `step` became.
SCHEDULED_ENV = "METAFLOW_SANDBOX_SCHEDULED"
LOCAL_ISOLATION_ENV = "METAFLOW_SANDBOX_LOCAL_ISOLATION"
CODE_ENV = ("METAFLOW_CODE_METADATA", "METAFLOW_CODE_SHA", "METAFLOW_CODE_URL")


def scheduler_container():
    """The supported scheduler whose container this process is (not inside a sandbox), else None."""
    name = os.environ.get("METAFLOW_RUNTIME_NAME")
    if os.environ.get(WORKLOAD_ENV) or name not in SUPPORTED:
        return None
    return name


def is_pod_decorator(deco):
    """The @kubernetes/@batch a supported scheduler attached to every step, seen in its pod."""
    return scheduler_container() is not None and deco.name in POD_DECORATORS and not getattr(deco, "statically_defined", True)


def become_trampoline(step_name):
    """In the scheduler's container, the `step` command of this sandboxed step becomes the trampoline.

    Returns (does nothing) when this process runs another step's task: every step's decorators are
    initialised in every task's process.
    """
    from metaflow._vendor import click

    ctx = click.get_current_context(silent=True)
    args = list(getattr(ctx.find_root(), "saved_args", None) or []) if ctx is not None else []
    if len(args) < 2 or args[0] != "step" or args[1] != step_name:
        return
    argv = list(sys.argv)
    if argv[len(argv) - len(args) :] != args:
        raise SandboxException("Cannot run step *%s* in its sandbox: its command line was not understood (%s)." % (step_name, argv))
    code = [os.environ.get(name) for name in CODE_ENV]
    if not all(code):
        raise SandboxException(
            "Step *%s* runs in a sandbox, but the scheduler's container has no %s.\n  Fix: deploy the flow with "
            "`argo-workflows create` / `airflow create` (their templates set it); do not edit the template's env."
            % (step_name, " / ".join(n for n, v in zip(CODE_ENV, code, strict=True) if not v))
        )
    top = argv[1 : len(argv) - len(args)]
    os.environ[SCHEDULED_ENV] = os.environ["METAFLOW_RUNTIME_NAME"]
    # In a pod, `local` without bubblewrap would run the step as a plain process: refuse that instead
    # (with its fix), unless the pod's owner chose otherwise.
    os.environ.setdefault(LOCAL_ISOLATION_ENV, "bwrap")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-u", argv[0]] + top + ["sandbox", "step", step_name] + code + args[2:])


def inner_decospecs(decospecs):
    """`--with` specs for the task in the sandbox: without the pod's and the scheduler's decorators."""
    if not os.environ.get(SCHEDULED_ENV):
        return decospecs
    dropped = POD_DECORATORS + tuple(SUPPORTED.values())
    return tuple(spec for spec in decospecs or () if spec.split(":", 1)[0].strip() not in dropped)


def read_input_paths(filename):
    """`--input-paths-filename` (Argo writes the input paths to a file in the pod): its content."""
    with open(filename) as f:
        return f.read().strip()


class Bookkeeping:
    """The scheduler's decorator hooks, run by the trampoline in the pod, around the sandboxed task."""

    def __init__(self, obj, node, task, max_user_code_retries):
        self.obj, self.node, self.task = obj, node, task
        self.max_user_code_retries = max_user_code_retries
        wanted = SUPPORTED.get(os.environ.get(SCHEDULED_ENV, ""))
        self.decorators = [d for d in node.decorators if wanted and d.name == wanted]

    def before(self):
        """Its task_pre_step: the scheduler's metadata for this attempt (workflow name, job id)."""
        for deco in self.decorators:
            deco.task_pre_step(
                self.task["step"], None, self.obj.metadata, self.task["run_id"], self.task["task_id"], self.obj.flow,
                self.obj.graph, self.task["attempt"], self.max_user_code_retries, None, None,
            )  # fmt: skip

    def after(self):
        """Its task_finished, on the task's artifacts: the task id, foreach splits, the switch taken."""
        if not self.decorators:
            return
        ds = self.obj.flow_datastore.get_task_datastore(
            self.task["run_id"], self.task["step"], self.task["task_id"], attempt=self.task["attempt"]
        )
        flow = self.obj.flow  # the trampoline's own instance, given what the task decided
        for name in ("_foreach_num_splits", "_transition"):
            if name in ds:
                setattr(flow, name, ds[name])
        for deco in self.decorators:
            deco.task_finished(self.task["step"], flow, self.obj.graph, True, self.task["attempt"], self.max_user_code_retries)
