"""`python flow.py sandbox ...`: the trampoline (`step`) plus `list` and `kill`.

`sandbox step` runs on the launcher, one process per task: create a labelled sandbox, run the
unchanged Metaflow task in it with live logs, return the task's exit code, destroy the sandbox
in every case (success, failure, exception, Ctrl-C, SIGTERM; the provider TTL covers SIGKILL).
"""

import hashlib
import os
import signal
import sys
import time
import traceback

from metaflow import util
from metaflow._vendor import click
from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY, CommandException
from metaflow.metadata_provider.util import sync_local_metadata_from_datastore
from metaflow.metaflow_config import DATASTORE_LOCAL_DIR
from metaflow.unbounded_foreach import UBF_CONTROL, UBF_TASK

from .sandbox_code_cache import cache_root, prepared_package
from .sandbox_decorator import SandboxDecorator, backend_options, load_backend
from .sandbox_logs import LogRelay
from .sandbox_task import pip_install_commands, requirements, task_command, task_env

# Seconds past the step's time limit before the sandbox itself is stopped: @timeout's own
# SIGALRM inside the task must win, so the failure reads as a timeout (metaflow-internals 2.7).
TIMEOUT_GRACE = 60


@click.group()
def cli():
    pass


@cli.group(help="Commands related to sandboxed steps (@sandbox, @daytona, @e2b).")
def sandbox():
    pass


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so `finally` destroys the sandbox."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _reexec_with_launcher_python():
    """@pypi/@conda may point the trampoline at the step's env, which lacks our SDKs."""
    launcher = os.environ.get("METAFLOW_SANDBOX_LAUNCHER_PYTHON")
    # Compare paths, not resolved binaries: two venvs share one interpreter binary.
    if launcher and os.path.abspath(launcher) != os.path.abspath(sys.executable) and os.path.exists(launcher):
        os.environ.pop("PYTHONNOUSERSITE", None)
        os.environ.pop("METAFLOW_SANDBOX_LAUNCHER_PYTHON", None)
        os.execv(launcher, [launcher] + sys.argv)


def _sandbox_deco(node):
    decos = [d for d in node.decorators if isinstance(d, SandboxDecorator)]
    if not decos:
        raise CommandException("Step *%s* has no @sandbox decorator." % node.name)
    return decos[0]


