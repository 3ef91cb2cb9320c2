"""Backend options resolved one way for every backend and every caller.

A backend option ``key`` of backend ``name`` is, first to last: the decorator's ``options`` attribute,
``METAFLOW_SANDBOX_<NAME>_<KEY>`` in the environment, the same in Metaflow's config file, then the
provider's own variable (``E2B_API_KEY``, ``DAYTONA_API_URL``...) where the backend names one. The
extension layer gathers the first three into ``SandboxSpec.options`` (``options_from_config``); a
backend reads one with ``read_option``/``read_number_option``, which also look at the environment so
that library use without Metaflow behaves the same.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

from .errors import UnsupportedOptionError


def option_env(backend: str, key: str) -> str:
    """``METAFLOW_SANDBOX_<BACKEND>_<KEY>``: the variable that sets option ``key`` of ``backend``."""
    return "METAFLOW_SANDBOX_%s_%s" % (backend.upper().replace("-", "_"), key.upper())


def options_from_config(backend: str, *sources: Mapping[str, Any], attribute: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Every ``METAFLOW_SANDBOX_<BACKEND>_<KEY>`` of ``sources`` as ``{"key": value}`` (a later source wins),
    with the decorator's ``attribute`` options on top."""
    prefix = option_env(backend, "")
    found: dict[str, Any] = {}
    for source in sources:
        for name, value in source.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                found[name[len(prefix) :].lower()] = value
    found.update(attribute or {})
    return found


def read_option(options: Mapping[str, Any], backend: str, key: str, env: Sequence[str] = ()) -> Optional[str]:
    """Option ``key`` as text: ``options``, else ``METAFLOW_SANDBOX_<BACKEND>_<KEY>``, else the provider's
    variables ``env`` in order; an empty value counts as unset. None when nothing sets it."""
    value = options.get(key)
    for name in (option_env(backend, key), *env):
        if value not in (None, ""):
            break
        value = os.environ.get(name)
    return None if value in (None, "") else str(value)


def read_number_option(
    options: Mapping[str, Any],
    backend: str,
    key: str,
    default: Optional[float],
    minimum: float,
    maximum: float = math.inf,
    env: Sequence[str] = (),
) -> Optional[float]:
    """Option ``key`` as a finite number in [minimum, maximum]; ``default`` when unset; anything else is
    an ``UnsupportedOptionError`` naming the variable to fix."""
    raw = read_option(options, backend, key, env)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not (minimum <= value <= maximum) or not math.isfinite(value):  # NaN fails every comparison
        span = "at least %g" % minimum if maximum == math.inf else "between %g and %g" % (minimum, maximum)
        example = "e.g. %g" % default if default is not None else "a number %s" % span
        raise UnsupportedOptionError(
            "%s option %s=%r must be a number %s" % (backend, key, raw, span),
            hint="set %s (option %s) to %s, or unset it" % (option_env(backend, key), key, example),
            backend=backend,
        )
    return value
