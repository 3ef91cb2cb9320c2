"""Every user input of a sandboxed step, parsed strictly: decorator attributes and config variables.

The decorator calls these on the launcher and in trampolines, never inside the sandbox (the core,
`metaflow_sandbox`, may not be installed there, and the values were checked at launch). A bad value
raises `SandboxInputError` with the core's message and "Fix:" line, before any task runs.
"""

import os
import re

from metaflow.exception import MetaflowException

#: Names backends are registered under (entry-point names): a stray space or comma is a typo.
BACKEND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
#: Option keys that look like credentials: attributes are saved in the run's graph info, so never there.
SECRET_OPTION = re.compile(r"(^|_)(key|secret|token|password|credentials?)$", re.IGNORECASE)
TTL_MARGIN_ENV = "METAFLOW_SANDBOX_TTL_MARGIN"
DEFAULT_TTL_MARGIN = 600.0
#: The command is stopped this long after the step's limit (sandbox_cli.TIMEOUT_GRACE): a smaller
#: margin would end the sandbox before @timeout could report the timeout.
MIN_TTL_MARGIN = 60.0
FORWARD_ENV = "METAFLOW_SANDBOX_FORWARD_ENV"


class SandboxInputError(MetaflowException):
    headline = "Sandbox error"


def _parse():
    from metaflow_sandbox import parse

    return parse


def refused(err, step=None):
    """A core error as a Metaflow error: the message and its Fix line, no traceback."""
    where = "Step *%s*: " % step if step else ""
    return SandboxInputError(where + str(err))


def check_attributes(deco_name, attrs):
    """Normalise the decorator's attributes in place (they may arrive as strings through `--with`)."""
    parse = _parse()

    def what(key):
        return "@%s(%s=...)" % (deco_name, key)

    try:
        backend = attrs.get("backend")
        if backend not in (None, ""):
            check_backend_name(backend, what("backend"), "@%s(backend='local')" % deco_name)
        attrs["network"] = parse.boolean(
            attrs.get("network", True),
            what("network"),
            hint="write @%s(network=False) to cut the network (or 'false', 'no', '0', 'off' through --with), "
            "network=True to keep it" % deco_name,
        )
        attrs["prepare"] = parse.boolean(
            attrs.get("prepare", True),
            what("prepare"),
            hint="write @%s(prepare=False) to install the step's packages in every task instead of once per run "
            "(or 'false', 'no', '0', 'off' through --with)" % deco_name,
        )
        check_resources(deco_name, attrs)
        for key, example in (("image", "'python:3.12-slim'"), ("executable", "'python3'"), ("requirements_file", "'requirements.txt'")):
            if attrs.get(key) is not None:
                attrs[key] = parse.text(attrs[key], what(key), "@%s(%s=%s)" % (deco_name, key, example))
        if attrs.get("env") is not None:
            attrs["env"] = parse.environment(attrs["env"], what("env"))
        if attrs.get("options") is not None:
            attrs["options"] = check_options(deco_name, attrs["options"])
        for package in attrs.get("packages") or ():
            parse.text(package, what("packages") + " entry", "@%s(packages=['pandas==2.2.3'])" % deco_name)
    except parse.InvalidInputError as err:
        raise refused(err)


def check_resources(deco_name, attrs):
    """cpu/memory/gpu/disk: finite and positive (gpu may be 0), whole MB; strings from `--with` and @resources too."""
    parse = _parse()
    rules = {
        "cpu": dict(integer=False, hint="ask for a number of CPUs, e.g. @%s(cpu=2) or @resources(cpu=2)" % deco_name),
        "memory": dict(integer=True, hint="give megabytes, e.g. @%s(memory=4096) or @resources(memory=4096)" % deco_name),
        "gpu": dict(integer=True, allow_minimum=True, hint="give a whole number of GPUs, e.g. @%s(gpu=1), or remove gpu=" % deco_name),
        "disk": dict(integer=True, hint="give megabytes, e.g. @%s(disk=10240), or remove disk=" % deco_name),
    }
    for key, rule in rules.items():
        value = attrs.get(key)
        if value is None or (value == "" and key in ("gpu", "disk")):
            continue
        parse.number(value, "@%s(%s=...)" % (deco_name, key), **rule)