@sandbox.command(help="Run one task in a sandbox. Used internally by Metaflow.")
@click.argument("step-name")
@click.argument("code-package-metadata")
@click.argument("code-package-sha")
@click.argument("code-package-url")
@click.option("--run-id", help="Passed to the top-level 'step'.")
@click.option("--task-id", help="Passed to the top-level 'step'.")
@click.option("--input-paths", help="Passed to the top-level 'step'.")
@click.option("--split-index", help="Passed to the top-level 'step'.")
@click.option("--clone-path", help="Passed to the top-level 'step'.")
@click.option("--clone-run-id", help="Passed to the top-level 'step'.")
@click.option("--tag", multiple=True, default=None, help="Passed to the top-level 'step'.")
@click.option("--namespace", default=None, help="Passed to the top-level 'step'.")
@click.option("--retry-count", default=0, help="Passed to the top-level 'step'.")
@click.option("--max-user-code-retries", default=0, help="Passed to the top-level 'step'.")
@click.option("--ubf-context", default=None, type=click.Choice(["none", UBF_CONTROL, UBF_TASK]))
@click.pass_context
def step(ctx, step_name, code_package_metadata, code_package_sha, code_package_url, **kwargs):
    _reexec_with_launcher_python()
    signal.signal(signal.SIGTERM, _on_sigterm)
    obj = ctx.obj
    node = obj.graph[step_name]
    deco = _sandbox_deco(node)
    run_id, task_id = kwargs["run_id"], kwargs["task_id"]
    retry_count = int(kwargs.get("retry_count") or 0)
    datastore_type = obj.flow_datastore.TYPE
    datastore_root = obj.flow_datastore.datastore_root
    backend_name = deco.backend_name
    local = backend_name == "local"

    executable = deco.attributes.get("executable") or (sys.executable if local else "python")
    entrypoint = "%s -u %s" % (obj.environment.executable(step_name, executable), os.path.basename(sys.argv[0]))
    top_args = " ".join(util.dict_to_cli_options(ctx.parent.parent.params))
    env_extra = {}
    input_paths = kwargs.get("input_paths")
    if input_paths:  # long input paths travel as env vars, like @batch
        chunk = 30 * 1024
        split = {"METAFLOW_INPUT_PATHS_%d" % (i // chunk): input_paths[i : i + chunk] for i in range(0, len(input_paths), chunk)}
        env_extra.update(split)
        kwargs["input_paths"] = "".join("${%s}" % k for k in split)
    step_cli = "%s %s step %s %s" % (entrypoint, top_args, step_name, " ".join(util.dict_to_cli_options(kwargs)))

    retry_decos = [d for d in node.decorators if d.name == "retry"]
    if retry_count and retry_decos:
        minutes = int(retry_decos[0].attributes.get("minutes_between_retries", 1) or 0)
        if minutes:
            obj.echo_always("Sleeping %d minute(s) before retry %d of step *%s*." % (minutes, retry_count, step_name))
            time.sleep(minutes * 60)

    user = util.get_username()
    code = {"metadata": code_package_metadata, "sha": code_package_sha, "url": code_package_url}
    env = task_env(obj, deco, run_id, datastore_type, code, user, backend_name)
    env.update(env_extra)
    if local:
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
    cache_dir = _pip_cache_dir() if local else None
    pip_cmds = pip_install_commands(requirements(deco, os.path.dirname(os.path.abspath(sys.argv[0]))), cache_dir)
    package_dir = code_root = None
    if local:
        code_root = cache_root(_config("SANDBOX_CODE_CACHE", None))
        package_dir = prepared_package(obj.flow_datastore, code_package_sha, code_root)
    command = task_command(obj.environment, step_name, step_cli, code, datastore_type, datastore_root, pip_cmds, package_dir)
    labels = {
        "metaflow-sandbox": "1",
        "metaflow.flow": obj.flow.name,
        "metaflow.run": str(run_id),
        "metaflow.step": step_name,
        "metaflow.task": str(task_id),
        "metaflow.attempt": str(retry_count),
        "metaflow.user": user,
    }
    from metaflow_sandbox import Bind, Resources, SandboxSpec

    binds = []
    if local and datastore_type == "local":
        binds.append(Bind(datastore_root))
    if cache_dir:
        binds.append(Bind(cache_dir))
    if code_root:
        binds.append(Bind(code_root, read_only=True))
    attrs = deco.attributes
    backend = load_backend(backend_name, backend_options(backend_name, attrs.get("options")))
    ttl = float(deco.run_time_limit + int(_config("SANDBOX_TTL_MARGIN", 600)))
    max_ttl = backend.capabilities().max_ttl_seconds
    if max_ttl and ttl > max_ttl and not any(d.name == "timeout" for d in node.decorators):
        # No @timeout: Metaflow's 5-day default is not a request, so the backend's cap applies.
        # An explicit @timeout above the cap is refused by the backend facade instead.
        obj.echo_always("Step *%s* can run at most %ds on backend '%s' (its sandbox lifetime cap)." % (step_name, max_ttl, backend_name))
        ttl = float(max_ttl)
    spec = SandboxSpec(
        image=attrs.get("image"),
        resources=Resources(
            cpu=float(attrs["cpu"]) if attrs.get("cpu") else None,
            memory_mb=int(float(attrs["memory"])) if attrs.get("memory") else None,
            gpu=int(float(attrs["gpu"])) if attrs.get("gpu") else None,
            disk_mb=int(float(attrs["disk"])) if attrs.get("disk") else None,
        ),
        env=env,
        labels=labels,
        ttl_seconds=ttl,
        network=attrs.get("network", True),
        binds=tuple(binds),
        idempotency_key=hashlib.sha256(
            ("%s/%s/%s/%s/%d" % (obj.flow.name, run_id, step_name, task_id, retry_count)).encode()
        ).hexdigest()[:32],
    )

    def _sync_metadata():
        if obj.metadata.TYPE == "local" and datastore_type != "local":
            try:
                sync_local_metadata_from_datastore(
                    DATASTORE_LOCAL_DIR, obj.flow_datastore.get_task_datastore(run_id, step_name, task_id)
                )
            except Exception as err:  # the task may have died before it saved any metadata
                obj.echo_always("Could not sync task metadata back from the datastore: %s" % err, err=True)

    from metaflow_sandbox import SandboxError, SandboxNotFoundError, SandboxTimeoutError

    relay = LogRelay(
        obj.flow_datastore.get_task_datastore(run_id, step_name, task_id, attempt=retry_count, mode="w", allow_not_done=True)
    )
    sbx = None
    exit_code = 1
    try:
        try:
            sbx = backend.create(spec)
        except SandboxError as err:
            # Infrastructure failure before any user code ran: never blindly retried.
            obj.echo_always("Could not start a '%s' sandbox for step *%s*: %s" % (backend_name, step_name, err), err=True)
            _sync_metadata()
            sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)
        if obj.metadata.TYPE == "local" and datastore_type != "local":
            _seed_local_metadata(sbx, obj.flow.name, run_id, step_name, task_id)
        relay.system("Task is starting in %s sandbox %s." % (backend_name, sbx.id))
        relay.start_saving()
        try:
            result = sbx.exec(
                command,
                env={"METAFLOW_SANDBOX_ID": sbx.id},
                timeout=min(deco.run_time_limit + TIMEOUT_GRACE, ttl),
                on_stdout=relay.stdout,
                on_stderr=relay.stderr,
            )
            exit_code = result.exit_code  # an OOM kill is explained on stderr by the backend
        except SandboxTimeoutError:
            relay.system(
                "Step *%s* ran past its time limit of %ss (@timeout) and its sandbox was stopped."
                % (step_name, deco.run_time_limit),
                err=True,
            )
            exit_code = 1
        except SandboxNotFoundError as err:
            relay.system("Sandbox %s disappeared while the task ran: %s" % (sbx.id, err), err=True)
            exit_code = 1
        except SandboxError as err:
            relay.system("Sandbox %s failed while the task ran: %s" % (sbx.id, err), err=True)
            exit_code = 1
    except (KeyboardInterrupt, _Terminated):
        obj.echo_always("Interrupted: destroying the sandbox of step *%s*." % step_name, err=True)
        exit_code = METAFLOW_EXIT_DISALLOW_RETRY
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        exit_code = METAFLOW_EXIT_DISALLOW_RETRY
    finally:
        relay.close()
        if sbx is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the teardown finish
            try:
                sbx.destroy()
            except Exception as err:
                obj.echo_always("Could not destroy sandbox %s: %s" % (sbx.id, err), err=True)
            _sync_metadata()
    sys.exit(exit_code)


def _seed_local_metadata(sbx, flow_name, run_id, step_name, task_id):
    """Give the sandbox's local metadata the flow/run/step/task records the runtime wrote here.

    With local metadata and a remote datastore the task's metadata starts empty in the sandbox,
    so Metaflow code that looks the task up from inside (`card create`, the client) would not
    find it. Only the small `_self.json` records travel; the task's own metadata comes back
    through the datastore at the end (sync_local_metadata_*).
    """
    from metaflow.plugins.datastores.local_storage import LocalStorage
    from metaflow_sandbox import UploadItem

    root = LocalStorage.get_datastore_root_from_config(lambda *a, **k: None, create_on_absent=False)
    if not root:
        return
    items = []
    for parts in ([flow_name], [flow_name, run_id], [flow_name, run_id, step_name], [flow_name, run_id, step_name, task_id]):
        rel = os.path.join(*(str(p) for p in parts), "_meta", "_self.json")
        if os.path.isfile(os.path.join(root, rel)):
            with open(os.path.join(root, rel), "rb") as f:
                items.append(UploadItem(os.path.join(sbx.handle.workdir, "metaflow", DATASTORE_LOCAL_DIR, rel), content=f.read()))
    if items:
        sbx.upload(items)


def _config(name, default):
    from metaflow import metaflow_config

    value = getattr(metaflow_config, name, None)
    return default if value in (None, "") else value


def _pip_cache_dir():
    root = _config("SANDBOX_PIP_CACHE", None) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "metaflow-sandbox", "pip"
    )
    os.makedirs(root, exist_ok=True)
    return root


