"""@sandbox, @daytona and @e2b: one step decorator, three names (backend preset differs).

Imported by every `import metaflow` (launcher, trampoline, the task inside the sandbox, client
scripts), so nothing here imports a backend SDK or even `metaflow_sandbox` at module level.
The shape follows @batch: the decorator redirects the task to `python flow.py sandbox step`
(the trampoline, sandbox_cli.py), which runs the unchanged Metaflow task inside a sandbox.
"""

import json
import os
import sys

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum
from metaflow.metadata_provider.util import sync_local_metadata_to_datastore
from metaflow.metaflow_config import DATASTORE_LOCAL_DIR, FEAT_ALWAYS_UPLOAD_CODE_PACKAGE
from metaflow.plugins.aws.aws_utils import compute_resource_attributes
from metaflow.plugins.timeout_decorator import get_run_time_limit_for_task

from .sandbox_inputs import (
    REFUSALS_ENV,
    check_attributes,
    check_backend_name,
    check_requirements_file,
    check_resources,
    check_settings,
    checks_off,
    launch_spec,
    raise_noted_refusals,
    refusals_file,
    refused,
    step_ttl,
    user_env,
)

# Compute decorators that cannot share a step with ours (Metaflow's own remote list + ours).
OTHER_COMPUTE = {"batch", "kubernetes", "nvidia", "snowpark", "slurm", "nvct", "skypilot_step"}
SANDBOX_NAMES = {"sandbox", "daytona", "e2b"}
# Set inside every sandbox by the trampoline: "this task really runs in a sandbox".
WORKLOAD_ENV = "METAFLOW_SANDBOX_WORKLOAD"


class SandboxException(MetaflowException):
    headline = "Sandbox error"


def as_bool(value):
    """Attributes round-trip through `--with` as strings ("True", "false", ...)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def as_json(value, what, example="{\"MY_SETTING\": \"x\"}", kind="a dict"):
    """Dict/list attributes may arrive as JSON strings from `--with sandbox:env={...}`."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise SandboxException(
                "@sandbox(%s=...) must be %s (JSON through --with), not %r\n  Fix: give e.g. --with 'sandbox:%s=%s'"
                % (what, kind, value, what, example)
            )
    return value


