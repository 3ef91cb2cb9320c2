"""metaflow-sandbox core: the backend contract and the facade. Metaflow-free.

Backend authors import only from here: ``hookimpl``, the model types and the errors.
"""

from __future__ import annotations

import pluggy

from .errors import (
    AmbiguousBackendError,
    BackendContractError,
    BackendLoadError,
    BackendNotConfiguredError,
    EnvironmentBuildError,
    SandboxCancelledError,
    SandboxError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxTimeoutError,
    TransientBackendError,
    UnknownBackendError,
    UnsupportedOptionError,
)
from .hookspecs import PROJECT
from .model import (
    DEFAULT_LEASE_SECONDS,
    ENVIRONMENT_LABEL,
    FILE_ERROR_CODES,
    MARKER_LABEL,
    Bind,
    Capabilities,
    DownloadItem,
    EnvironmentSpec,
    ExecResult,
    FileResult,
    OutputCallback,
    PreparedEnvironment,
    Resources,
    SandboxHandle,
    SandboxSpec,
    UploadItem,
    valid_sandbox_path,
)
from .options import option_env, options_from_config, read_number_option, read_option
from .plugins import GROUP, available_backends, describe_backends, get_plugin_manager
from .session import Backend, Sandbox, line_splitter, open_sandbox

__version__ = "0.2.0"

#: Decorate a backend's hook functions with this.
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "AmbiguousBackendError",
    "Backend",
    "BackendContractError",
    "BackendLoadError",
    "BackendNotConfiguredError",
    "Bind",
    "Capabilities",
    "DEFAULT_LEASE_SECONDS",
    "DownloadItem",
    "ENVIRONMENT_LABEL",
    "EnvironmentBuildError",
    "EnvironmentSpec",
    "ExecResult",
    "FILE_ERROR_CODES",
    "FileResult",
    "GROUP",
    "MARKER_LABEL",
    "OutputCallback",
    "PreparedEnvironment",
    "Resources",
    "Sandbox",
    "SandboxCancelledError",
    "SandboxError",
    "SandboxFileError",
    "SandboxHandle",
    "SandboxNotFoundError",
    "SandboxSpec",
    "SandboxTimeoutError",
    "TransientBackendError",
    "UnknownBackendError",
    "UnsupportedOptionError",
    "UploadItem",
    "__version__",
    "available_backends",
    "describe_backends",
    "get_plugin_manager",
    "hookimpl",
    "line_splitter",
    "open_sandbox",
    "option_env",
    "options_from_config",
    "read_number_option",
    "read_option",
    "valid_sandbox_path",
]
