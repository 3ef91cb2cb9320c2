"""Strict parsers for every value a user types: CLI options, decorator attributes, config variables.

A security setting read as truthy (``network='no'`` meaning "on"), an ``inf`` timeout or a label
that hides a sandbox from ``gc`` are worse than an error, so each parser accepts one clear shape and
refuses anything else with an ``InvalidInputError`` that names where the value came from (``what``:
``--timeout``, ``@sandbox(cpu=...)``, ``METAFLOW_SANDBOX_TTL_MARGIN``) and the fix. Metaflow-free.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Optional, Union

from .errors import SandboxError
from .model import MARKER_LABEL

TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")
_BOOL_HINT = "use %s (on) or %s (off)" % ("/".join(TRUE_WORDS), "/".join(FALSE_WORDS))

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: A label key: what Daytona labels, E2B metadata and the local backend's JSON all accept.
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}\Z")
#: Labels the project sets itself: a user's copy would hide a sandbox from list/gc or the lifeline.
RESERVED_LABEL_PREFIXES = ("metaflow.", MARKER_LABEL + ".")

#: Linux refuses one environment string longer than this (MAX_ARG_STRLEN, with its NUL).
MAX_ENV_ENTRY_BYTES = 128 * 1024 - 1
#: The whole environment of a sandbox: well below execve's and the providers' request limits.
MAX_ENV_BYTES = 512 * 1024
_ENV_SIZE_HINT = (
    "pass large data another way: as a Metaflow artifact, a file in the flow's directory (it travels in the "
    "code package), or through the datastore; keep environment variables small"
)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Number = Union[int, float]


class InvalidInputError(SandboxError):
    """A value a user gave is malformed or out of range. ``what`` says where it came from."""

    def __init__(self, what: str, value: Any, expected: str, hint: str):
        super().__init__("%s must be %s, not %s" % (what, expected, _shown(value)), hint=hint)
        self.what = what
        self.value = value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "... (%d characters)" % len(text)


def boolean(value: Any, what: str, hint: Optional[str] = None) -> bool:
    """``True``/``False`` and the words in TRUE_WORDS / FALSE_WORDS (any case); nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise InvalidInputError(what, value, "true or false", hint or _BOOL_HINT)


def number(
    value: Any,
    what: str,
    *,
    minimum: float = 0.0,
    allow_minimum: bool = False,
    maximum: Optional[float] = None,
    integer: bool = False,
    hint: Optional[str] = None,
) -> Number:
    """A finite number above ``minimum`` (or equal, with ``allow_minimum``) and at most ``maximum``."""
    bound = "at least %s" % _num(minimum) if allow_minimum else "greater than %s" % _num(minimum)
    if maximum is not None:
        bound += " and at most %s" % _num(maximum)
    expected = "%s %s" % ("a whole number" if integer else "a finite number", bound)
    default_hint = "give e.g. %s%s" % (what + " " if what.startswith("-") else "", _example(minimum, allow_minimum, integer))
    parsed = _float(value)
    if parsed is None or not math.isfinite(parsed):
        raise InvalidInputError(what, value, expected, hint or default_hint)
    if integer and parsed != int(parsed):
        raise InvalidInputError(what, value, expected, hint or default_hint)
    too_low = parsed < minimum or (parsed == minimum and not allow_minimum)
    if too_low or (maximum is not None and parsed > maximum):
        raise InvalidInputError(what, value, expected, hint or default_hint)
    return int(parsed) if integer else parsed


def positive_number(value: Any, what: str, maximum: Optional[float] = None, integer: bool = False, hint: Optional[str] = None) -> Number:
    """A finite number > 0 (and <= ``maximum``): CPUs, MB, seconds."""
    return number(value, what, maximum=maximum, integer=integer, hint=hint)