class SandboxDecorator(StepDecorator):
    """
    Runs this step in an isolated sandbox (like @batch, with sub-second starts).

    Parameters
    ----------
    backend : str, optional
        Sandbox backend ("local", "daytona", "e2b" or any installed third-party backend).
        Default: METAFLOW_SANDBOX_BACKEND, else "local".
    cpu : int, default 1
        CPUs for the step; with @resources the larger value wins.
    memory : int, default 4096
        Memory in MB (a hard limit); with @resources the larger value wins.
    gpu : int, default 0
        GPUs; refused by backends without GPUs.
    disk : int, optional
        Disk in MB, where the backend supports it.
    image : str, optional
        Image / template / snapshot base, where the backend supports it.
    env : dict, optional
        Extra (non-secret) environment variables for the task.
    network : bool, default True
        False cuts the sandbox's network (backends that can).
    packages : list, optional
        pip requirements installed inside the sandbox before the step runs.
    requirements_file : str, optional
        A requirements file (relative to the flow's directory) installed the same way.
    options : dict, optional
        Backend-specific, non-secret options (e.g. {"snapshot": "..."}).
    executable : str, optional
        Python interpreter inside the sandbox (default: the launcher's for "local", else "python").
    prepare : bool, default True
        Build the step's requirements (and, off `local`, Metaflow's datastore dependencies) once per
        run into a prepared environment the sandboxes start from; False installs them in every task.
        METAFLOW_SANDBOX_PREPARE=0 turns it off for the whole run.
    """

    name = "sandbox"
    preset_backend = None
    defaults = {
        "backend": None,
        "cpu": None,
        "memory": None,
        "gpu": None,
        "disk": None,
        "image": None,
        "env": None,
        "network": True,
        "packages": None,
        "requirements_file": None,
        "options": None,
        "executable": None,
        "prepare": True,
    }
    resource_defaults = {"cpu": "1", "memory": "4096", "gpu": "0"}

    # @pypi/@conda: solve for the sandbox's platform, not the launcher's (metaflow-internals 2.9).
    supports_conda_environment = True
    target_platform = "linux-64"

    package_url = None
    package_sha = None
    package_metadata = None

    def init(self):
        preset = self.preset_backend
        if preset:
            if self.attributes["backend"] not in (None, "", preset):
                raise SandboxException(
                    "@%s always runs on backend '%s', but backend=%r was given.\n  Fix: use @sandbox(backend=%r) instead."
                    % (self.name, preset, self.attributes["backend"], self.attributes["backend"])
                )
            self.attributes["backend"] = preset
        for key in ("env", "options"):
            value = as_json(self.attributes[key], key)
            if value is not None and not isinstance(value, dict):
                raise SandboxException(
                    "@%s(%s=...) must be a dict, not %r\n  Fix: give e.g. %s={'MY_SETTING': 'x'}" % (self.name, key, value, key)
                )
            self.attributes[key] = value
        packages = self.attributes["packages"]
        if isinstance(packages, str):  # one requirement, or a JSON list through --with
            packages = as_json(packages, "packages", '["pandas==2.2.3"]', "a list") if packages.lstrip().startswith("[") else [packages]
        if packages is not None and not isinstance(packages, list):
            raise SandboxException(
                "@%s(packages=...) must be a list of pip requirements, not %r\n  Fix: give e.g. packages=['pandas==2.2.3']"
                % (self.name, packages)
            )
        self.attributes["packages"] = packages
        if checks_off():  # inside the sandbox (checked at launch), or where the core is not installed
            self.attributes["network"] = as_bool(self.attributes["network"])
            self.attributes["prepare"] = as_bool(self.attributes["prepare"])
        else:
            check_attributes(self.name, self.attributes)  # strict: network='no' is off, cpu=-1 is refused

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        # Inside the sandbox the launcher has already checked all this (and loading backends there is waste).
        in_sandbox = os.environ.get(WORKLOAD_ENV)
        if not in_sandbox:
            from metaflow_sandbox.plugins import freeze_discovery

            freeze_discovery()  # the installed backends do not change while this command runs: read them once
            self._refuse_combinations(step_name, decorators)
        self.step = step_name
        self.logger = logger
        self.environment = environment
        self.flow_datastore = flow_datastore
        self.backend_name, self.backend_source = resolve_backend(self.attributes["backend"])
        options = self.attributes["options"]
        if flow_datastore.TYPE == "local" and not in_sandbox and not backend_shares_filesystem(self.backend_name, options):
            raise SandboxException(
                "Step *%s* runs on backend '%s', which cannot see this machine's files, but the datastore is "
                "local (which works only with backends whose sandboxes see this machine's files, such as 'local').\n"
                "  Fix: use a datastore the sandbox can reach: "
                "run with --datastore=s3 and set METAFLOW_DATASTORE_SYSROOT_S3 (plus METAFLOW_S3_ENDPOINT_URL for S3-compatible stores), "
                "or --datastore=azure / --datastore=gs."
                % (step_name, self.backend_name)
            )
        self.attributes.update(compute_resource_attributes(decorators, self, self.resource_defaults))
        self.run_time_limit = get_run_time_limit_for_task(decorators)
        self.has_timeout = any(d.name == "timeout" for d in decorators)
        if not checks_off():
            try:  # @resources values too, merged above
                check_resources(self.name, self.attributes)
            except Exception as err:
                raise refused(err, step_name)

    def _refuse_combinations(self, step_name, decorators):
        """Launcher only: the step's other decorators that cannot go with a sandbox."""
        from .sandbox_scheduled import is_pod_decorator
        from .sandbox_schedulers import refuse_schedulers

        # Argo Workflows / Step Functions / Airflow would run this step unsandboxed: refuse.
        refuse_schedulers(self.name, step_name, decorators, os.path.basename(sys.argv[0]))
        for deco in decorators:
            if deco is self or is_pod_decorator(deco):  # a supported scheduler's pod: it launches our sandbox
                continue
            if deco.name in OTHER_COMPUTE or deco.name in SANDBOX_NAMES:
                raise SandboxException(
                    "Step *%s* has both @%s and @%s. A step runs on one compute backend: remove one of them."
                    % (step_name, self.name, deco.name)
                )
            if deco.name == "parallel":
                raise SandboxException(
                    "Step *%s* uses @parallel, which @%s does not support (no multi-node sandboxes). "
                    "Remove @%s from this step, or run it with @kubernetes/@batch." % (step_name, self.name, self.name)
                )

    def runtime_init(self, flow, graph, package, run_id):
        """Launcher only: load the backend and check credentials before any upload."""
        from .sandbox_server import start_at_runtime_init

        self.flow = flow
        self.graph = graph
        self.package = package
        self.run_id = run_id
        # First, so that its import of Metaflow (~0.5 s) overlaps the checks below and the start step.
        # A check that fails ends the run, and the server with it.
        start_at_runtime_init(self.step, run_id, trampoline_env(), self.logger)
        backend = load_backend(self.backend_name, backend_options(self.backend_name, self.attributes["options"]))
        try:
            backend.check_config()
        except Exception as err:
            raise SandboxException(str(err))
        self.logger(
            "Step *%s* runs in a '%s' sandbox (%s)." % (self.step, self.backend_name, self.backend_source),
            system_msg=True,
        )
        self._refuse_at_launch(backend, graph)
        self._start_environment(backend)

    def _start_environment(self, backend):
        """One build per distinct environment, started now in a thread: it overlaps the upload and the first tasks."""
        from metaflow_sandbox import SandboxError

        from .sandbox_environments import environment_spec, start

        self.environment_build = None
        try:
            spec = environment_spec(self, backend, self.flow_datastore.TYPE)
        except SandboxError as err:
            raise refused(err, self.step)
        if spec is not None:
            self.environment_build = start(self, backend, spec, self.logger)

    def _refuse_at_launch(self, backend, graph):
        """What the backend would refuse at task time (a GPU or an image on `local`, cpu above its cap,
        a bad setting), refused now: before any task and before the code package upload."""
        from metaflow_sandbox import SandboxError

        try:
            check_settings(backend)
            check_requirements_file(self)
            spec = launch_spec(self, backend, user_env(self, graph[self.step]))
            if step_ttl(self, backend)[1]:
                self.logger(
                    "Step *%s* can run at most %ds on backend '%s' (its sandbox lifetime cap)."
                    % (self.step, spec.ttl_seconds, self.backend_name),
                    system_msg=True,
                )
            backend.validate(spec)
        except SandboxError as err:
            raise refused(err, self.step)

    def runtime_task_created(self, task_datastore, task_id, split_index, input_paths, is_cloned, ubf_context):
        if not is_cloned:
            self._save_package_once(self.flow_datastore, self.package)

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context):
        # Past the user-code retries comes the @catch fallback: it runs locally, like @batch.
        if retry_count <= max_user_code_retries:
            cli_args.commands = ["sandbox", "step"]
            cli_args.command_args.append(self.package_metadata)
            cli_args.command_args.append(self.package_sha)
            cli_args.command_args.append(self.package_url)
            # The trampoline needs our SDKs: run it with the launcher's interpreter, even if
            # @pypi/@conda pointed the entrypoint at the step's environment (sandbox_cli re-execs).
            cli_args.entrypoint[0] = sys.executable
            cli_args.env.pop("PYTHONNOUSERSITE", None)
            cli_args.env.update(trampoline_env())
            # The step's prepared environment: a failed build (of any step) stops the run before this task starts.
            from .sandbox_environments import REF_ENV, raise_failed

            raise_failed()
            build = getattr(self, "environment_build", None)
            cli_args.env[REF_ENV] = build.wait(self.step).ref if build is not None else ""
            # The fast path: a thin client asks the run's sandbox server to fork this trampoline.
            from .sandbox_server import fast_path_cli

            # @pypi/@conda may point entrypoint[0] at their interpreter after this hook: only the Python client runs under any Python.
            shell = not any(d.name in ("pypi", "conda") for d in self.graph[self.step].decorators)
            fast_path_cli(cli_args, self.run_id, self.logger, shell=shell)

    def runtime_finished(self, exception):
        """A sandbox that could not start (e.g. an unknown template) ends the run with its reason and fix,
        instead of Metaflow's "Internal error: the terminal step ... was not successful"."""
        from .sandbox_server import stop_server

        stop_server()
        if exception is None:
            raise_noted_refusals()

    def task_pre_step(
        self, step_name, task_datastore, metadata, run_id, task_id, flow, graph, retry_count, max_retries, ubf_context, inputs
    ):
        self.metadata = metadata
        self.task_datastore = task_datastore
        if os.environ.get(WORKLOAD_ENV):
            entries = {
                "sandbox-backend": os.environ.get("METAFLOW_SANDBOX_BACKEND_NAME", ""),
                "sandbox-id": os.environ.get("METAFLOW_SANDBOX_ID", ""),
            }
            metadata.register_metadata(
                run_id,
                step_name,
                task_id,
                [MetaDatum(field=k, value=v, type=k, tags=["attempt_id:%d" % retry_count]) for k, v in entries.items()],
            )

    def task_finished(self, step_name, flow, graph, is_task_ok, retry_count, max_retries):
        # Local metadata with a remote datastore travels back through the datastore.
        if os.environ.get(WORKLOAD_ENV) and getattr(self, "metadata", None) is not None:
            if self.metadata.TYPE == "local" and self.task_datastore.TYPE != "local":
                sync_local_metadata_to_datastore(DATASTORE_LOCAL_DIR, self.task_datastore)

    @classmethod
    def _save_package_once(cls, flow_datastore, package):
        if cls.package_url is None:
            if FEAT_ALWAYS_UPLOAD_CODE_PACKAGE:
                cls.package_url = package.package_url()
                cls.package_sha = package.package_sha()
            else:
                cls.package_url, cls.package_sha = flow_datastore.save_data([package.blob], len_hint=1)[0]
            cls.package_metadata = package.package_metadata


