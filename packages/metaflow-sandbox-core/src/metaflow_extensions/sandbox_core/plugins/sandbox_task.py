"""What runs inside the sandbox for one task: its environment, its bash command, its spec.

Kept apart from the click wiring so each piece is small and testable. The command has the
@batch shape (metaflow-internals 2.5) minus the log plumbing: code package, pip requirements,
bootstrap, step. Logs are persisted by the trampoline from the live stream (sandbox_logs.py).
"""

import hashlib
import json
import os
import shlex
import sys

from metaflow import metaflow_config as mfconf
from metaflow.metaflow_config_funcs import config_values
from metaflow.mflog import BASH_FLUSH_LOGS, BASH_MFLOG
from metaflow.package import MetaflowPackage

from .sandbox_code_cache import task_template
from .sandbox_decorator import WORKLOAD_ENV, SandboxException

# Datastore credentials forwarded into sandboxes: an explicit allowlist, sent through the
# backend's API (never on a command line). Backend API keys are never forwarded.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_CONNECTION_STRING",
    "GOOGLE_CLOUD_PROJECT",
    "STORAGE_EMULATOR_HOST",
)
# Credentials given as a path to a key file: the trampoline uploads the file into the sandbox
# and points the variable at the copy (a launcher path means nothing in a remote sandbox).
# CA bundles travel the same way: a store behind a private CA (Azurite, MinIO) needs them.
CREDENTIAL_FILE_ENV = ("GOOGLE_APPLICATION_CREDENTIALS", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE")
NEVER_FORWARD_PREFIXES = ("DAYTONA_", "E2B_", "METAFLOW_SANDBOX_DAYTONA_", "METAFLOW_SANDBOX_E2B_")

# Metaflow settings the task needs (the same set @batch/@kubernetes forward).
METAFLOW_SETTINGS = (
    "DEFAULT_METADATA",
    "SERVICE_HEADERS",
    "DATASTORE_SYSROOT_S3",
    "DATATOOLS_S3ROOT",
    "CARD_S3ROOT",
    "DATASTORE_SYSROOT_AZURE",
    "CARD_AZUREROOT",
    "AZURE_STORAGE_BLOB_SERVICE_ENDPOINT",
    "DATASTORE_SYSROOT_GS",
    "CARD_GSROOT",
    "S3_ENDPOINT_URL",
    "S3_VERIFY_CERTIFICATE",
    "S3_SERVER_SIDE_ENCRYPTION",
    "S3_WORKER_COUNT",
    "S3_RETRY_COUNT",
    "S3_TRANSIENT_RETRY_COUNT",
    "DEFAULT_SECRETS_BACKEND_TYPE",
    "AWS_SECRETS_MANAGER_DEFAULT_REGION",
    "DEFAULT_AWS_CLIENT_PROVIDER",
    "DEFAULT_GCP_CLIENT_PROVIDER",
    "OTEL_ENDPOINT",
    "OTEL_SERVICE_NAME",
)


def _setting(name):
    value = getattr(mfconf, name, None)
    if value is None or value == "" or value == {}:
        return None
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


_backend_settings = None


def backend_settings():
    """Every installed backend's ``config_env`` (its API keys and URLs): never forwarded, whoever asks.

    Read from each backend's capabilities, so a third party's ``ACME_API_KEY`` is as safe as ours.
    """
    global _backend_settings
    if _backend_settings is None:
        from metaflow_sandbox import Backend, available_backends

        names = set()
        for name in available_backends():
            try:
                names.update(Backend(name).capabilities().config_env)
            except Exception:  # a broken backend cannot be selected either; `backends` reports it
                continue
        _backend_settings = frozenset(names)
    return _backend_settings


def preset_backend_settings(names):
    """The launcher's answer, for the run's sandbox server: it need not load every backend again (~50 ms)."""
    global _backend_settings
    _backend_settings = frozenset(n for n in names if n)


def forwarded_env(extra_names=""):
    """Credentials and chosen variables from the launcher's environment (allowlist only)."""
    names = list(CREDENTIAL_ENV) + [n.strip() for n in (extra_names or "").split(",") if n.strip()]
    secret = backend_settings()
    return {
        name: os.environ[name]
        for name in names
        if name in os.environ and not name.startswith(NEVER_FORWARD_PREFIXES) and name not in secret
    }


def task_env(ctx_obj, deco, run_id, datastore_type, code, user, backend_name):
    """The sandbox's environment for one task. Travels through the backend API, never argv."""
    env = {
        "METAFLOW_FLOW_FILENAME": os.path.basename(sys.argv[0]),
        "METAFLOW_RUN_ID": str(run_id),
        "METAFLOW_CODE_METADATA": code["metadata"],
        "METAFLOW_CODE_SHA": code["sha"],
        "METAFLOW_CODE_URL": code["url"],
        "METAFLOW_CODE_DS": datastore_type,
        "METAFLOW_USER": user,
        "METAFLOW_DEFAULT_DATASTORE": datastore_type,
        "METAFLOW_RUNTIME_ENVIRONMENT": "sandbox",
        "METAFLOW_SANDBOX_BACKEND_NAME": backend_name,
        WORKLOAD_ENV: "1",
    }
    if getattr(mfconf, "SERVICE_INTERNAL_URL", None):
        env["METAFLOW_SERVICE_URL"] = mfconf.SERVICE_INTERNAL_URL
    for name in METAFLOW_SETTINGS:
        value = _setting(name)
        if value is not None:
            env["METAFLOW_" + name] = value
    for name, value in config_values():
        if name.startswith(("METAFLOW_CONDA_", "METAFLOW_DEBUG_")):
            env[name] = value
    if os.environ.get("METAFLOW_SKIP_INSTALL_DEPENDENCIES"):
        env["METAFLOW_SKIP_INSTALL_DEPENDENCIES"] = os.environ["METAFLOW_SKIP_INSTALL_DEPENDENCIES"]
    env.update(forwarded_env(getattr(mfconf, "SANDBOX_FORWARD_ENV", "")))
    env.update({k: str(v) for k, v in (deco.attributes.get("env") or {}).items()})
    node = ctx_obj.graph[deco.step]
    for env_deco in [d for d in node.decorators if d.name == "environment"]:
        env.update({k: str(v) for k, v in env_deco.attributes["vars"].items()})
    return env


def requirements(deco, flow_dir):
    """pip requirement lines from `packages=` and `requirements_file=` (read on the launcher)."""
    lines = list(deco.attributes.get("packages") or [])
    path = deco.attributes.get("requirements_file")
    if path:
        full = path if os.path.isabs(path) else os.path.join(flow_dir, path)
        if not os.path.isfile(full):
            raise SandboxException(
                "@%s(requirements_file=%r): no such file (looked at %s). Give a path relative to the flow's directory."
                % (deco.name, path, full)
            )
        with open(full) as f:
            lines += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return lines


def pip_install_commands(reqs, cache_dir):
    """Install `reqs` into a target dir appended to PYTHONPATH; uv when present, else pip.

    With a cache dir (local backend) the target is content-addressed and reused across tasks.
    """
    if not reqs:
        return []
    key = hashlib.sha256(("\n".join(sorted(reqs)) + sys.version).encode()).hexdigest()[:16]
    base = cache_dir or "$HOME/.mf_sandbox_pip"
    target = "%s/%s" % (base, key)
    req_args = " ".join(shlex.quote(r) for r in reqs)
    # A unique temp dir per task: `$$` is the same (2) in every sandbox's own pid namespace.
    install = (
        "if command -v uv >/dev/null 2>&1; then uv pip install -q --python \\\"$(command -v python)\\\" --target $TT %s; "
        "else python -m pip install -q --disable-pip-version-check --no-input --target $TT %s; fi"
    ) % (req_args, req_args)
    return [
        "T=%s" % target,
        "mflog 'Installing %d pip requirement(s) in the sandbox...'" % len(reqs),
        "if [ ! -f $T/.complete ]; then mkdir -p %s && TT=$(mktemp -d $T.tmp.XXXXXXXX) && chmod 755 $TT && %s && touch $TT/.complete && "
        "(mv -T $TT $T 2>/dev/null || rm -rf $TT); fi" % (base, install),
        "export PYTHONPATH=$(printenv PYTHONPATH):$T",
    ]


# Inside the sandbox, `mflog` only prints: the trampoline receives every line live and persists
# the task's logs itself, so no tee, save_logs or sidecar process runs per task.
ECHO_MFLOG = "mflog(){ echo $1; }"
NO_FLUSH = "flush_mflogs(){ :; }"


def local_package_commands(package_dir, code_metadata, datastore_root):
    """Code setup for sandboxes that share the launcher's files (the `local` backend).

    `package_dir` is the package extracted and compiled once (sandbox_code_cache.py): the task
    gets a private copy of the user's files and a link to the read-only, precompiled Metaflow,
    with one `cp` of the package's task template. With the local datastore, `.metaflow` links
    to its root (metaflow-internals 4.3).
    """
    # One cp, and $PWD / ${VAR} instead of $(pwd) / $(printenv VAR): every process the setup
    # spawns costs a task a few milliseconds (docs/performance.md).
    template = task_template(package_dir, datastore_root)
    cmds = ["mflog 'Setting up task environment.'", "cp -aT %s metaflow" % shlex.quote(template), "cd metaflow"]
    if datastore_root:
        cmds.append("export METAFLOW_DATASTORE_SYSROOT_LOCAL=%s" % shlex.quote(os.path.dirname(datastore_root)))
    for key, value in MetaflowPackage.get_post_extract_env_vars(code_metadata, dest_dir="$PWD").items():
        if key.endswith(":"):
            cmds.append("export %s=%s" % (key[:-1], value))
        else:
            cmds.append("export %s=%s:${%s}" % (key, value, key))
    return cmds


# The trampoline seeds these records into a remote sandbox (sandbox_cli._seed_local_metadata).
# Dated to the epoch, they never travel back: Metaflow's sync copies only files newer than the
# launcher's, and many tasks rewriting the same run-level file at once race with its readers.
AGE_SEEDED_METADATA = "find .metaflow -name _self.json -exec touch -d @0 {} +"


def task_command(environment, step_name, step_cli, code, datastore_type, datastore_root, pip_cmds, package_dir=None, seeded=False):
    """argv for the sandbox: bash -c "<code package> && <pip> && <bootstrap> && <step>"."""
    if package_dir:
        init_cmds = local_package_commands(package_dir, code["metadata"], datastore_root if datastore_type == "local" else None)
    else:
        init_cmds = environment.get_package_commands(code["url"], datastore_type, code["metadata"])
        # The trampoline may have seeded metaflow/.metaflow (local metadata) before this runs.
        mkdir_p = {"mkdir metaflow": "mkdir -p metaflow", "mkdir .metaflow": "mkdir -p .metaflow"}
        init_cmds = [mkdir_p.get(c, c) for c in init_cmds if c not in (BASH_MFLOG, BASH_FLUSH_LOGS)]
    cmds = [ECHO_MFLOG, NO_FLUSH] + init_cmds + ([AGE_SEEDED_METADATA] if seeded else [])
    cmds += pip_cmds + environment.bootstrap_commands(step_name, datastore_type) + [step_cli]
    # get_package_commands' quoting assumes exactly this shlex pass (as in @batch).
    return shlex.split('bash -c "true && %s"' % " && ".join(cmds))
