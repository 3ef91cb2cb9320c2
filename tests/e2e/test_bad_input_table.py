"""Every bad input, one table: refused early, with the error's text and its Fix line, no traceback, nothing left.

Each row runs the real thing: the `metaflow-sandbox` CLI (exit code 2), or `python flow.py run` with the
attributes given through `--with` or as Python values (flows/attrs_flow.py reads SANDBOX_ATTRS). A flow row
must fail at launch: before "Workflow starting", so no task, no upload, no sandbox. After every row the
`local` backend's sandbox root is empty, no mfsb- cgroup was left and no bwrap process runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from .conftest import FLOWS, PYTHON, S3_KEY, S3_SECRET, base_env, local_leftovers, s3_env

CLI = os.path.join(os.path.dirname(PYTHON), "metaflow-sandbox")
BIG = "x" * 100_000  # one env value of 100 kB: six of them are more than any sandbox accepts


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # ("cli", ...) for metaflow-sandbox; ("plain_flow.py", "run", ...) for a flow
    says: tuple[str, ...]  # fragments of the error message
    fix: str  # a fragment of its "Fix:" line
    env: dict = field(default_factory=dict)
    attrs: Optional[str] = None  # SANDBOX_ATTRS for attrs_flow.py: a Python expression
    code: Optional[int] = None  # default: 2 for the CLI, 1 for a flow
    emulator: Optional[str] = None  # "e2b" / "daytona": the provider emulator whose env the row runs with
    s3: bool = False  # a flow row on the S3 datastore: nothing may be uploaded either


def cli(id, *args, says, fix, env=None):
    return Case(id, ("cli", *args), tuple(says), fix, env or {})


def exec_(id, *opts, says, fix, env=None, command=("true",)):
    return cli(id, "exec", "--backend", "local", *opts, "--", *command, says=says, fix=fix, env=env)


def with_(id, spec, *more, says, fix, env=None):
    extra = []
    for m in more:
        extra += ["--with", m]
    return Case(id, ("plain_flow.py", "run", "--with", spec, *extra), tuple(says), fix, env or {})


def attrs(id, expr, says, fix, env=None):
    return Case(id, ("attrs_flow.py", "run"), tuple(says), fix, env or {}, attrs=expr)


def config(id, env, says, fix):
    return Case(id, ("attrs_flow.py", "run"), tuple(says), fix, env)


def provider(id, emulator, *opts, says, fix, env=None):
    """`metaflow-sandbox exec` against a provider emulator, through the real SDK."""
    args = ("cli", "exec", "--backend", emulator, *opts, "--", "true")
    return Case(id, args, tuple(says), fix, env or {}, emulator=emulator)


def cloud_flow(id, emulator, *withs, says, fix, env=None, s3=True):
    """A flow on a cloud backend (S3 datastore unless s3=False): refused at launch, before any upload."""
    argv = ["plain_flow.py", "run"]
    for w in withs:
        argv += ["--with", w]
    full_env = {"METAFLOW_SANDBOX_BACKEND": emulator, **(env or {})}
    return Case(id, tuple(argv), tuple(says), fix, full_env, emulator=emulator, s3=s3)


NUMBER = "must be a finite number greater than 0"
WHOLE = "must be a whole number greater than 0"
DURATION = "must be a duration in seconds"

CASES = [
    # --- the CLI: exec options --------------------------------------------------------------
    exec_("timeout-inf", "--timeout", "inf", says=["--timeout", DURATION, "'inf'"], fix="e.g. --timeout 600"),
    exec_("timeout-nan", "--timeout", "nan", says=["--timeout", DURATION, "'nan'"], fix="e.g. --timeout 600"),
    exec_("timeout-negative", "--timeout", "-1", says=["--timeout", DURATION, "'-1'"], fix="e.g. --timeout 600"),
    exec_("timeout-zero", "--timeout", "0", says=["--timeout", DURATION], fix="e.g. --timeout 600"),
    exec_("timeout-word", "--timeout", "soon", says=["--timeout", DURATION, "'soon'"], fix="e.g. --timeout 600"),
    exec_("timeout-overflow", "--timeout", "1e400", says=["--timeout", DURATION], fix="e.g. --timeout 600"),
    exec_("timeout-too-long", "--timeout", "400d", says=["--timeout", "at most 2592000"], fix="e.g. --timeout 600"),
    exec_("ttl-zero", "--ttl", "0", says=["--ttl", DURATION], fix="e.g. --ttl 600"),
    exec_(
        "ttl-below-timeout",
        "--ttl",
        "5",
        "--timeout",
        "10",
        says=["--ttl must be at least --timeout (10s)"],
        fix="raise --ttl or lower --timeout",
    ),
    exec_("cpu-negative", "--cpu", "-1", says=["--cpu", NUMBER, "'-1'"], fix="e.g. --cpu 2"),
    exec_("cpu-zero", "--cpu", "0", says=["--cpu", NUMBER], fix="e.g. --cpu 2"),
    exec_("cpu-nan", "--cpu", "nan", says=["--cpu", NUMBER], fix="e.g. --cpu 2"),
    exec_("cpu-above-machine", "--cpu", "100000", says=["backend 'local' offers at most", "cpu=100000"], fix="lower cpu="),
    exec_("memory-negative", "--memory", "-5", says=["--memory", WHOLE, "'-5'"], fix="e.g. --memory 2048"),
    exec_("memory-fraction", "--memory", "1.5", says=["--memory", WHOLE], fix="e.g. --memory 2048"),
    exec_("memory-hex", "--memory", "0x10", says=["--memory", WHOLE], fix="e.g. --memory 2048"),
    exec_("memory-above-machine", "--memory", "999999999", says=["offers at most", "MB of memory"], fix="lower memory="),
    exec_(
        "label-marker",
        "--label",
        "metaflow-sandbox=0",
        says=["--label key", "'metaflow-sandbox'", "hide the sandbox"],
        fix="a key of your own",
    ),
    exec_("label-metaflow-run", "--label", "metaflow.run=1", says=["--label key", "'metaflow.run'"], fix="a key of your own"),
    exec_(
        "label-marker-child",
        "--label",
        "metaflow-sandbox.source=me",
        says=["--label key", "set by metaflow-sandbox itself"],
        fix="a key of your own",
    ),
    exec_("label-key-space", "--label", "my team=ml", says=["--label key", "'my team'"], fix="e.g. team=ml"),
    exec_("label-no-value", "--label", "team", says=["--label must be KEY=VALUE", "'team'"], fix="--label NAME=value"),
    exec_("env-name-space", "--env", "A B=1", says=["--env name", "'A B'"], fix="rename the variable"),
    exec_("env-name-digit", "--env", "1A=1", says=["--env name", "'1A'"], fix="rename the variable"),
    exec_("env-no-name", "--env", "=x", says=["--env must be KEY=VALUE"], fix="--env NAME=value"),
    exec_("env-no-equals", "--env", "JUSTANAME", says=["--env must be KEY=VALUE"], fix="--env NAME=value"),
    exec_(
        "env-too-large",
        *[a for i in range(6) for a in ("--env", "V%d=%s" % (i, BIG))],
        says=["--env must be at most 512 KiB"],
        fix="pass large data another way",
    ),
    exec_("option-no-key", "--option", "=x", says=["--option must be KEY=VALUE"], fix="--option NAME=value"),
    exec_("option-key-space", "--option", "my opt=1", says=["--option key", "'my opt'"], fix="rename"),
    exec_("bind-missing-source", "--bind", "/no/such/dir", says=["--bind", "/no/such/dir does not"], fix="--bind SRC[:DST][:ro]"),
    exec_("bind-relative-target", "--bind", "/tmp:relative", says=["--bind", "absolute destination"], fix="--bind SRC[:DST][:ro]"),
    exec_(
        "cwd-missing",
        "--memory",
        "256",
        "--cwd",
        "/no/such/dir",
        says=["--cwd", "a directory that exists in the sandbox"],
        fix="drop --cwd",
    ),
    exec_(
        "cwd-relative-missing",
        "--memory",
        "256",
        "--cwd",
        "nowhere",
        says=["--cwd", "relative paths start at its work dir"],
        fix="drop --cwd",
    ),
    exec_("image-empty", "--image", "", says=["--image must be a non-empty string"], fix="--image python:3.12"),
    exec_("image-on-local", "--image", "python:3.12", says=["backend 'local' does not support choosing an image"], fix="remove image="),
    exec_(
        "ttl-expires",
        "--memory",
        "256",
        "--ttl",
        "1",
        says=["went away while the command ran", "ttl of 1.0s expired"],
        fix="raise ttl_seconds",
        command=("sleep", "30"),
    ),
    cli("backend-unknown", "exec", "--backend", "nope", "--", "true", says=["No sandbox backend named 'nope'"], fix="pick one of"),
    cli("backend-empty", "exec", "--backend", "", "--", "true", says=["--backend must be a non-empty string"], fix="--backend local"),
    cli("exec-no-command", "exec", "--backend", "local", says=["exec needs a command to run"], fix="put it after --"),
    cli(
        "exec-unknown-option",
        "exec",
        "--backend",
        "local",
        "--cpus",
        "2",
        "--",
        "true",
        says=["unrecognized arguments: --cpus"],
        fix="--help",
    ),
    cli("kill-without-backend", "kill", says=["required: --backend"], fix="metaflow-sandbox kill --help"),
    cli("no-subcommand", says=["required: cmd"], fix="metaflow-sandbox --help"),
    cli("list-unknown-backend", "list", "--backend", "nope", says=["No sandbox backend named 'nope'"], fix="pick one of"),
    cli("list-bad-label", "list", "--label", "=x", says=["--label must be KEY=VALUE"], fix="--label NAME=value"),
    exec_("lease-word", env={"METAFLOW_SANDBOX_LEASE_SECONDS": "abc"}, says=["METAFLOW_SANDBOX_LEASE_SECONDS='abc'"], fix="e.g. 300"),
    exec_(
        "lease-too-short",
        env={"METAFLOW_SANDBOX_LEASE_SECONDS": "5"},
        says=["METAFLOW_SANDBOX_LEASE_SECONDS='5'", "between 60"],
        fix="e.g. 300",
    ),
    # --- decorator attributes, through --with (strings) ---------------------------------------
    with_(
        "with-network-maybe", "sandbox:network=maybe", says=["@sandbox(network=...) must be true or false", "'maybe'"], fix="network=False"
    ),
    with_("with-network-2", "sandbox:network=2", says=["@sandbox(network=...) must be true or false"], fix="network=False"),
    with_(
        "with-prepare-maybe", "sandbox:prepare=maybe", says=["@sandbox(prepare=...) must be true or false", "'maybe'"], fix="prepare=False"
    ),
    config(
        "prepare-env-maybe",
        {"METAFLOW_SANDBOX_PREPARE": "maybe"},
        says=["METAFLOW_SANDBOX_PREPARE must be true or false"],
        fix="METAFLOW_SANDBOX_PREPARE=0",
    ),
    with_("with-cpu-negative", "sandbox:cpu=-1", says=["@sandbox(cpu=...)", NUMBER], fix="@sandbox(cpu=2)"),
    with_("with-cpu-zero", "sandbox:cpu=0", says=["@sandbox(cpu=...)", NUMBER], fix="@sandbox(cpu=2)"),
    with_("with-cpu-word", "sandbox:cpu=many", says=["@sandbox(cpu=...)", "'many'"], fix="@sandbox(cpu=2)"),
    with_("with-memory-inf", "sandbox:memory=inf", says=["@sandbox(memory=...)", WHOLE], fix="@sandbox(memory=4096)"),
    with_("with-memory-fraction", "sandbox:memory=1.5", says=["@sandbox(memory=...)", WHOLE], fix="@sandbox(memory=4096)"),
    with_("with-gpu-negative", "sandbox:gpu=-1", says=["@sandbox(gpu=...)", "at least 0"], fix="@sandbox(gpu=1)"),
    with_("with-disk-negative", "sandbox:disk=-1", says=["@sandbox(disk=...)", WHOLE], fix="@sandbox(disk=10240)"),
    with_("with-gpu-on-local", "sandbox:gpu=1", says=["Step end:", "backend 'local' has no GPUs"], fix="remove gpu="),
    with_(
        "with-image-on-local", "sandbox:image=python:3.12", says=["backend 'local' does not support choosing an image"], fix="remove image="
    ),
    with_("with-cpu-above-machine", "sandbox:cpu=100000", says=["backend 'local' offers at most"], fix="lower cpu="),
    with_("with-memory-above-machine", "sandbox:memory=999999999", says=["MB of memory"], fix="lower memory="),
    with_(
        "with-env-not-json", "sandbox:env=nope", says=["@sandbox(env=...) must be a dict (JSON through --with)"], fix="--with 'sandbox:env="
    ),
    with_("with-env-bad-name", 'sandbox:env={"A=B": "1"}', says=["@sandbox(env=...) name", "'A=B'"], fix="rename the variable"),
    with_(
        "with-options-secret",
        'sandbox:options={"api_key": "k"}',
        says=["@sandbox(options=...) key", "'api_key'", "non-secret"],
        fix="METAFLOW_SANDBOX_<BACKEND>_API_KEY",
    ),
    with_("with-backend-typo", "sandbox:backend=loca l", says=["@sandbox(backend=...)", "'loca l'"], fix="metaflow-sandbox backends"),
    with_("with-backend-unknown", "sandbox:backend=nope", says=["No sandbox backend named 'nope'"], fix="pick one of"),
    with_(
        "with-daytona-other-backend",
        "daytona:backend=local",
        says=["@daytona always runs on backend 'daytona'"],
        fix="use @sandbox(backend='local') instead",
    ),
    with_("with-resources-negative", "sandbox", "resources:cpu=-2", says=["@sandbox(cpu=...)", NUMBER], fix="@resources(cpu=2)"),
    with_(
        "with-environment-bad-name",
        "sandbox",
        'environment:vars={"A B": "1"}',
        says=["Step end:", "@environment(vars=...) name", "'A B'"],
        fix="rename the variable",
    ),
    # --- decorator attributes, as Python values ---------------------------------------------
    attrs("py-network-word", "dict(network='maybe')", says=["@sandbox(network=...) must be true or false"], fix="network=False"),
    attrs("py-network-list", "dict(network=[])", says=["@sandbox(network=...) must be true or false"], fix="network=False"),
    attrs("py-cpu-nan", "dict(cpu=float('nan'))", says=["@sandbox(cpu=...)", NUMBER], fix="@sandbox(cpu=2)"),
    attrs("py-cpu-bool", "dict(cpu=True)", says=["@sandbox(cpu=...)", NUMBER], fix="@sandbox(cpu=2)"),
    attrs("py-memory-str", "dict(memory='4GB')", says=["@sandbox(memory=...)", "'4GB'"], fix="@sandbox(memory=4096)"),
    attrs("py-gpu-fraction", "dict(gpu=0.5)", says=["@sandbox(gpu=...)", "whole number"], fix="@sandbox(gpu=1)"),
    attrs("py-env-bad-name", "dict(env={'A=B': 'x'})", says=["@sandbox(env=...) name", "'A=B'"], fix="rename the variable"),
    attrs("py-env-digit-name", "dict(env={'1X': 'x'})", says=["@sandbox(env=...) name", "'1X'"], fix="rename the variable"),
    attrs("py-env-nul", "dict(env={'A': 'a\\0b'})", says=["@sandbox(env=...)['A']", "without NUL"], fix="remove the NUL"),
    attrs("py-env-none", "dict(env={'A': None})", says=["@sandbox(env=...)['A']", "a string or a number"], fix="convert the value"),
    attrs(
        "py-env-entry-too-large",
        "dict(env={'A': 'x' * 200000})",
        says=["@sandbox(env=...)['A']", "at most 127 KiB"],
        fix="pass large data another way",
    ),
    attrs(
        "py-env-too-large",
        "dict(env={'V%d' % i: 'x' * 100000 for i in range(6)})",
        says=["@sandbox(env=...) must be at most 512 KiB"],
        fix="pass large data another way",
    ),
    attrs("py-env-list", "dict(env=['A=1'])", says=["@sandbox(env=...) must be a dict"], fix="{'MY_SETTING': 'x'}"),
    attrs(
        "py-options-token",
        "dict(options={'auth_token': 't'})",
        says=["@sandbox(options=...) key", "'auth_token'"],
        fix="METAFLOW_SANDBOX_<BACKEND>_AUTH_TOKEN",
    ),
    attrs(
        "py-options-nested",
        "dict(options={'snapshot': {'a': 1}})",
        says=["@sandbox(options=...)['snapshot']", "a string, number or boolean"],
        fix="a plain value",
    ),
    attrs(
        "py-packages-not-list",
        "dict(packages=5)",
        says=["@sandbox(packages=...) must be a list of pip requirements, not 5"],
        fix="packages=['pandas==2.2.3']",
    ),
    attrs(
        "py-packages-empty",
        "dict(packages=[''])",
        says=["@sandbox(packages=...) entry must be a non-empty string"],
        fix="packages=['pandas==2.2.3']",
    ),
    attrs(
        "py-requirements-missing",
        "dict(requirements_file='no-such-requirements.txt')",
        says=["@sandbox(requirements_file=...) must be a file", "no-such-requirements.txt"],
        fix="relative to the flow's directory",
    ),
    attrs("py-image-number", "dict(image=3)", says=["@sandbox(image=...) must be a non-empty string"], fix="image='python:3.12-slim'"),
    attrs(
        "py-executable-empty",
        "dict(executable='')",
        says=["@sandbox(executable=...) must be a non-empty string"],
        fix="executable='python3'",
    ),
    # --- config variables ----------------------------------------------------------------------
    config(
        "ttl-margin-word",
        {"METAFLOW_SANDBOX_TTL_MARGIN": "abc"},
        says=["METAFLOW_SANDBOX_TTL_MARGIN", DURATION, "'abc'"],
        fix="at least 60 seconds",
    ),
    config(
        "ttl-margin-negative",
        {"METAFLOW_SANDBOX_TTL_MARGIN": "-100000"},
        says=["METAFLOW_SANDBOX_TTL_MARGIN", "'-100000'"],
        fix="at least 60 seconds",
    ),
    config(
        "ttl-margin-too-small",
        {"METAFLOW_SANDBOX_TTL_MARGIN": "10"},
        says=["METAFLOW_SANDBOX_TTL_MARGIN", "of at least 60"],
        fix="at least 60 seconds",
    ),
    config(
        "backend-setting-empty",
        {"METAFLOW_SANDBOX_BACKEND": ""},
        says=["METAFLOW_SANDBOX_BACKEND must be the name of an installed backend"],
        fix="METAFLOW_SANDBOX_BACKEND=local",
    ),
    config(
        "backend-setting-space",
        {"METAFLOW_SANDBOX_BACKEND": "local "},
        says=["METAFLOW_SANDBOX_BACKEND", "'local '"],
        fix="METAFLOW_SANDBOX_BACKEND=local",
    ),
    config("backend-setting-unknown", {"METAFLOW_SANDBOX_BACKEND": "nope"}, says=["No sandbox backend named 'nope'"], fix="pick one of"),
    config(
        "forward-env-bad-name",
        {"METAFLOW_SANDBOX_FORWARD_ENV": "GOOD,NOT GOOD"},
        says=["METAFLOW_SANDBOX_FORWARD_ENV entry", "'NOT GOOD'"],
        fix="rename the variable",
    ),
    config(
        "forward-env-secret",
        {"METAFLOW_SANDBOX_FORWARD_ENV": "DAYTONA_API_KEY"},
        says=["METAFLOW_SANDBOX_FORWARD_ENV entry", "'DAYTONA_API_KEY'", "backend credential"],
        fix="remove DAYTONA_API_KEY",
    ),
    config(
        "forward-env-backend-setting",
        {"METAFLOW_SANDBOX_FORWARD_ENV": "METAFLOW_SANDBOX_LOCAL_ROOT"},
        says=["'METAFLOW_SANDBOX_LOCAL_ROOT'", "backend credential or setting"],
        fix="remove METAFLOW_SANDBOX_LOCAL_ROOT",
    ),
    config(
        "pip-cache-is-a-file",
        {"METAFLOW_SANDBOX_PIP_CACHE": "/etc/hostname"},
        says=["METAFLOW_SANDBOX_PIP_CACHE must be a directory this user can create and write"],
        fix="point METAFLOW_SANDBOX_PIP_CACHE",
    ),
    config("lease-nan", {"METAFLOW_SANDBOX_LEASE_SECONDS": "nan"}, says=["METAFLOW_SANDBOX_LEASE_SECONDS='nan'"], fix="e.g. 300"),
    exec_(
        "local-isolation-word",
        env={"METAFLOW_SANDBOX_LOCAL_ISOLATION": "maybe"},
        says=["option isolation='maybe'"],
        fix="METAFLOW_SANDBOX_LOCAL_ISOLATION",
    ),
    exec_("local-pids-limit-zero", "--option", "pids_limit=0", says=["option pids_limit='0'"], fix="METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"),
    config(
        "local-memory-limiter",
        {"METAFLOW_SANDBOX_LOCAL_MEMORY_LIMITER": "bogus"},
        says=["option memory_limiter='bogus'"],
        fix="one of auto, cgroup, rlimit",
    ),
    config(
        "local-pids-limit-word",
        {"METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT": "abc"},
        says=["option pids_limit='abc'"],
        fix="METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT",
    ),
    config(
        "local-disk-negative", {"METAFLOW_SANDBOX_LOCAL_DISK_MB": "-1"}, says=["option disk_mb='-1'"], fix="METAFLOW_SANDBOX_LOCAL_DISK_MB"
    ),
    config(
        "local-isolation-word-flow",
        {"METAFLOW_SANDBOX_LOCAL_ISOLATION": "maybe"},
        says=["option isolation='maybe'"],
        fix="METAFLOW_SANDBOX_LOCAL_ISOLATION",
    ),
    # --- provider answers and provider limits (real SDKs against the emulators) ---------------
    provider(
        "e2b-wrong-url",
        "e2b",
        env={"E2B_API_URL": "http://127.0.0.1:9"},
        says=["cannot reach E2B at http://127.0.0.1:9"],
        fix="check E2B_API_URL",
    ),
    provider("e2b-wrong-key", "e2b", env={"E2B_API_KEY": "e2b_wrong"}, says=["rejected the credentials"], fix="check E2B_API_KEY"),
    provider(
        "e2b-no-key", "e2b", env={"E2B_API_KEY": ""}, says=["needs an API key, and E2B_API_KEY is not set"], fix="export E2B_API_KEY="
    ),
    provider("e2b-unknown-template", "e2b", "--option", "template=no-such", says=["E2B template not found"], fix="templates build"),
    provider("e2b-non-utf8-env", "e2b", "--env", "A=\udcff", says=["environment variable A is not valid UTF-8"], fix="base64-encode it"),
    Case(
        "e2b-non-utf8-argv",
        ("cli", "exec", "--backend", "e2b", "--", "echo", "\udcff"),
        ("argument 1 of the command is not valid UTF-8",),
        "base64-encode it",
        emulator="e2b",
    ),
    provider("e2b-unknown-plan", "e2b", "--option", "plan=gold", says=["unknown E2B plan 'gold'"], fix="one of hobby, pro"),
    provider("e2b-cpu-above-plan", "e2b", "--cpu", "64", says=["backend 'e2b' offers at most 8.0 CPUs"], fix="lower cpu="),
    provider("e2b-ttl-above-plan", "e2b", "--ttl", "2d", says=["keeps a sandbox alive at most 3600s"], fix="longer sandbox lifetime"),
    provider(
        "daytona-wrong-url",
        "daytona",
        env={"DAYTONA_API_URL": "http://127.0.0.1:9/api", "METAFLOW_SANDBOX_DAYTONA_RETRY_ATTEMPTS": "1"},
        says=["could not reach Daytona at http://127.0.0.1:9/api"],
        fix="check DAYTONA_API_URL",
    ),
    provider(
        "daytona-wrong-key", "daytona", env={"DAYTONA_API_KEY": "wrong"}, says=["rejected the API key (401)"], fix="check DAYTONA_API_KEY"
    ),
    provider("daytona-no-key", "daytona", env={"DAYTONA_API_KEY": ""}, says=["DAYTONA_API_KEY is not set"], fix="export DAYTONA_API_KEY="),
    provider(
        "daytona-unknown-snapshot", "daytona", "--option", "snapshot=no-such", says=["snapshot 'no-such'"], fix="set an existing snapshot"
    ),
    provider("daytona-cpu-above-cap", "daytona", "--cpu", "1000", says=["backend 'daytona' offers at most"], fix="lower cpu="),
    cloud_flow("e2b-flow-cpu-above-plan", "e2b", "e2b:cpu=64", says=["Step end: backend 'e2b' offers at most 8.0 CPUs"], fix="lower cpu="),
    cloud_flow(
        "e2b-flow-timeout-above-plan", "e2b", "e2b", "timeout:hours=2", says=["keeps a sandbox alive at most 3600s"], fix="lower @timeout"
    ),
    cloud_flow(
        "e2b-flow-unknown-plan",
        "e2b",
        "e2b",
        env={"METAFLOW_SANDBOX_E2B_PLAN": "gold"},
        says=["unknown E2B plan 'gold'"],
        fix="one of hobby, pro",
    ),
    cloud_flow("e2b-flow-no-key", "e2b", "e2b", env={"E2B_API_KEY": ""}, says=["E2B_API_KEY is not set"], fix="export E2B_API_KEY="),
    cloud_flow("e2b-flow-local-datastore", "e2b", "e2b", s3=False, says=["cannot see this machine's files"], fix="run with --datastore=s3"),
    cloud_flow("daytona-flow-memory-above-cap", "daytona", "daytona:memory=1000000", says=["MB of memory"], fix="lower memory="),
    cloud_flow(
        "daytona-flow-forward-key",
        "daytona",
        "daytona",
        env={"METAFLOW_SANDBOX_FORWARD_ENV": "DAYTONA_API_KEY"},
        says=["'DAYTONA_API_KEY'"],
        fix="remove DAYTONA_API_KEY",
    ),
]


def _cgroups() -> set[str]:
    """mfsb- cgroups under the parents the local backend uses."""
    from metaflow_sandbox.backends._local import limits

    found = set()
    for kind in ("memory", "pids"):
        parent = limits.cgroup_parent(kind)
        if parent:
            found |= {str(p) for p in Path(parent[1]).glob("mfsb-*")}
    return found


def _owned_by(cgroup: str, pid: int) -> bool:
    """The local backend names a sandbox's cgroups mfsb-<pid namespace>-<creating pid>-<id>."""
    match = re.match(r"mfsb-\d+-(\d+)-", os.path.basename(cgroup))
    return bool(match) and int(match.group(1)) == pid


