"""Prepared environments for sandboxed steps: what a step's environment holds, and building it once per run.

The launcher (``runtime_init``) starts one build per distinct (backend, key) in a thread, so builds run
while the code package uploads and the first tasks start; a task waits for its step's environment in
``runtime_step_cli`` and hands the ref to its trampoline in ``REF_ENV``. A failed build stops the run
there, with the build log's tail and a Fix line, before any task of that step starts. A trampoline
started without ``REF_ENV`` (a scheduler's `step`, a resume) prepares the environment itself.
``sandbox prepare`` (ahead of time) uses the same registry.
"""

import os
import sys
import threading
import time

from metaflow.exception import MetaflowException

PREPARE_ENV = "METAFLOW_SANDBOX_PREPARE"
#: Set by the launcher for each task: the prepared environment's ref ("" = the step has none).
REF_ENV = "METAFLOW_SANDBOX_ENVIRONMENT_REF"
LOG_TAIL_LINES = 30
PROGRESS_SECONDS = 20  # "still building" on the console this often

class EnvironmentException(MetaflowException):
    headline = "Sandbox environment error"


def prepare_enabled(deco):
    """Off per step (``prepare=False``) or per run (``METAFLOW_SANDBOX_PREPARE=0``)."""
    if deco.attributes.get("prepare") is False:
        return False
    from metaflow import metaflow_config

    raw = getattr(metaflow_config, "SANDBOX_PREPARE", None)
    if raw is None:
        raw = os.environ.get(PREPARE_ENV)
    if raw is None or str(raw).strip() == "":
        return True
    from metaflow_sandbox import parse

    try:
        return parse.boolean(raw, PREPARE_ENV, hint="set %s=0 to install per task instead, or unset it" % PREPARE_ENV)
    except parse.InvalidInputError as err:
        raise EnvironmentException(str(err))


def datastore_requirements(datastore_type, backend):
    """Metaflow's datastore dependencies, where the sandbox cannot use the launcher's and the image may lack them."""
    if backend.capabilities().shares_host_filesystem or os.environ.get("METAFLOW_SKIP_INSTALL_DEPENDENCIES"):
        return ()
    return metaflow_bootstrap_packages(datastore_type)


def metaflow_bootstrap_packages(datastore_type):
    """What Metaflow's own bootstrap pip-installs for this datastore, read from Metaflow itself (so the
    list follows its version): the packages of its `pip install` command. None for the local datastore."""
    from metaflow.metaflow_environment import MetaflowEnvironment

    try:
        cmd = MetaflowEnvironment(None)._get_install_dependencies_cmd(datastore_type)
    except NotImplementedError:
        return ()
    words = cmd.split(" then ", 1)[-1].split(";", 1)[0].split()
    return tuple(w for w in words[words.index("install") + 1 :] if not w.startswith("-"))


def environment_spec(deco, backend, datastore_type, flow_dir=None):
    """The step's EnvironmentSpec, or None: turned off, nothing to install, or a backend that cannot prepare."""
    if not prepare_enabled(deco) or not backend.prepares_environments():
        return None
    from metaflow_sandbox import EnvironmentSpec

    from .sandbox_inputs import launch_spec
    from .sandbox_task import requirements

    flow_dir = flow_dir or os.path.dirname(os.path.abspath(sys.argv[0]))
    reqs = tuple(datastore_requirements(datastore_type, backend)) + tuple(requirements(deco, flow_dir))
    if not reqs:
        return None
    return EnvironmentSpec(
        python_version="%d.%d" % sys.version_info[:2],
        requirements=reqs,
        image=deco.attributes.get("image"),
        resources=launch_spec(deco, backend).resources,
        options=backend.options,
    )