def _flow_sandboxes(ctx, backend, run_id, everything):
    labels = {"metaflow-sandbox": "1", "metaflow.flow": ctx.obj.flow.name}
    if not everything:
        run_id = run_id or util.get_latest_run_id(ctx.obj.echo, ctx.obj.flow.name)
        if run_id is None:
            raise CommandException("No previous run of this flow was found: give --run-id or --all.")
        labels["metaflow.run"] = str(run_id)
    name = backend or _default_backend()
    return name, load_backend(name, backend_options(name)).list(labels)


def _default_backend():
    from .sandbox_decorator import resolve_backend

    return resolve_backend(None)[0]


def _selection(func):
    """--backend/--run-id/--all, shared by `list` and `kill`."""
    func = click.option("--all", "everything", is_flag=True, help="Every run of this flow.")(func)
    func = click.option("--run-id", default=None, help="This run (default: the latest).")(func)
    func = click.option("--backend", default=None, help="Backend to ask (default: METAFLOW_SANDBOX_BACKEND or local).")(func)
    return click.pass_context(func)


@sandbox.command("list", help="List live sandboxes of this flow (latest run by default).")
@_selection
def list_sandboxes(ctx, backend, run_id, everything):
    name, boxes = _flow_sandboxes(ctx, backend, run_id, everything)
    for box in boxes:
        lab = box.handle.labels
        where = "/".join(str(lab.get("metaflow." + k)) for k in ("run", "step", "task"))
        ctx.obj.echo_always("%s  %s attempt %s" % (box.id, where, lab.get("metaflow.attempt")))
    if not boxes:
        ctx.obj.echo_always("No live '%s' sandboxes." % name)


@sandbox.command(help="Destroy live sandboxes of this flow (latest run by default).")
@_selection
def kill(ctx, backend, run_id, everything):
    name, boxes = _flow_sandboxes(ctx, backend, run_id, everything)
    for box in boxes:
        box.destroy()
        ctx.obj.echo_always("Destroyed %s" % box.id)
    if not boxes:
        ctx.obj.echo_always("No live '%s' sandboxes." % name)
