"""Plain data that crosses the plugin contract: frozen, Metaflow-free, easy to test."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Union

#: Receives decoded text in the order the command produced it; a chunk may hold part of a line.
OutputCallback = Callable[[str], None]

#: The closed vocabulary of per-file errors (deepagents' ``protocol.py`` shape).
FileErrorCode = Literal["file_not_found", "permission_denied", "is_directory", "invalid_path"]
FILE_ERROR_CODES: tuple[str, ...] = ("file_not_found", "permission_denied", "is_directory", "invalid_path")

#: The lease a sandbox is kept alive by when nobody sets one (``METAFLOW_SANDBOX_LEASE_SECONDS``).
DEFAULT_LEASE_SECONDS = 300.0
LEASE_ENV = "METAFLOW_SANDBOX_LEASE_SECONDS"
#: The TTL the facade gives a sandbox created without one (capped at the backend's ``max_ttl_seconds``).
DEFAULT_TTL_SECONDS = 3600.0

#: Label every sandbox we create carries, so list/gc never touches a user's own sandboxes.
MARKER_LABEL = "metaflow-sandbox"


@dataclass(frozen=True)
class Resources:
    """What a step asks for. ``None`` means "backend default"."""

    cpu: Optional[float] = None
    memory_mb: Optional[int] = None
    gpu: Optional[int] = None
    gpu_type: Optional[str] = None
    disk_mb: Optional[int] = None


@dataclass(frozen=True)
class Bind:
    """A host directory made visible inside the sandbox at ``target`` (same path by default)."""

    source: str
    target: Optional[str] = None
    read_only: bool = False

    @property
    def dest(self) -> str:
        return self.target or self.source


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to provision one sandbox.

    ``ttl_seconds`` is the provider-side lifetime: the sandbox must die on its own after it,
    even if the launcher is SIGKILLed. ``lease_seconds`` is the shorter lease a backend that can
    renew a sandbox's lifetime (E2B's timeout, Daytona's auto-stop) keeps it alive by, renewing
    while the sandbox is in use; if every process on the launcher dies, the sandbox ends at most
    this long after the last renewal (never later than ``ttl_seconds``). ``options`` carries backend-specific settings
    (credentials, snapshot, template, ...) gathered from Metaflow config by the extension layer.
    """

    image: Optional[str] = None
    resources: Resources = field(default_factory=Resources)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    labels: Mapping[str, str] = field(default_factory=dict)
    ttl_seconds: Optional[float] = None
    lease_seconds: Optional[float] = None
    network: bool = True
    binds: tuple[Bind, ...] = ()
    idempotency_key: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: ``PreparedEnvironment.ref`` to start from (a Daytona snapshot, an E2B template, a cached
    #: directory): it was built from ``image``, so the backend starts from it instead of ``image``.
    environment: Optional[str] = None


#: Label every prepared environment we build carries, with its ``EnvironmentSpec.key`` as value.
ENVIRONMENT_LABEL = "metaflow-sandbox.environment"
ENVIRONMENT_PREFIX = "mfsb-env-"


@dataclass(frozen=True)
class EnvironmentSpec:
    """What a prepared environment holds. Its ``key`` names it on every backend and every machine.

    ``requirements`` are pip requirement lines: Metaflow's datastore dependencies plus the step's
    ``packages=``/``requirements_file=``. ``resources`` matter only to backends that size sandboxes
    per environment (E2B templates, Daytona snapshots); they name it with a resource-class suffix.
    """

    python_version: str
    requirements: tuple[str, ...] = ()
    image: Optional[str] = None
    resources: Resources = field(default_factory=Resources)
    labels: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        """A content hash of python version, requirements (order and duplicates ignored) and base image."""
        content = json.dumps(
            {"python": self.python_version, "requirements": sorted(set(self.requirements)), "image": self.image or ""},
            sort_keys=True,
        )
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """``mfsb-env-<key>``: what a backend names it by (plus its own resource-class suffix, if any)."""
        return ENVIRONMENT_PREFIX + self.key


@dataclass(frozen=True)
class PreparedEnvironment:
    """One prepared environment on a backend: what ``list`` shows and ``SandboxSpec.environment`` takes.

    ``state`` is ``ready``, ``building`` or ``failed``; ``built`` is True when this call built it
    (False: it was found). Times are epoch seconds, None when the provider does not say.
    """

    backend: str
    ref: str
    key: str
    state: str = "ready"
    built: bool = False
    created_at: Optional[float] = None
    last_used_at: Optional[float] = None
    size_bytes: Optional[int] = None
    detail: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SandboxHandle:
    """Per-sandbox state; travels between hooks so a backend can be five plain functions.

    ``native`` is whatever the backend needs (an SDK object, a process group, ...).
    ``workdir`` is the writable directory commands start in when no ``cwd`` is given.
    """

    backend: str
    sandbox_id: str
    workdir: str = "/tmp"
    labels: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    native: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ExecResult:
    """How a command ended. A non-zero ``exit_code`` is a result, not an error.

    ``oom_killed`` says the sandbox's memory limit was hit.
    """

    exit_code: int
    oom_killed: bool = False


PathLike = Union[str, "os.PathLike[str]"]


def valid_sandbox_path(path: object) -> bool:
    """The facade's one rule for file paths, for every backend: absolute text, no NUL byte, no ``..`` part.

    Anything else is answered ``FileResult(path, error="invalid_path")`` before a backend sees it.
    """
    return isinstance(path, str) and path.startswith("/") and "\0" not in path and ".." not in path.split("/")


@dataclass(frozen=True)
class UploadItem:
    """Put ``content`` (bytes) or the local file ``source`` at absolute ``path`` in the sandbox."""

    path: str
    content: Optional[bytes] = field(default=None, repr=False)
    source: Optional[PathLike] = None


@dataclass(frozen=True)
class DownloadItem:
    """Fetch absolute ``path``; into local file ``destination`` if given, else into memory."""

    path: str
    destination: Optional[PathLike] = None


@dataclass(frozen=True)
class FileResult:
    """Per-file outcome, in the order of the request. ``error`` is one of FILE_ERROR_CODES."""

    path: str
    error: Optional[FileErrorCode] = None
    content: Optional[bytes] = field(default=None, repr=False)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can honour; the facade refuses a spec that asks for more."""

    gpu: bool = False
    max_cpu: Optional[float] = None
    max_memory_mb: Optional[int] = None
    max_ttl_seconds: Optional[float] = None
    #: The shortest ``ttl_seconds`` the provider can enforce (a shorter one is rounded up to it), if any.
    min_ttl_seconds: Optional[float] = None
    network_toggle: bool = False
    binds: bool = False
    images: bool = True
    #: True when the sandbox shares the launcher's filesystem (only then a local datastore works).
    shares_host_filesystem: bool = False
    #: Environment variables that configure the backend (shown by ``metaflow-sandbox backends``).
    config_env: tuple[str, ...] = ()
    #: Provider quotas the facade keeps to across every process of this user (see ``limits_rate``):
    #: sandboxes alive at once, and creates per minute. None: no limit. Options ``concurrency`` /
    #: ``create_rate`` override them (0 turns a limit off).
    max_concurrent_sandboxes: Optional[int] = None
    max_creates_per_minute: Optional[float] = None
    #: True when ``resources.cpu``/``memory_mb`` are enforced inside the sandbox (the kit checks it: the
    #: command sees at most ceil(cpu) CPUs, memory above the limit is killed). False: they are advisory.
    enforces_limits: bool = False