def check_options(deco_name, options):
    parse = _parse()
    out = {}
    for key, value in options.items():
        what = "@%s(options=...) key" % deco_name
        name = parse.env_name(key, what)
        if SECRET_OPTION.search(name):
            raise parse.InvalidInputError(
                what,
                key,
                "a non-secret option (decorator attributes are saved with the run, in plain text)",
                "set it in the environment or ~/.metaflowconfig instead: METAFLOW_SANDBOX_<BACKEND>_%s" % name.upper(),
            )
        if value is None or isinstance(value, (dict, list, tuple, set)):
            raise parse.InvalidInputError(
                "@%s(options=...)[%r]" % (deco_name, key), value, "a string, number or boolean", "give a plain value"
            )
        out[name] = value
    return out


def check_backend_name(name, what, example):
    if not isinstance(name, str) or not BACKEND_NAME.match(name):
        parse = _parse()
        raise parse.InvalidInputError(
            what,
            name,
            "the name of an installed backend (letters, digits, _ . -)",
            "use e.g. %s; `metaflow-sandbox backends` lists the installed ones" % example,
        )
    return name


def ttl_margin():
    """METAFLOW_SANDBOX_TTL_MARGIN, parsed where used (a bad value never breaks `import metaflow`)."""
    from metaflow import metaflow_config

    raw = getattr(metaflow_config, "SANDBOX_TTL_MARGIN", None)
    if raw is None or raw == "":
        return DEFAULT_TTL_MARGIN
    parse = _parse()
    return parse.seconds(
        raw,
        TTL_MARGIN_ENV,
        minimum=MIN_TTL_MARGIN,
        allow_minimum=True,
        maximum=30 * 86400,
        hint="set %s to at least %d seconds (default %d), or unset it" % (TTL_MARGIN_ENV, MIN_TTL_MARGIN, DEFAULT_TTL_MARGIN),
    )


def forward_env_names(backend=None):
    """METAFLOW_SANDBOX_FORWARD_ENV: valid names, none of them a backend's own secret or setting."""
    from metaflow import metaflow_config

    from .sandbox_task import NEVER_FORWARD_PREFIXES, backend_settings

    parse = _parse()
    names = parse.names(getattr(metaflow_config, "SANDBOX_FORWARD_ENV", "") or "", FORWARD_ENV)
    # Every installed backend's settings, not only the selected one's: a third party's key stays home too.
    backend_vars = set(backend_settings()) | (set(backend.capabilities().config_env) if backend is not None else set())
    for name in names:
        if name.startswith(NEVER_FORWARD_PREFIXES) or name in backend_vars:
            raise parse.InvalidInputError(
                FORWARD_ENV + " entry",
                name,
                "a variable that is not a backend credential or setting (those never enter a sandbox)",
                "remove %s from %s" % (name, FORWARD_ENV),
            )
    return names


def check_settings(backend):
    """The config variables a run depends on, parsed at launch so a typo fails before any task."""
    from metaflow_sandbox.session import default_lease_seconds

    ttl_margin()
    forward_env_names(backend)
    default_lease_seconds()
    if backend.capabilities().shares_host_filesystem:  # only then the launcher's caches are used
        check_cache_dirs()


def check_cache_dirs():
    """METAFLOW_SANDBOX_PIP_CACHE / _CODE_CACHE (local backend): directories the trampolines can create and use."""
    from metaflow import metaflow_config

    for name in ("SANDBOX_PIP_CACHE", "SANDBOX_CODE_CACHE"):
        path = getattr(metaflow_config, name, None)
        if not path:
            continue
        try:
            os.makedirs(path, exist_ok=True)
            usable = os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
        except OSError:
            usable = False
        if not usable:
            parse = _parse()
            raise parse.InvalidInputError(
                "METAFLOW_" + name,
                path,
                "a directory this user can create and write",
                "point METAFLOW_%s at such a directory, or unset it" % name,
            )


def check_requirements_file(deco):
    """`requirements_file=` exists (relative to the flow's directory, where the trampoline reads it)."""
    import sys

    path = deco.attributes.get("requirements_file")
    if not path:
        return
    flow_dir = os.path.dirname(os.path.abspath(sys.argv[0]))
    full = path if os.path.isabs(path) else os.path.join(flow_dir, path)
    if not os.path.isfile(full):
        parse = _parse()
        raise parse.InvalidInputError(
            "@%s(requirements_file=...)" % deco.name,
            path,
            "a file (looked at %s)" % full,
            "give a path relative to the flow's directory (%s), or remove requirements_file=" % flow_dir,
        )


