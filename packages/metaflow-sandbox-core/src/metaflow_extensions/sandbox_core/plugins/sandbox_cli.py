"""`python flow.py sandbox ...`: the trampoline (`step`) plus `list` and `kill`.

`sandbox step` runs on the launcher, one process per task: create a labelled sandbox, run the
unchanged Metaflow task in it with live logs, return the task's exit code, destroy the sandbox
in every case (success, failure, exception, Ctrl-C, SIGTERM; the provider TTL covers SIGKILL).
"""

import hashlib
import os
import sys
import time
import traceback

from metaflow import util
from metaflow._vendor import click
from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY, CommandException
from metaflow.metadata_provider.util import sync_local_metadata_from_datastore
from metaflow.metaflow_config import DATASTORE_LOCAL_DIR
from metaflow.unbounded_foreach import UBF_CONTROL, UBF_TASK

from .sandbox_code_cache import prepared_package
from .sandbox_decorator import SandboxDecorator, backend_options, load_backend
from .sandbox_inputs import note_refusal
from .sandbox_lifeline import attach as attach_lifeline
from .sandbox_lifeline import watch_launcher
from .sandbox_logs import LogRelay
from .sandbox_scheduled import Bookkeeping, inner_decospecs, read_input_paths
from .sandbox_server import report_early
from .sandbox_task import CREDENTIAL_FILE_ENV, pip_install_commands, requirements, task_command, task_env

# Seconds past the step's time limit before the facade stops the command: @timeout's own
# SIGALRM inside the task must win, so the failure reads as a timeout (metaflow-internals 2.7).
# The facade's deadline catches a task that does not end at its alarm (it ignores SIGALRM, or hangs in C).
TIMEOUT_GRACE = 60
TIMEOUT_GRACE_ENV = "METAFLOW_SANDBOX_TIMEOUT_GRACE"


@click.group()
def cli():
    pass


@cli.group(help="Commands related to sandboxed steps (@sandbox, @daytona, @e2b).")
def sandbox():
    pass


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
@click.option("--input-paths-filename", default=None, help="Argo Workflows' file of input paths (read here).")
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
    from metaflow_sandbox import Bind
    from metaflow_sandbox.signals import raise_on_sigterm

    raise_on_sigterm()  # SIGTERM raises Terminated here: the facade stops the command, `finally` destroys the sandbox
    watch_launcher()

    obj = ctx.obj
    node = obj.graph[step_name]
    deco = _sandbox_deco(node)
    filename = kwargs.pop("input_paths_filename", None)
    if filename:
        kwargs["input_paths"] = read_input_paths(filename)
    task = {
        "step": step_name,
        "run_id": kwargs["run_id"],
        "task_id": kwargs["task_id"],
        "attempt": int(kwargs.get("retry_count") or 0),
        "user": util.get_username(),
    }
    _sleep_before_retry(obj, node, task)
    backend = load_backend(deco.backend_name, backend_options(deco.backend_name, deco.attributes.get("options")))
    caps = backend.capabilities()
    # A backend whose sandboxes see this machine's files (`local`, or a third party's that says so)
    # reuses what can be shared, read-only, instead of downloading it in every sandbox.
    local = caps.shares_host_filesystem
    code = {"metadata": code_package_metadata, "sha": code_package_sha, "url": code_package_url}
    step_cli, env_extra = _step_cli(ctx, deco, step_name, kwargs, local)

    env = task_env(obj, deco, task["run_id"], obj.flow_datastore.TYPE, code, task["user"], deco.backend_name)
    env.update(env_extra)
    environment = _environment_ref(obj, deco, backend, task)
    if environment:  # everything is installed already: no pip, and Metaflow's bootstrap installs nothing either
        env["METAFLOW_SKIP_INSTALL_DEPENDENCIES"] = "1"
    binds = []
    package_dir = pip_cache = None
    if local:
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
        pip_cache = _cache_dir("SANDBOX_PIP_CACHE", "pip")
        code_root = _cache_dir("SANDBOX_CODE_CACHE", "code")
        package_dir = prepared_package(obj.flow_datastore, code_package_sha, code_root)
        if caps.binds:  # a backend that shares files without binds sees them at the same paths anyway
            binds = [Bind(code_root, read_only=True)] + ([] if environment else [Bind(pip_cache)])
            if obj.flow_datastore.TYPE == "local":
                binds.append(Bind(obj.flow_datastore.datastore_root))
    pip_cmds = [] if environment else pip_install_commands(requirements(deco, os.path.dirname(os.path.abspath(sys.argv[0]))), pip_cache)
    command = task_command(
        obj.environment,
        step_name,
        step_cli,
        code,
        obj.flow_datastore.TYPE,
        obj.flow_datastore.datastore_root,
        pip_cmds,
        package_dir,
        seeded=_seeds_metadata(obj),
    )
    backend.lifeline = attach_lifeline()
    spec = _sandbox_spec(obj, node, deco, backend, task, env, binds, environment)
    bookkeeping = Bookkeeping(obj, node, task, int(kwargs.get("max_user_code_retries") or 0))  # a scheduler's, in its pod
    bookkeeping.before()
    exit_code = _run_task(obj, backend, spec, command, deco, task)
    if exit_code == 0:
        bookkeeping.after()
    sys.exit(exit_code)


