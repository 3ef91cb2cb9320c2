"""Errors that name the fix. Each carries the backend, the operation and a ``hint``."""

from __future__ import annotations

from typing import Any, Iterable, Optional

FIRST_PARTY = {"daytona": "metaflow-sandbox[daytona]", "e2b": "metaflow-sandbox[e2b]"}


class SandboxError(Exception):
    """Base class. ``str(err)`` is the message followed by the hint."""

    def __init__(
        self,
        message: str,
        *,
        hint: Optional[str] = None,
        backend: Optional[str] = None,
        op: Optional[str] = None,
        sandbox_id: Optional[str] = None,
    ):
        self.message = message
        self.hint = hint
        self.backend = backend
        self.op = op
        self.sandbox_id = sandbox_id
        super().__init__(message)

    def __str__(self) -> str:
        where = []
        if self.backend:
            where.append("backend '%s'" % self.backend)
        if self.sandbox_id:
            where.append("sandbox %s" % self.sandbox_id)
        if self.op:
            where.append("during %s" % self.op)
        text = self.message
        if where and not any(w in text for w in where):
            text = "%s [%s]" % (text, ", ".join(where))
        return "%s\n  Fix: %s" % (text, self.hint) if self.hint else text


class UnknownBackendError(SandboxError):
    def __init__(self, name: str, installed: Iterable[str]):
        installed = sorted(installed)
        if name in FIRST_PARTY:
            hint = "pip install '%s'" % FIRST_PARTY[name]
        else:
            hint = (
                "install the distribution that provides it (it registers '%s' in the "
                "'metaflow_sandbox.backends' entry-point group), or pick one of %s" % (name, installed)
            )
        super().__init__(
            "No sandbox backend named '%s' is installed. Installed backends: %s." % (name, ", ".join(installed) or "none"),
            hint=hint,
            backend=name,
        )
        self.installed = installed


class AmbiguousBackendError(SandboxError):
    def __init__(self, name: str, dists: Iterable[str]):
        dists = sorted(dists)
        super().__init__(
            "Backend name '%s' is claimed by more than one distribution: %s." % (name, " and ".join(dists)),
            hint="pip uninstall one of %s" % ", ".join(dists),
            backend=name,
        )
        self.dists = dists


class BackendLoadError(SandboxError):
    """The backend's plugin failed to import or declares a hook with a wrong signature."""

    def __init__(self, name: str, dist: str, reason: str, hook: Optional[str] = None):
        what = "hook %s of " % hook if hook else ""
        super().__init__(
            "Backend '%s' could not be loaded: %s%s is broken: %s" % (name, what, dist, reason),
            hint="upgrade or reinstall %s (pip install -U %s), or report it to its authors" % (dist, dist),
            backend=name,
        )
        self.dist = dist
        self.hook = hook


class BackendNotConfiguredError(SandboxError):
    """Credentials or settings are missing. ``variable`` is the env var that fixes it."""

    def __init__(self, backend: str, variable: str, what: str = "an API key"):
        super().__init__(
            "Backend '%s' needs %s, and %s is not set." % (backend, what, variable),
            hint="export %s=... (or set METAFLOW_SANDBOX_%s_%s in ~/.metaflowconfig)"
            % (variable, backend.upper(), variable.split("_", 1)[-1]),
            backend=backend,
        )
        self.variable = variable


class BackendContractError(SandboxError):
    """The backend broke the hook contract (returned None or the wrong type)."""


class UnsupportedOptionError(SandboxError):
    """The spec asks for something the backend cannot do (a GPU where there is none, ...)."""


class SandboxNotFoundError(SandboxError):
    """The sandbox is gone (destroyed, expired, or never existed)."""


class SandboxTimeoutError(SandboxError):
    """A command ran past its timeout and was killed."""


class SandboxCancelledError(SandboxError):
    """A command was stopped by ``Sandbox.cancel()`` before it ended."""


class TransientBackendError(SandboxError):
    """A failure worth retrying (rate limit, 5xx, dropped connection). Only idempotent ops retry."""


class SandboxFileError(SandboxError):
    """A file operation failed; ``code`` is one of ``model.FILE_ERROR_CODES``."""

    def __init__(self, path: str, code: str, **kw: object):
        hints = {
            "file_not_found": "check the path exists in the sandbox (paths must be absolute)",
            "permission_denied": "write under the sandbox's work directory",
            "is_directory": "name a file, not a directory",
            "invalid_path": "use an absolute path without '..'",
        }
        super().__init__("%s: %s" % (code, path), hint=hints.get(code), **kw)  # type: ignore[arg-type]
        self.path = path
        self.code = code


class EnvironmentBuildError(SandboxError):
    """A prepared environment failed to build; ``build_log`` holds the provider's log (its tail)."""

    def __init__(self, message: str, build_log: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.build_log = build_log
