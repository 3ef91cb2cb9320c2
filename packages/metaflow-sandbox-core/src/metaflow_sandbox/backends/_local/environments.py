"""The local backend's prepared environments: one directory per ``EnvironmentSpec.key``, installed once.

``<root>/<key>/`` holds the requirements (``pip install --target``, with uv when present) and
``.mfsb-environment.json`` (the key, requirements, labels, creation time). It is built under an
exclusive ``flock`` into ``<root>/.build-<key>-<pid>/target`` and renamed into place only when pip
succeeded, so two launchers end with one directory and a failed or killed build leaves nothing that
looks ready. pip runs in a local sandbox (with network; only the build directory writable), because
installing a package can run its code. A sandbox created with ``SandboxSpec(environment=<dir>)`` gets the directory bound read-only
and on its ``PYTHONPATH``.

The root is option ``environments_dir`` (``METAFLOW_SANDBOX_LOCAL_ENVIRONMENTS_DIR``), else
``environments/`` under the pip cache the trampolines use (``METAFLOW_SANDBOX_PIP_CACHE``, else
``~/.cache/metaflow-sandbox/pip``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from typing import Any, Callable, Mapping, Optional

from metaflow_sandbox import ENVIRONMENT_LABEL, EnvironmentBuildError, EnvironmentSpec, OutputCallback, PreparedEnvironment, read_option

NAME = "local"
META_FILE = ".mfsb-environment.json"
LAST_USED_FILE = ".mfsb-last-used"
LOG_TAIL = 40
#: Launcher variables pip and uv need to reach an index (mirrors, proxies, CA bundles).
PASS_ENV_PREFIXES = ("PIP_", "UV_")
PASS_ENV = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)

#: runner(argv, env, writable_dir, on_output) -> exit code: how the install command runs (local.py: in a sandbox).
Runner = Callable[[list, dict, str, Callable[[str], None]], int]


def root(options: Mapping[str, Any]) -> str:
    configured = read_option(options, NAME, "environments_dir")
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    pip_cache = os.environ.get("METAFLOW_SANDBOX_PIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "metaflow-sandbox", "pip"
    )
    return os.path.join(os.path.abspath(pip_cache), "environments")


def prepare(environment: EnvironmentSpec, on_log: Optional[OutputCallback], runner: Runner) -> PreparedEnvironment:
    """Find ``<root>/<key>`` or build it (one builder at a time per key, across processes)."""
    base = root(environment.options)
    os.makedirs(base, exist_ok=True)
    final = os.path.join(base, environment.key)
    with open(os.path.join(base, ".%s.lock" % environment.key), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second launcher waits here for the first one's build
        _remove_abandoned(base, environment.key)
        if not _ready(final):
            _build(environment, base, final, on_log, runner)
            return _described(final, built=True)
    touch_last_used(final)
    return _described(final, built=False)


def _remove_abandoned(base: str, key: str) -> None:
    """Build directories of this key left by a killed launcher (the lock is ours: nobody else builds it now)."""
    for name in os.listdir(base):
        if name.startswith((".build-%s-" % key, ".rm-%s-" % key)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _ready(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def _build(environment: EnvironmentSpec, base: str, final: str, on_log: Optional[OutputCallback], runner: Runner) -> None:
    work = os.path.join(base, ".build-%s-%d" % (environment.key, os.getpid()))
    tmp = os.path.join(work, "target")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "tmp"))
    os.chmod(work, 0o755)
    if os.path.isdir(final):  # a directory without its metadata is not ours to trust: rebuild
        shutil.rmtree(final, ignore_errors=True)
    tail: deque[str] = deque(maxlen=LOG_TAIL)
    try:
        code = _install(list(environment.requirements), work, tail, on_log, runner)
        if code != 0:
            raise EnvironmentBuildError(
                "pip could not install the environment's %d requirement(s) (exit code %d)" % (len(environment.requirements), code),
                build_log="".join(tail),
                hint="check the requirement lines in packages= / requirements_file= (names, versions, that they exist on PyPI)",
                backend=NAME,
            )
        meta = {
            "key": environment.key,
            "python": environment.python_version,
            "requirements": sorted(set(environment.requirements)),
            "labels": {**environment.labels, ENVIRONMENT_LABEL: environment.key},
            "created_at": time.time(),
        }
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f)
        _readable(tmp)
        os.rename(tmp, final)  # atomic: the metadata file appears with the complete directory
        touch_last_used(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install(reqs: list[str], work: str, tail: deque[str], on_log: Optional[OutputCallback], runner: Runner) -> int:
    """pip (or uv) with the launcher's interpreter, so the environment fits the Python that sandboxes run."""
    target = os.path.join(work, "target")
    uv = shutil.which("uv")
    if uv and not any(os.path.realpath(uv).startswith(h + "/") for h in _hidden()):  # a uv under a home is not visible inside
        argv = [uv, "pip", "install", "--python", sys.executable, "--target", target, *reqs]
    else:
        argv = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--target", target, *reqs]
    env = {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIXES) or k in PASS_ENV}
    for name in ("PIP_TARGET", "PIP_PREFIX", "PIP_USER", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(name, None)
    env["TMPDIR"] = os.path.join(work, "tmp")  # on disk, not the sandbox's memory-backed /tmp: wheels can be large

    def output(text: str) -> None:
        for line in text.splitlines(keepends=True):
            tail.append(line)
        if on_log:
            on_log(text)

    return runner(argv, env, work, output)


def _hidden() -> tuple[str, ...]:
    from .mounts import hidden_dirs

    return hidden_dirs()


def run_plain(argv: list, env: dict, writable: str, on_output: Callable[[str], None]) -> int:
    """The install without a sandbox (where the local backend runs none either)."""
    full = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env}
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=full)
    except OSError as err:
        on_output("%s: %s\n" % (argv[0], err))
        return 127
    assert p.stdout is not None
    for line in p.stdout:
        on_output(line)
    return p.wait()