class Build:
    """One environment being found or built in a thread; steps that share its key share it."""

    def __init__(self, backend, spec, step, logger):
        self.backend = backend
        self.spec = spec
        self.steps = [step]
        self.logger = logger
        self.log = []
        self.result = None
        self.error = None
        self.started = time.time()
        self.seconds = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mfsb-env-%s" % spec.key, daemon=True)

    def _on_log(self, text):
        self.log.append(text)
        if len(self.log) > 4 * LOG_TAIL_LINES:
            del self.log[: -2 * LOG_TAIL_LINES]

    def _run(self):
        if self.logger is not None:
            threading.Thread(target=self._progress, name="mfsb-env-progress", daemon=True).start()
        try:
            self.result = self.backend.prepare_environment(self.spec, on_log=self._on_log)
        except Exception as err:  # reported by wait(), in the thread that launches tasks
            self.error = err
        self.seconds = time.time() - self.started
        self.done.set()
        if self.logger is not None:
            self.logger(self.outcome(), system_msg=True)

    def _progress(self):
        while not self.done.wait(PROGRESS_SECONDS):
            self.logger("Still building the %s: %.0fs so far..." % (self.describe(), time.time() - self.started), system_msg=True)

    def describe(self):
        reqs = sorted(set(self.spec.requirements))
        shown = ", ".join(reqs[:4]) + (", ..." if len(reqs) > 4 else "")
        return "'%s' environment %s for step%s %s (%d requirement%s: %s)" % (
            self.backend.name,
            self.spec.name,
            "s" if len(self.steps) > 1 else "",
            ", ".join("*%s*" % s for s in self.steps),
            len(reqs),
            "" if len(reqs) == 1 else "s",
            shown,
        )

    def outcome(self):
        if self.error is not None:
            return "Could not build the %s (after %.1fs)." % (self.describe(), self.seconds or 0)
        how = "built" if self.result.built else "found"
        return "The %s is ready: %s in %.1fs (%s)." % (self.describe(), how, self.seconds, self.result.ref)

    def wait(self, step=None):
        """The ready environment, or EnvironmentException with the build log's tail and a Fix line."""
        if self.thread.is_alive() and step is not None and self.logger is not None:
            self.logger("Step *%s* waits for its environment (building for %.0fs)..." % (step, time.time() - self.started), system_msg=True)
        while self.thread.is_alive():
            self.thread.join(1.0)  # short joins: Ctrl-C stays prompt
        if self.error is not None:
            raise EnvironmentException(failure_message(self.error, self.describe(), self.log))
        return self.result


def failure_message(err, what, log_lines=()):
    """The provider's build log tail, what failed, and a Fix line (the backend's hint, then the way out)."""
    build_log = getattr(err, "build_log", "") or "".join(log_lines)
    tail = [ln for ln in build_log.splitlines() if ln.strip()][-LOG_TAIL_LINES:]
    message = getattr(err, "message", None) or str(err)
    hint = getattr(err, "hint", None)
    lines = ["Could not build the %s: %s" % (what, message)]
    if tail:
        lines.append("Build log (last %d lines):" % len(tail))
        lines += ["    " + ln for ln in tail]
    lines.append("  Fix: %s" % (hint or "check the requirement lines in packages= / requirements_file="))
    lines.append(
        "  (To install in every task instead of preparing: @sandbox(prepare=False) on the step, or %s=0 for the run.)" % PREPARE_ENV
    )
    return "\n".join(lines)


_builds = {}
_lock = threading.Lock()


def start(deco, backend, spec, logger):
    """Start (or join) the build of ``spec`` on ``backend``; returns its Build. Launcher only."""
    # Resources and options too: Daytona and E2B size an environment per resource class, and a step's
    # own options may point at another account or base; only identical requests share a build.
    options = tuple(sorted((k, str(v)) for k, v in (backend.options or {}).items()))
    key = (backend.name, spec.key, spec.resources, options)
    with _lock:
        build = _builds.get(key)
        if build is not None:
            if deco.step not in build.steps:
                build.steps.append(deco.step)
            return build
        build = _builds[key] = Build(backend, spec, deco.step, logger)
    if logger is not None:
        logger("Preparing the %s in the background..." % build.describe(), system_msg=True)
    build.thread.start()
    return build


def raise_failed():
    """Any finished build that failed stops the run, whichever step's task is launching now."""
    with _lock:
        builds = list(_builds.values())
    for build in builds:
        if not build.thread.is_alive() and build.error is not None:
            raise EnvironmentException(failure_message(build.error, build.describe(), build.log))


def reset():
    """Forget the registry (a new run in the same process, e.g. the Runner API)."""
    with _lock:
        _builds.clear()