def _environment_ref(obj, deco, backend, task):
    """The step's prepared environment: from the launcher (REF_ENV), else found or built here
    (a scheduler's `step`, a resume). A failed build ends the task before any sandbox exists."""
    from .sandbox_environments import REF_ENV, environment_spec, failure_message

    if REF_ENV in os.environ:
        return os.environ[REF_ENV] or None
    try:
        spec = environment_spec(deco, backend, obj.flow_datastore.TYPE)
        if spec is None:
            return None
        started = time.time()
        prepared = backend.prepare_environment(spec)
    except Exception as err:
        what = "'%s' environment for step *%s*" % (backend.name, task["step"])
        obj.echo_always(failure_message(err, what), err=True)
        note_refusal(task["step"], task["task_id"], backend.name, err)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)
    obj.echo_always(
        "The '%s' environment %s of step *%s*: %s in %.1fs (%s)."
        % (backend.name, spec.name, task["step"], "built" if prepared.built else "found", time.time() - started, prepared.ref)
    )
    return prepared.ref


def _sleep_before_retry(obj, node, task):
    """Like @batch, wait `minutes_between_retries` before a retry (the local runtime does not)."""
    retry_decos = [d for d in node.decorators if d.name == "retry"]
    if task["attempt"] and retry_decos:
        minutes = int(retry_decos[0].attributes.get("minutes_between_retries", 1) or 0)
        if minutes:
            obj.echo_always("Sleeping %d minute(s) before retry %d of step *%s*." % (minutes, task["attempt"], task["step"]))
            time.sleep(minutes * 60)


