"""Production schedulers: a sandboxed step runs in its sandbox under Argo Workflows and Airflow, and
Step Functions is refused. Never unsandboxed.

Argo Workflows and Airflow attach @kubernetes to every step and run each task's `step` command in a
pod: for a sandboxed step that pod becomes the step's launcher (sandbox_scheduled.py re-execs the
`step` command as our trampoline before any task starts). Step Functions runs each step as an AWS
Batch job and passes foreach state through DynamoDB from inside the task; we cannot run that against
anything offline, so we refuse it, twice:

1. at deploy time (`step-functions create`), with why and what to do;
2. in the scheduler's container (a template compiled without this check, or `--with kubernetes` /
   `--with batch` on a plain run): the task stops before any user code runs.
"""

from .sandbox_decorator import WORKLOAD_ENV, SandboxException

# subcommand -> (scheduler, the compute decorator its compiler attaches to every step): the refused ones.
# Argo Workflows and Airflow are supported (sandbox_scheduled.py).
SCHEDULERS = {
    "step-functions": ("AWS Step Functions", "batch"),
}
# Subcommands that only read or remove a deployment: nothing runs, nothing to refuse.
HARMLESS = {"delete", "terminate", "status", "list-runs", "list-workflow-templates", "suspend", "unsuspend", "check"}

FIX = (
    "  Fix: deploy to Argo Workflows or Airflow instead (`argo-workflows create`, `airflow create`: their pods "
    "run each @{deco} step in its sandbox), remove @{deco} from the steps of flows you deploy to {scheduler} "
    "(each step then runs in its own {where}), or let the scheduler run the whole flow with `python {flow} run` "
    "in one container: that run "
    "launches a sandbox for each @{deco} step (the container needs metaflow-sandbox installed and the "
    "backend's credentials, e.g. DAYTONA_API_KEY or E2B_API_KEY, in its environment). See docs/orchestrators.md."
)


def deploy_command():
    """(subcommand, action) when this process compiles a flow for a scheduler, else None."""
    from metaflow._vendor import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    args = list(getattr(ctx.find_root(), "saved_args", None) or [])
    if not args or args[0] not in SCHEDULERS:
        return None
    action = next((a for a in args[1:] if not a.startswith("-")), None)
    if action in HARMLESS:
        return None
    return args[0], action


def refuse_schedulers(deco_name, step_name, decorators, flow_file):
    """Raise (with the reason and the fix) if this step would run under a scheduler, unsandboxed."""
    import os

    command = deploy_command()
    if command is not None:
        scheduler, compute = SCHEDULERS[command[0]]
        raise SandboxException(
            "Step *%s* has @%s, which `%s %s` does not support: %s runs every step in its own %s with @%s "
            "and passes foreach state through DynamoDB from inside the task, so this step would run outside "
            "any sandbox. Refusing to deploy it.\n%s"
            % (
                step_name,
                deco_name,
                command[0],
                command[1] or "create",
                scheduler,
                _where(compute),
                compute,
                FIX.format(deco=deco_name, scheduler=scheduler, where=_where(compute), flow=flow_file),
            )
        )
    if os.environ.get(WORKLOAD_ENV):
        return
    from .sandbox_scheduled import become_trampoline, scheduler_container

    if scheduler_container():  # an Argo Workflows / Airflow pod: it launches this step's sandbox
        become_trampoline(step_name)  # only if this process is this step's task; never returns then
        return
    attached = [d.name for d in decorators if d.name in ("kubernetes", "batch") and not getattr(d, "statically_defined", True)]
    if attached:
        # A scheduler's container (or `--with kubernetes`): the task would run right here, in the pod.
        raise SandboxException(
            "Step *%s* has @%s, but @%s was attached to every step (by `--with %s`, or by a scheduler that "
            "deployed this flow): the step would run in a %s, outside any sandbox. Refusing to run it.\n%s"
            % (
                step_name,
                deco_name,
                attached[0],
                attached[0],
                _where(attached[0]),
                FIX.format(deco=deco_name, scheduler="a scheduler", where=_where(attached[0]), flow=flow_file),
            )
        )


def _where(compute):
    return "Kubernetes pod" if compute == "kubernetes" else "AWS Batch job"
