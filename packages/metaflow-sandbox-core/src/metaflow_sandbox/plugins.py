"""Backend discovery: entry points read from metadata, one plugin manager per chosen backend.

Listing never imports a backend; ``get_plugin_manager(name)`` imports only ``name``, so a broken
or slow third-party backend never affects another one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import importlib_metadata
import pluggy

from . import hookspecs
from .errors import AmbiguousBackendError, BackendLoadError, SandboxError, UnknownBackendError

GROUP = "metaflow_sandbox.backends"
REQUIRED_HOOKS = ("sandbox_create", "sandbox_exec", "sandbox_upload", "sandbox_download", "sandbox_destroy")
OPTIONAL_HOOKS = (
    "sandbox_list",
    "sandbox_capabilities",
    "sandbox_check_config",
    "sandbox_exec_kill",
    "sandbox_environment_prepare",
    "sandbox_environment_list",
    "sandbox_environment_remove",
)


_frozen: Optional[dict[str, list[importlib_metadata.EntryPoint]]] = None


def freeze_discovery() -> None:
    """Remember the installed backends for the rest of this process and its forks (a no-op once done).

    Reading every distribution's metadata costs tens of ms: a launcher calls this at run start
    (its checks would read it five times), and the fast path's per-run server before it forks, so
    that each trampoline finds its backend without reading it again.
    """
    global _frozen
    if _frozen is None:
        _frozen = available_backends()


def available_backends() -> dict[str, list[importlib_metadata.EntryPoint]]:
    """Backend name -> entry points claiming it (one per distribution), from metadata only."""
    if _frozen is not None:
        return {name: list(eps) for name, eps in _frozen.items()}
    found: dict[str, dict[str, importlib_metadata.EntryPoint]] = {}
    for ep in importlib_metadata.entry_points(group=GROUP):
        dist = _dist_name(ep)
        found.setdefault(ep.name, {}).setdefault(dist, ep)  # a dist seen twice on sys.path is one claim
    return {name: list(by_dist.values()) for name, by_dist in sorted(found.items())}


def _dist_name(ep: importlib_metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "<unknown distribution>"


#: Validated managers, kept only once discovery is frozen (the fast path's server builds each one before
#: it forks, so a forked task does not build it again: ~20 ms per Backend()).
_managers: dict[str, pluggy.PluginManager] = {}


def get_plugin_manager(name: str) -> pluggy.PluginManager:
    """Build a validated plugin manager holding exactly the backend ``name``."""
    if _frozen is not None and name in _managers:
        return _managers[name]
    eps = available_backends()
    if name not in eps:
        raise UnknownBackendError(name, eps)
    if len(eps[name]) > 1:
        raise AmbiguousBackendError(name, [_dist_name(ep) for ep in eps[name]])
    ep = eps[name][0]
    dist = _dist_name(ep)
    try:
        plugin = ep.load()
    except Exception as exc:  # any import failure of third-party code is its own, named
        raise BackendLoadError(name, dist, "importing %s raised %s: %s" % (ep.value, type(exc).__name__, exc)) from exc
    pm = build_plugin_manager(name, plugin, dist=dist)
    if _frozen is not None:
        _managers[name] = pm
    return pm


def build_plugin_manager(name: str, plugin: Any, dist: str = "<in-process>") -> pluggy.PluginManager:
    """Register ``plugin`` (a module or object of hook functions) and validate it."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise BackendLoadError(name, dist, _one_line(exc), hook=_hook_in(str(exc))) from exc
    missing = [h for h in REQUIRED_HOOKS if not getattr(pm.hook, h).get_hookimpls()]
    if missing:
        raise BackendLoadError(name, dist, "it does not implement %s" % ", ".join(missing), hook=missing[0])
    return pm


def _hook_in(text: str) -> Optional[str]:
    match = re.search(r"(sandbox_\w+)", text)
    return match.group(1) if match else None


def _one_line(exc: BaseException) -> str:
    """pluggy's message on one line: its later lines say WHICH argument is wrong, so keep them."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


@dataclass(frozen=True)
class BackendInfo:
    """What ``metaflow-sandbox backends`` shows for one backend."""

    name: str
    distribution: str
    version: str
    module: str
    hooks: tuple[str, ...] = ()
    loads: bool = False
    configured: Optional[bool] = None
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def describe_backends(options_for: Optional[Mapping[str, Mapping[str, Any]]] = None) -> list[BackendInfo]:
    """Load each installed backend in turn; a broken one is reported, never raised."""
    infos = []
    for name, eps in available_backends().items():
        ep = eps[0]
        dist = ", ".join(_dist_name(e) for e in eps)
        version = ep.dist.version if ep.dist is not None else "?"
        try:
            pm = get_plugin_manager(name)
        except SandboxError as exc:
            infos.append(BackendInfo(name, dist, version, ep.value, error=exc.message))
            continue
        hooks = tuple(h for h in REQUIRED_HOOKS + OPTIONAL_HOOKS if getattr(pm.hook, h).get_hookimpls())
        configured: Optional[bool] = None
        error = None
        if "sandbox_check_config" in hooks:
            try:
                configured = bool(pm.hook.sandbox_check_config(options=dict((options_for or {}).get(name, {}))))
            except SandboxError as exc:
                configured, error = False, str(exc)
        infos.append(BackendInfo(name, dist, version, ep.value, hooks, True, configured, error))
    return infos
