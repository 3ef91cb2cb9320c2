"""What E2B cannot carry, refused before any request with the offending item named (no raw 413 or codec error).

E2B sends commands, environments and metadata as JSON text, so each must be valid UTF-8 without NUL
bytes; and an environment travels in one request body (E2B answers 413 above about 1 MB) and must
then fit Linux's limits for exec (128 KiB per variable, ARG_MAX in all).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from metaflow_sandbox import UnsupportedOptionError

from .settings import NAME

#: Linux's MAX_ARG_STRLEN: one ``NAME=value`` longer than this cannot be passed to exec.
MAX_ENV_VAR_BYTES = 128 * 1024 - 1
#: The whole environment of one create or command; well under E2B's request limit and ARG_MAX.
MAX_ENV_BYTES = 512 * 1024
ENV_FIX = (
    "pass large values as a file or a Metaflow artifact (IncludeFile, a Parameter, self.<name> in an earlier step), "
    "not as environment variables"
)


def _preview(text: str) -> str:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return ascii(shown)


def _text(value: str, what: str, op: str) -> bytes:
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedOptionError(
            "%s is not valid UTF-8 text: %s" % (what, _preview(value)),
            hint="E2B passes commands, environments and labels as JSON text: pass binary data as a file, or base64-encode it",
            backend=NAME,
            op=op,
        ) from None
    if "\0" in value:
        raise UnsupportedOptionError(
            "%s contains a NUL byte: %s" % (what, _preview(value)),
            hint="remove the NUL byte; pass binary data as a file",
            backend=NAME,
            op=op,
        )
    return data


def checked_argv(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        _text(str(arg), "argument %d of the command" % i, "sandbox_exec")
    return [str(a) for a in argv]


def checked_env(env: Mapping[str, str], op: str) -> dict[str, str]:
    """``env`` as E2B takes it, or UnsupportedOptionError naming the variable and the fix."""
    total = 0
    out = {}
    for key, value in env.items():
        key, value = str(key), str(value)
        size = len(_text(key, "the name of environment variable %s" % _preview(key), op)) + 1
        size += len(_text(value, "the value of environment variable %s" % key, op))
        if size > MAX_ENV_VAR_BYTES:
            raise UnsupportedOptionError(
                "environment variable %s is %d KiB; E2B (and Linux's exec) takes at most 128 KiB per variable" % (key, size // 1024),
                hint=ENV_FIX,
                backend=NAME,
                op=op,
            )
        total += size + 1
        out[key] = value
    if total > MAX_ENV_BYTES:
        biggest = sorted(out, key=lambda k: len(out[k]), reverse=True)[:3]
        raise UnsupportedOptionError(
            "the environment is %d KiB; E2B takes at most %d KiB (largest: %s)"
            % (total // 1024, MAX_ENV_BYTES // 1024, ", ".join(biggest)),
            hint=ENV_FIX,
            backend=NAME,
            op=op,
        )
    return out


def checked_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        _text(str(key), "label name %s" % _preview(str(key)), "sandbox_create")
        _text(str(value), "the value of label %s" % key, "sandbox_create")
    return {str(k): str(v) for k, v in labels.items()}