class DaytonaDecorator(SandboxDecorator):
    """Runs this step in a Daytona sandbox; same attributes as @sandbox."""

    name = "daytona"
    preset_backend = "daytona"

    def init(self):
        # Metaflow calls init() only when the class itself defines it (not inherited).
        super().init()


class E2BDecorator(SandboxDecorator):
    """Runs this step in an E2B sandbox; same attributes as @sandbox."""

    name = "e2b"
    preset_backend = "e2b"

    def init(self):
        # Metaflow calls init() only when the class itself defines it (not inherited).
        super().init()


def trampoline_env():
    """What every trampoline of this run gets from the launcher (and the run's server, started with it)."""
    from .sandbox_lifeline import launcher_env

    env = {"METAFLOW_SANDBOX_LAUNCHER_PYTHON": sys.executable}
    env[REFUSALS_ENV] = refusals_file()  # why a sandbox could not start, for runtime_finished
    env.update(launcher_env())  # the lifeline: the run's reaper destroys the sandbox of a trampoline killed by any signal
    return env


def resolve_backend(attribute):
    """(name, where it came from): the attribute, else METAFLOW_SANDBOX_BACKEND, else local."""
    if attribute:
        return attribute, "set by the decorator"
    from metaflow.metaflow_config import SANDBOX_BACKEND

    if SANDBOX_BACKEND is not None and not checks_off():
        try:
            check_backend_name(SANDBOX_BACKEND, "METAFLOW_SANDBOX_BACKEND", "METAFLOW_SANDBOX_BACKEND=local (or unset it)")
        except Exception as err:
            raise refused(err)
        return SANDBOX_BACKEND, "from METAFLOW_SANDBOX_BACKEND"
    if SANDBOX_BACKEND:
        return SANDBOX_BACKEND, "from METAFLOW_SANDBOX_BACKEND"
    return "local", "the default; choose another with METAFLOW_SANDBOX_BACKEND or @sandbox(backend=...)"