def _step_cli(ctx, deco, step_name, kwargs, local):
    """The `python flow.py ... step ...` command the sandbox runs, and env vars it refers to."""
    executable = deco.attributes.get("executable") or (sys.executable if local else "python")
    entrypoint = "%s -u %s" % (ctx.obj.environment.executable(step_name, executable), os.path.basename(sys.argv[0]))
    params = dict(ctx.parent.parent.params)
    params["decospecs"] = inner_decospecs(params.get("decospecs"))
    top_args = " ".join(util.dict_to_cli_options(params))
    env = {}
    input_paths = kwargs.get("input_paths")
    if input_paths:  # long input paths travel as env vars, like @batch
        chunk = 30 * 1024
        env = {"METAFLOW_INPUT_PATHS_%d" % (i // chunk): input_paths[i : i + chunk] for i in range(0, len(input_paths), chunk)}
        kwargs = dict(kwargs, input_paths="".join("${%s}" % k for k in env))
    return "%s %s step %s %s" % (entrypoint, top_args, step_name, " ".join(util.dict_to_cli_options(kwargs))), env


def _sandbox_spec(obj, node, deco, backend, task, env, binds, environment=None):
    """The launch-time shape (sandbox_inputs.launch_spec, already validated) plus this task's env, labels and binds."""
    import dataclasses

    from metaflow_sandbox import MARKER_LABEL

    from .sandbox_inputs import launch_spec, refused, step_ttl

    try:
        spec = launch_spec(deco, backend, env)
    except Exception as err:  # a config variable changed since launch: still a clean error
        raise refused(err, task["step"])
    if step_ttl(deco, backend)[1]:
        obj.echo_always(
            "Step *%s* can run at most %ds on backend '%s' (its sandbox lifetime cap)." % (task["step"], spec.ttl_seconds, backend.name)
        )
    labels = {
        MARKER_LABEL: "1",
        "metaflow.flow": obj.flow.name,
        "metaflow.run": str(task["run_id"]),
        "metaflow.step": task["step"],
        "metaflow.task": str(task["task_id"]),
        "metaflow.attempt": str(task["attempt"]),
        "metaflow.user": task["user"],
    }
    key = "%s/%s/%s/%s/%d" % (obj.flow.name, task["run_id"], task["step"], task["task_id"], task["attempt"])
    return dataclasses.replace(
        spec,
        labels=labels,
        binds=tuple(binds),
        idempotency_key=hashlib.sha256(key.encode()).hexdigest()[:32],
        environment=environment,
    )


def _run_task(obj, backend, spec, command, deco, task):
    """Create, run with live logs, destroy in every case; returns the exit code for Metaflow."""
    from metaflow_sandbox import SandboxError, SandboxNotFoundError, SandboxTimeoutError
    from metaflow_sandbox.signals import Terminated, ignore_sigterm

    datastore = obj.flow_datastore
    relay = LogRelay(
        datastore.get_task_datastore(task["run_id"], task["step"], task["task_id"], attempt=task["attempt"], mode="w", allow_not_done=True)
    )
    remote_metadata = _seeds_metadata(obj)

    def sync_metadata():
        if remote_metadata:
            try:
                task_ds = datastore.get_task_datastore(task["run_id"], task["step"], task["task_id"])
                sync_local_metadata_from_datastore(DATASTORE_LOCAL_DIR, task_ds)
            except Exception as err:  # the task may have died before it saved any metadata
                obj.echo_always("Could not sync task metadata back from the datastore: %s" % err, err=True)

    try:
        sbx = backend.create(spec)
    except SandboxError as err:
        # Infrastructure failure before any user code ran: never blindly retried.
        obj.echo_always("Could not start a '%s' sandbox for step *%s*: %s" % (backend.name, task["step"], err), err=True)
        note_refusal(task["step"], task["task_id"], backend.name, err)  # the launcher ends the run with it
        return METAFLOW_EXIT_DISALLOW_RETRY
    except (KeyboardInterrupt, Terminated):
        # Killed mid-create: the lifeline's reaper finds a sandbox that still came up by its owner label.
        obj.echo_always("Interrupted while starting the sandbox of step *%s*." % task["step"], err=True)
        return METAFLOW_EXIT_DISALLOW_RETRY
    exit_code = 1
    try:
        if remote_metadata:
            _seed_local_metadata(sbx, obj.flow.name, task["run_id"], task["step"], task["task_id"])
        exec_env = {"METAFLOW_SANDBOX_ID": sbx.id}
        exec_env.update(_upload_credential_files(sbx))
        relay.system("Task is starting in %s sandbox %s." % (backend.name, sbx.id))
        relay.start_saving()
        # The facade waits in this (main) thread: Ctrl-C and SIGTERM reach it at once and stop the command.
        result = sbx.exec(
            command,
            env=exec_env,
            timeout=min(deco.run_time_limit + _timeout_grace(), spec.ttl_seconds),
            on_stdout=relay.stdout,
            on_stderr=relay.stderr,
        )
        exit_code = result.exit_code  # an OOM kill is explained on stderr by the backend
    except SandboxTimeoutError:
        relay.system(
            "Step *%s* ran past its time limit of %ss (@timeout) and its sandbox was stopped." % (task["step"], deco.run_time_limit),
            err=True,
        )
    except SandboxNotFoundError as err:
        relay.system("Sandbox %s disappeared while the task ran: %s" % (sbx.id, err), err=True)
    except SandboxError as err:
        relay.system("Sandbox %s failed while the task ran: %s" % (sbx.id, err), err=True)
    except (KeyboardInterrupt, Terminated):
        obj.echo_always("Interrupted: destroying the sandbox of step *%s*." % task["step"], err=True)
        exit_code = METAFLOW_EXIT_DISALLOW_RETRY
    except Exception:
        traceback.print_exc()
        exit_code = METAFLOW_EXIT_DISALLOW_RETRY
    finally:
        ignore_sigterm()  # let the teardown finish
        relay.close()
        sync_metadata()
        if exit_code == 0:  # on the fast path the runtime sees the task end now, not after the destroy;
            report_early(exit_code)  # a failed attempt's retry never overlaps its predecessor's teardown
        try:
            sbx.destroy()
        except Exception as err:  # the lifeline's reaper retries it once this process is gone
            obj.echo_always("Could not destroy sandbox %s: %s" % (sbx.id, err), err=True)
    return exit_code


def _timeout_grace():
    """TIMEOUT_GRACE, or METAFLOW_SANDBOX_TIMEOUT_GRACE (1 to 60 s; shorter lets tests see the facade's deadline)."""
    raw = str(_config("SANDBOX_TIMEOUT_GRACE", "")).strip()  # the environment, or ~/.metaflowconfig
    if not raw:
        return TIMEOUT_GRACE
    from metaflow_sandbox import parse

    try:
        return parse.seconds(raw, TIMEOUT_GRACE_ENV, minimum=1, maximum=TIMEOUT_GRACE, allow_minimum=True)
    except parse.InvalidInputError as err:  # a test knob: said, not fatal
        print("metaflow-sandbox: %s (using %ss)" % (err, TIMEOUT_GRACE), file=sys.stderr)
        return TIMEOUT_GRACE


def _seeds_metadata(obj):
    """Local metadata with a remote datastore: the sandbox starts with an empty `.metaflow`."""
    return obj.metadata.TYPE == "local" and obj.flow_datastore.TYPE != "local"


def _upload_credential_files(sbx):
    """Credentials that are file paths (GCP's) travel as files, not as launcher paths.

    Returns the variables pointing at the copies inside the sandbox.
    """
    env = {}
    for name in CREDENTIAL_FILE_ENV:
        path = os.environ.get(name)
        if path and os.path.isfile(path):
            suffix = os.path.splitext(path)[1] or ".json"  # a PEM bundle stays .pem
            inside = os.path.join(sbx.handle.workdir, ".metaflow-sandbox", "credentials", name.lower() + suffix)
            sbx.write_file(inside, source=path)
            env[name] = inside
    return env


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


def _cache_dir(setting, name):
    root = _config(setting, None) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "metaflow-sandbox", name
    )
    os.makedirs(root, exist_ok=True)
    return root


def _flow_sandboxes(ctx, backend, run_id, everything):
    from metaflow_sandbox import MARKER_LABEL

    labels = {MARKER_LABEL: "1", "metaflow.flow": ctx.obj.flow.name}
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


@sandbox.command(hidden=True, help="The run's sandbox server (the fast path). Used internally by Metaflow.")
@click.option("--socket", "socket_path", required=True)
@click.option("--launcher-pid", type=int, required=True)
@click.option("--tcp-fd", type=int, default=None, help="An inherited listening socket for the shell client.")
@click.option("--backend-settings", default=None, help="Every installed backend's settings (names), as the launcher found them.")
@click.pass_obj
def serve(obj, socket_path, launcher_pid, tcp_fd, backend_settings):
    from .sandbox_server import serve as run_server

    sys.exit(run_server(obj, socket_path, launcher_pid, tcp_fd, backend_settings))


@sandbox.command(help="Build (or find) the prepared environment of every sandboxed step, ahead of a run.")
@click.option("--backend", default=None, help="Backend for steps that do not name one (default: METAFLOW_SANDBOX_BACKEND or local).")
@click.pass_obj
def prepare(obj, backend):
    from .sandbox_environments import EnvironmentException, environment_spec, start

    builds, skipped = [], []

    def progress(line, **kwargs):  # what is built, waits and outcomes on stderr; results on stdout
        obj.echo_always(line, err=True)

    for node in obj.graph:
        decos = [d for d in node.decorators if isinstance(d, SandboxDecorator)]
        if not decos:
            continue
        deco = decos[0]
        name = backend if backend and deco.backend_source != "set by the decorator" else deco.backend_name
        facade = load_backend(name, backend_options(name, deco.attributes.get("options")))
        try:
            facade.check_config()
            spec = environment_spec(deco, facade, obj.flow_datastore.TYPE)
        except Exception as err:
            raise CommandException("Step *%s*: %s" % (node.name, err))
        if spec is None:
            skipped.append(node.name)
        else:
            build = start(deco, facade, spec, progress)
            if build not in builds:
                builds.append(build)
    for step_name in skipped:
        obj.echo_always(
            "Step *%s*: nothing to prepare (no requirements, prepare=False, or a backend without prepared environments)." % step_name
        )
    failed = False
    for build in builds:
        try:
            env = build.wait(build.steps[0])
        except EnvironmentException as err:
            obj.echo_always(str(err), err=True)
            failed = True
            continue
        click.echo(  # stdout: one line per environment, for scripts (the rest goes to stderr)
            "%s  %s  %.1fs  %s  (steps: %s)"
            % (env.ref, "built" if env.built else "found", build.seconds, build.backend.name, ", ".join(build.steps))
        )
    if failed:
        sys.exit(1)


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
