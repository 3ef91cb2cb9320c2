"""The local backend's settings, parsed strictly: a typo or a nonsense number is refused with the option
and the environment variable to fix, before any sandbox exists (``sandbox_check_config`` at launch)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from metaflow_sandbox import UnsupportedOptionError, read_option

ENV_PIDS_LIMIT = "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"
ENV_DISK_MB = "METAFLOW_SANDBOX_LOCAL_DISK_MB"
ENV_MEMORY_LIMITER = "METAFLOW_SANDBOX_LOCAL_MEMORY_LIMITER"
ENV_ISOLATION = "METAFLOW_SANDBOX_LOCAL_ISOLATION"

DEFAULT_PIDS_LIMIT = 1024  # processes + threads of one sandbox; a fork bomb stops here
DEFAULT_DISK_MB = 2048  # work dir + /tmp of one sandbox (a tmpfs: it is memory, see docs/configuration.md)
MAX_PIDS_LIMIT = 4194304  # the kernel's pid_max ceiling

ISOLATION_VALUES = {
    "auto": "auto",
    "bwrap": "bwrap",
    "bubblewrap": "bwrap",
    "required": "bwrap",
    "on": "bwrap",
    "true": "bwrap",
    "yes": "bwrap",
    "1": "bwrap",
    "none": "none",
    "off": "none",
    "false": "none",
    "no": "none",
    "0": "none",
}
MEMORY_LIMITERS = ("auto", "cgroup", "rlimit")


def _raw(options: Mapping[str, Any], key: str, env: str) -> tuple[Any, str]:
    """The value (resolved like every backend's: ``read_option``) and how the user set it, for the message."""
    value = read_option(options, "local", key)  # env is option_env("local", key): METAFLOW_SANDBOX_LOCAL_<KEY>
    if value is not None and not value.strip():
        value = None
    return value, ("option %s" % key if options.get(key) not in (None, "") else env)


def _refuse(what: str, value: Any, expected: str, key: str, env: str) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        "%s=%r is not %s" % (what, value, expected),
        hint="set %s (option %s) to %s, or unset it for the default" % (env, key, expected),
        backend="local",
    )


def choice(options: Mapping[str, Any], key: str, env: str, values: Mapping[str, str] | tuple[str, ...], default: str) -> str:
    value, where = _raw(options, key, env)
    if value is None:
        return default
    table = values if isinstance(values, Mapping) else {v: v for v in values}
    found = table.get(str(value).strip().lower())
    if found is None:
        names = sorted(set(table.values())) if isinstance(values, Mapping) else list(values)
        raise _refuse(where, value, "one of %s" % ", ".join(names), key, env)
    return found


def positive_int(options: Mapping[str, Any], key: str, env: str, default: int, maximum: int) -> int:
    """A whole number in 1..maximum; 0 is refused too (use a big number to mean 'no practical limit')."""
    value, where = _raw(options, key, env)
    if value is None:
        return default
    try:
        number = math.nan if isinstance(value, bool) else float(value if isinstance(value, (int, float)) else str(value).strip())
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or not 1 <= number <= maximum:
        raise _refuse(where, value, "a whole number between 1 and %d" % maximum, key, env)
    return int(number)


def isolation(options: Mapping[str, Any]) -> str:
    """'auto' (default), 'bwrap' (refuse to run without it) or 'none' (plain subprocesses)."""
    return choice(options, "isolation", ENV_ISOLATION, ISOLATION_VALUES, "auto")


def memory_limiter(options: Mapping[str, Any]) -> str:
    return choice(options, "memory_limiter", ENV_MEMORY_LIMITER, MEMORY_LIMITERS, "auto")


def pids_limit(options: Mapping[str, Any]) -> int:
    return positive_int(options, "pids_limit", ENV_PIDS_LIMIT, DEFAULT_PIDS_LIMIT, MAX_PIDS_LIMIT)


def disk_mb(options: Mapping[str, Any], requested: int | None) -> int:
    """``disk=`` of the step wins; then the option / environment; then the default."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise UnsupportedOptionError(
                "disk=%r is not a positive number of MB" % (requested,), hint="set disk= (MB) to e.g. 4096", backend="local"
            )
        return requested
    return positive_int(options, "disk_mb", ENV_DISK_MB, DEFAULT_DISK_MB, 1 << 30)


def check(options: Mapping[str, Any]) -> None:
    """Every setting at once (at launch, and at each create)."""
    isolation(options)
    memory_limiter(options)
    pids_limit(options)
    disk_mb(options, None)