def backend_options(name, attribute_options=None):
    """Backend settings from Metaflow config: METAFLOW_SANDBOX_<NAME>_<KEY> -> options["<key>"].

    Read from ~/.metaflowconfig and the environment (environment wins), then the decorator's
    non-secret `options` attribute on top (the one rule: metaflow_sandbox.options).
    """
    from metaflow import metaflow_config_funcs
    from metaflow_sandbox import options_from_config

    return options_from_config(name, metaflow_config_funcs.METAFLOW_CONFIG or {}, os.environ, attribute=attribute_options)


def load_backend(name, options=None):
    """The core's Backend facade, with core errors turned into Metaflow errors."""
    try:
        from metaflow_sandbox import Backend, SandboxError
    except ImportError as err:
        raise SandboxException(
            "metaflow-sandbox is not importable by %s (%s). Install it in the environment that "
            "launches the flow: pip install metaflow-sandbox" % (sys.executable, err)
        )
    try:
        return Backend(name, options=options)
    except SandboxError as err:
        raise SandboxException(str(err))


def backend_shares_filesystem(name, attribute_options=None):
    """Whether a sandbox of this backend, with its options, sees the launcher's files (only then a local datastore works)."""
    return load_backend(name, backend_options(name, attribute_options)).capabilities().shares_host_filesystem