def step_ttl(deco, backend):
    """(ttl, capped): the step's time limit plus the margin, capped at the backend's lifetime when no @timeout asks for more."""
    ttl = float(deco.run_time_limit) + ttl_margin()
    max_ttl = backend.capabilities().max_ttl_seconds
    if max_ttl and ttl > max_ttl and not deco.has_timeout:
        # No @timeout: Metaflow's 5-day default is not a request, so the backend's cap applies.
        # An explicit @timeout above the cap is refused by the backend facade instead.
        return float(max_ttl), True
    return ttl, False


def launch_spec(deco, backend, env=None):
    """The sandbox a task of this step would ask for (no per-task env or labels): what `Backend.validate` checks at launch."""
    from metaflow_sandbox import Resources, SandboxSpec
    from metaflow_sandbox.session import default_lease_seconds

    attrs = deco.attributes

    def number(key, cast):
        value = attrs.get(key)
        return cast(float(value)) if value not in (None, "") else None

    return SandboxSpec(
        image=attrs.get("image"),
        resources=Resources(cpu=number("cpu", float), memory_mb=number("memory", int), gpu=number("gpu", int), disk_mb=number("disk", int)),
        env=dict(env or {}),
        ttl_seconds=step_ttl(deco, backend)[0],
        lease_seconds=default_lease_seconds(),
        network=attrs.get("network", True),
        options=backend.options,
    )


def user_env(deco, node):
    """The step's own variables (decorator env, @environment vars): checked at launch, names and size."""
    parse = _parse()
    env = dict(deco.attributes.get("env") or {})
    for env_deco in [d for d in node.decorators if d.name == "environment"]:
        env.update(parse.environment(env_deco.attributes.get("vars") or {}, "@environment(vars=...)"))
    return parse.environment(env, "@%s(env=...) with @environment(vars=...)" % deco.name)


def checks_off():
    """True where the strict checks neither can nor need to run: inside the sandbox (checked at launch), and
    wherever the core is not installed (a task of another compute backend or a deployed flow, whose code
    package carries this extension but not `metaflow_sandbox`)."""
    global _checks_off
    if _checks_off is None:
        import importlib.util

        from .sandbox_decorator import WORKLOAD_ENV

        # Found, not imported: in the sandbox that import (pluggy, importlib_metadata: ~30 ms) was every task's waste.
        _checks_off = bool(os.environ.get(WORKLOAD_ENV)) or importlib.util.find_spec("metaflow_sandbox") is None
    return _checks_off


_checks_off = None


#: Trampolines append here why a sandbox could not start (a provider refusal such as an unknown template):
#: the launcher then ends the run with that reason, not Metaflow's "Internal error: the terminal step ...".
REFUSALS_ENV = "METAFLOW_SANDBOX_REFUSALS_FILE"
_refusals = None


def refusals_file():
    """The launcher's file (one per run) that trampolines report refusals into."""
    global _refusals
    if _refusals is None:
        import tempfile

        fd, _refusals = tempfile.mkstemp(prefix="metaflow-sandbox-refusals-")
        os.close(fd)
    return _refusals


def note_refusal(step, task_id, backend_name, err):
    """In a trampoline: the sandbox could not be created (no user code ran); tell the launcher why."""
    path = os.environ.get(REFUSALS_ENV)
    if path:
        with open(path, "a") as f:
            f.write("Step *%s* (task %s) could not start its '%s' sandbox: %s\n" % (step, task_id, backend_name, err))


def raise_noted_refusals():
    """In the launcher, at the end of the run: the first refusal, as the run's error."""
    global _refusals
    path, _refusals = _refusals, None
    if not path:
        return
    try:
        with open(path) as f:
            text = f.read()
        os.unlink(path)
    except OSError:
        return
    if text.strip():
        first = text.split("\nStep *")[0].rstrip()
        raise SandboxInputError(first + "\n(The run stopped there: nothing of that task ran, and it was not retried.)")