def _readable(path: str) -> None:
    """A root launcher's sandboxes run as another uid: everything must be world-readable (pip keeps umask)."""
    for dirpath, _dirs, filenames in os.walk(path):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, os.stat(full).st_mode | 0o444)


def touch_last_used(path: str) -> None:
    try:
        with open(os.path.join(path, LAST_USED_FILE), "a"):
            pass
        os.utime(os.path.join(path, LAST_USED_FILE))
    except OSError:  # read-only or removed meanwhile: last-used is informational
        pass


def _described(path: str, built: bool) -> PreparedEnvironment:
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    try:
        last_used: Optional[float] = os.stat(os.path.join(path, LAST_USED_FILE)).st_mtime
    except OSError:
        last_used = None
    return PreparedEnvironment(
        backend=NAME,
        ref=path,
        key=meta.get("key", os.path.basename(path)),
        built=built,
        created_at=meta.get("created_at"),
        last_used_at=last_used,
        size_bytes=_size(path),
        detail="%d requirement(s): %s" % (len(meta.get("requirements", [])), " ".join(meta.get("requirements", []))),
        labels=meta.get("labels", {}),
    )


def _size(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def listed(options: Mapping[str, Any]) -> list[PreparedEnvironment]:
    base = root(options)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(base, name)
        if not name.startswith(".") and _ready(path):
            try:
                out.append(_described(path, built=False))
            except (OSError, ValueError):  # removed meanwhile, or not ours
                continue
    return out


def remove(ref: str, options: Mapping[str, Any]) -> bool:
    """Remove ``ref`` (a directory under the root, or its key) under the build lock; False if already gone."""
    base = root(options)
    path = ref if os.path.isabs(ref) else os.path.join(base, ref)
    path = os.path.abspath(path)
    if os.path.dirname(path) != base:
        raise EnvironmentBuildError(
            "%s is not a prepared environment of the local backend (they live in %s)" % (ref, base),
            hint="give a REF that `metaflow-sandbox environments list --backend local` shows",
            backend=NAME,
        )
    if not os.path.isdir(path):
        return False
    key = os.path.basename(path)
    with open(os.path.join(base, ".%s.lock" % key), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _ready(path):
            return False
        trash = os.path.join(base, ".rm-%s-%d" % (key, os.getpid()))
        os.rename(path, trash)  # gone for new creates at once; the files go after
        shutil.rmtree(trash, ignore_errors=True)
    return True


def check_ref(ref: str) -> str:
    """The directory a sandbox starts from: it must be a ready environment (not removed meanwhile)."""
    if not os.path.isabs(ref) or not _ready(ref):
        from metaflow_sandbox import UnsupportedOptionError

        raise UnsupportedOptionError(
            "prepared environment %s does not exist (removed, or never built on this machine)" % ref,
            hint="run `metaflow-sandbox prepare FLOW.py` (or just run the flow: it prepares its environments at start)",
            backend=NAME,
        )
    touch_last_used(ref)
    return ref