def _run(case: Case, tmp: Path, root: Path, extra: dict) -> subprocess.CompletedProcess:
    env = base_env(tmp)
    env["METAFLOW_SANDBOX_LOCAL_ROOT"] = str(root)
    env["METAFLOW_SANDBOX_BACKEND"] = "local"
    env.update(extra)
    if case.attrs is not None:
        env["SANDBOX_ATTRS"] = case.attrs
    env.update(case.env)
    if case.argv[0] == "cli":
        argv = [CLI, *case.argv[1:]]
    else:
        argv = [PYTHON, str(FLOWS / case.argv[0]), "--no-pylint", *case.argv[1:]]
    proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return subprocess.CompletedProcess([proc.pid], proc.returncode, out, err)  # args: the pid, for _owned_by


@pytest.fixture
def sandbox_root():
    """The local backend's sandbox root, where the sandboxes' unprivileged users can reach it (not under pytest's 0700 tmp)."""
    parent = Path(tempfile.mkdtemp(prefix="mfsb-bad-input-", dir="/var/tmp"))
    parent.chmod(0o711)
    yield parent / "root"
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, sandbox_root: Path, request) -> None:
    extra: dict = {}
    emulator = request.getfixturevalue("%s_emulator" % case.emulator) if case.emulator else None
    if emulator is not None:
        extra.update(emulator.env)
    if case.s3:
        s3 = request.getfixturevalue("s3_server")
        extra.update(s3_env(s3, "bad-input-%s" % tmp_path.name))
    before = _cgroups()
    proc = _run(case, tmp_path, sandbox_root, extra)
    out = proc.stdout + proc.stderr
    flat = " ".join(out.split())
    is_flow = case.argv[0] != "cli"
    expected_code = case.code if case.code is not None else (1 if is_flow else 2)
    assert proc.returncode == expected_code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for fragment in case.says:
        assert " ".join(fragment.split()) in flat, "missing %r in:\n%s" % (fragment, out[-3000:])
    assert "Fix:" in out and case.fix in flat, "missing the Fix line %r in:\n%s" % (case.fix, out[-3000:])
    if is_flow:  # refused at launch: no task ran, nothing was uploaded
        assert "Workflow starting" not in out and "Task is starting" not in out, out[-3000:]
    root = sandbox_root
    assert not root.exists() or not any(root.iterdir()), "sandbox directories left: %s" % list(root.iterdir())
    assert local_leftovers(tmp_path) == [] and local_leftovers(root.parent) == []
    # A CLI row creates its sandbox in the CLI process itself; a flow row is refused before any task.
    left = [c for c in _cgroups() - before if _owned_by(c, proc.args[0])]
    assert left == [], "cgroups left behind: %s" % left
    if emulator is not None:
        assert emulator.live_sandboxes() == [], "sandboxes left alive on the %s emulator" % case.emulator
    if case.s3:
        assert _s3_keys(s3, "bad-input-%s/" % tmp_path.name) == 0, "something was uploaded before the refusal"


def _s3_keys(s3: dict, prefix: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["url"], aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    return client.list_objects_v2(Bucket="metaflow", Prefix=prefix).get("KeyCount", 0)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