def seconds(
    value: Any, what: str, minimum: float = 0.0, maximum: Optional[float] = None, allow_minimum: bool = False, hint: Optional[str] = None
) -> float:
    """A duration: a number of seconds, or one with a unit (``90``, ``90s``, ``15m``, ``2h``, ``1d``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        scale = _UNITS.get(text[-1:], 1.0) if text[:-1] else 1.0
        base = _float(text[:-1] if text[-1:] in _UNITS and text[:-1] else text)
        if base is not None:
            try:
                return float(number(base * scale, what, minimum=minimum, allow_minimum=allow_minimum, maximum=maximum, hint=hint))
            except InvalidInputError:
                pass  # said below, with the units
        expected = "a duration in seconds (e.g. 90, 90s, 15m, 2h) %s %s%s" % (
            "of at least" if allow_minimum else "greater than",
            _num(minimum),
            "" if maximum is None else " and at most %s" % _num(maximum),
        )
        raise InvalidInputError(what, value, expected, hint or "give a number of seconds, e.g. %s 600" % what)
    return float(number(value, what, minimum=minimum, allow_minimum=allow_minimum, maximum=maximum, hint=hint))


def env_name(name: Any, what: str) -> str:
    """An environment variable name as POSIX shells accept it: ``[A-Za-z_][A-Za-z0-9_]*``."""
    if isinstance(name, str) and _ENV_NAME.match(name):
        return name
    raise InvalidInputError(
        what, name, "a variable name (letters, digits and _, not starting with a digit)", "rename the variable, e.g. MY_SETTING"
    )


def environment(values: Any, what: str, max_bytes: int = MAX_ENV_BYTES) -> dict[str, str]:
    """A mapping of valid names to values that are text without NUL, small enough for any backend."""
    if not isinstance(values, Mapping):
        raise InvalidInputError(what, values, "a dict of NAME: value", "give e.g. {'MY_SETTING': 'x'}")
    out: dict[str, str] = {}
    for name, value in values.items():
        env_name(name, "%s name" % what)
        if value is None or isinstance(value, (dict, list, tuple, set, bytes)):
            raise InvalidInputError("%s[%r]" % (what, name), value, "a string or a number", "convert the value to a string")
        text = str(value)
        if "\0" in text:
            raise InvalidInputError("%s[%r]" % (what, name), value, "text without NUL characters", "remove the NUL character")
        if len(name) + 1 + len(text.encode("utf-8", "surrogateescape")) > MAX_ENV_ENTRY_BYTES:
            raise InvalidInputError(
                "%s[%r]" % (what, name), "%d bytes" % len(text), "at most %d KiB" % (MAX_ENV_ENTRY_BYTES // 1024), _ENV_SIZE_HINT
            )
        out[name] = text
    check_environment_size(out, what, max_bytes)
    return out


def check_environment_size(env: Mapping[str, str], what: str, max_bytes: int = MAX_ENV_BYTES) -> None:
    size = sum(len(k) + 2 + len(str(v).encode("utf-8", "surrogateescape")) for k, v in env.items())
    if size > max_bytes:
        raise InvalidInputError(what, "%d KiB" % (size // 1024), "at most %d KiB in all" % (max_bytes // 1024), _ENV_SIZE_HINT)


def key_value(item: Any, what: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may contain ``=``; the key may not be empty)."""
    if isinstance(item, str):
        key, sep, value = item.partition("=")
        if sep and key.strip() == key and key:
            return key, value
    raise InvalidInputError(what, item, "KEY=VALUE", "write it as %s NAME=value (no spaces around '=')" % what)


def labels(values: Any, what: str) -> dict[str, str]:
    """User labels: simple keys, text values, none of the project's reserved labels."""
    pairs = values.items() if isinstance(values, Mapping) else [key_value(v, what) for v in values]
    out: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise InvalidInputError(
                "%s key" % what,
                key,
                "a label key of up to 63 letters, digits and _ . - /",
                "rename the label, e.g. team=ml",
            )
        if is_reserved_label(key):
            raise InvalidInputError(
                "%s key" % what,
                key,
                "a key of your own (metaflow-sandbox and metaflow.* labels are set by metaflow-sandbox itself, "
                "and a copy would hide the sandbox from list, gc and the lifeline)",
                "use a key of your own, e.g. team=ml",
            )
        text = str(value)
        if "\0" in text or "\n" in text or len(text) > 256:
            raise InvalidInputError("%s %s" % (what, key), value, "one line of at most 256 characters", "shorten the label value")
        out[key] = text
    return out


def is_reserved_label(key: str) -> bool:
    return key == MARKER_LABEL or key.startswith(RESERVED_LABEL_PREFIXES)


def names(raw: Any, what: str) -> list[str]:
    """A comma-separated list of environment variable names (blank entries ignored)."""
    if raw is None:
        return []
    items: Iterable[Any] = raw.split(",") if isinstance(raw, str) else raw
    kept = [n.strip() if isinstance(n, str) else n for n in items if not (isinstance(n, str) and not n.strip())]
    return [env_name(n, "%s entry" % what) for n in kept]


def text(value: Any, what: str, example: str) -> str:
    """A non-empty single-line string (image names, interpreters, paths)."""
    if isinstance(value, str) and value.strip() and "\0" not in value and "\n" not in value:
        return value
    raise InvalidInputError(what, value, "a non-empty string", "give e.g. %s" % example)


def _float(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _example(minimum: float, allow_minimum: bool, integer: bool) -> str:
    if allow_minimum:
        return _num(minimum)
    if integer:
        return _num(math.floor(minimum) + 1)
    return _num(minimum + 1) if minimum >= 1 else "1"


def check_spec(spec: Any) -> None:
    """The part of ``Backend.validate`` that needs no capabilities: finite, positive numbers and a sane environment.

    Library callers build a ``SandboxSpec`` by hand; a NaN ttl or a negative CPU count must not reach a backend.
    """
    res = spec.resources
    if res.cpu is not None:
        positive_number(res.cpu, "cpu", hint="ask for at least a fraction of a CPU, e.g. cpu=1")
    if res.memory_mb is not None:
        positive_number(res.memory_mb, "memory", integer=True, hint="give megabytes, e.g. memory=2048")
    if res.gpu is not None:
        number(res.gpu, "gpu", allow_minimum=True, integer=True, hint="give a whole number of GPUs, e.g. gpu=1, or 0")
    if res.disk_mb is not None:
        positive_number(res.disk_mb, "disk", integer=True, hint="give megabytes, e.g. disk=10240")
    for what, value in (("ttl_seconds", spec.ttl_seconds), ("lease_seconds", spec.lease_seconds)):
        if value is not None:
            positive_number(value, what, hint="give a number of seconds, e.g. %s=600" % what)
    environment(spec.env, "env")
    for key, value in spec.labels.items():
        if not isinstance(key, str) or not key or not isinstance(value, str) or "\0" in key + value:
            raise InvalidInputError("labels", {key: value}, "text keys and values without NUL", "pass labels as str: str")
