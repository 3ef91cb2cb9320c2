"""Prepared environments on E2B: one template per (environment, resource class), built through ``Template.build``.

E2B sizes a sandbox by its template, so an environment is built once per resource class it runs in:
``mfsb-env-<key>-c<cpu>-m<memory MB>``. The definition is ``Template().from_python_image(python)``
(or ``.from_image(image)`` when the step names one, or ``.from_template(t)`` under the ``template``
option) followed by one ``pip install`` step. Other launchers (and other machines) find it by that
name in the team's template list; a build already running under that name is waited for, not repeated.
"""

from __future__ import annotations

import collections
import shlex
import threading
import time
from typing import Any, Callable, Mapping, Optional

from metaflow_sandbox import (
    ENVIRONMENT_LABEL,
    MARKER_LABEL,
    EnvironmentBuildError,
    EnvironmentSpec,
    PreparedEnvironment,
)

from .settings import NAME, Settings, require_key, settings
from .templates import environment_template_name, resource_class

#: Template names we built start with this (``EnvironmentSpec.name``'s prefix).
PREFIX = "mfsb-env-"
#: Lines of the build log an EnvironmentBuildError carries.
LOG_TAIL = 40
#: How often another launcher's build is polled, and how long one may sit requested but unstarted.
POLL_SECONDS = 0.5
STALE_WAITING_SECONDS = 60.0
_STATES = {"ready": "ready", "building": "building", "waiting": "building", "error": "failed"}
_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def _lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks[name]


def definition(env: EnvironmentSpec, s: Settings) -> Any:
    """The E2B template definition: a base Python (or the step's image) plus one pip install step."""
    from e2b import Template

    if s.template:
        tpl = Template().from_template(s.template)
    elif env.image:
        tpl = Template().from_image(env.image)
    else:
        tpl = Template().from_python_image(env.python_version)
    requirements = sorted(set(env.requirements))
    # The SDK joins pip_install's names with spaces into a shell command: quote each (">=" is a redirect);
    # an option line of a requirements file ("--extra-index-url URL") stays an option and its value.
    words = [shlex.quote(w) for r in requirements for w in (shlex.split(r) if r.lstrip().startswith("-") else [r])]
    return tpl.pip_install(words) if words else tpl


def template_name(env: EnvironmentSpec, s: Settings) -> str:
    cpu, memory_mb = resource_class(env.resources, s)
    return environment_template_name(env.name, cpu, memory_mb, s.template)


def _client(s: Settings) -> Any:
    from e2b.api.client_sync import get_api_client
    from e2b.connection_config import ConnectionConfig

    return get_api_client(ConnectionConfig(**s.api_params()))


def _templates(s: Settings) -> list[Any]:
    """Every template of the team (``GET /templates``), as the SDK's API models."""
    from e2b.api import handle_api_exception
    from e2b.api.client.api.templates import get_templates
    from e2b.exceptions import TemplateException

    res = get_templates.sync_detailed(client=_client(s))
    if res.status_code >= 300 or res.parsed is None or not isinstance(res.parsed, list):
        raise handle_api_exception(res, TemplateException)
    return list(res.parsed)


def _names(t: Any) -> list[str]:
    return [str(n).split(":", 1)[0] for n in list(t.names or []) + list(t.aliases or [])]


def _find(name: str, s: Settings) -> Optional[Any]:
    for t in _templates(s):
        if name in _names(t):
            return t
    return None


def _status(t: Any) -> str:
    return str(getattr(t.build_status, "value", t.build_status))


def _prepared(t: Any, name: str, built: bool) -> PreparedEnvironment:
    key = name[len(PREFIX) : len(PREFIX) + 16] if name.startswith(PREFIX) else ""
    last = t.last_spawned_at if not isinstance(t.last_spawned_at, (str, type(None))) else None
    return PreparedEnvironment(
        backend=NAME,
        ref=name,
        key=key,
        state=_STATES.get(_status(t), "failed"),
        built=built,
        created_at=t.created_at.timestamp(),
        last_used_at=last.timestamp() if last is not None else None,
        size_bytes=int(t.disk_size_mb) * 1024 * 1024 if t.disk_size_mb else None,
        detail="template %s, %d vCPU, %d MB, build %s" % (t.template_id, t.cpu_count, t.memory_mb, _status(t)),
        labels={MARKER_LABEL: "1", ENVIRONMENT_LABEL: key} if key else {},
    )


def prepare(env: EnvironmentSpec, on_log: Optional[Callable[[str], None]]) -> PreparedEnvironment:
    """Find the template by name or build it; wait for a build someone else started under that name."""
    from e2b import BuildException

    from ._client import translated

    s = settings(env.options)
    require_key(s)
    name = template_name(env, s)
    cpu, memory_mb = resource_class(env.resources, s)
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)

    def log(entry: Any) -> None:
        line = "%s\n" % getattr(entry, "message", entry)
        tail.append(line)
        if on_log is not None:
            on_log(line)

    with _lock(name):
        with translated("template list", retry_safe=True, s=s):
            found = _find(name, s)
        if found is not None and _status(found) in ("building", "waiting"):
            if _wait_for(found, s, log):
                with translated("template list", retry_safe=True, s=s):
                    found = _find(name, s)
        if found is not None and _status(found) == "ready":
            return _prepared(found, name, built=False)
        started = time.time()
        try:
            with translated("template build", s=s):
                try:
                    sdk_template = definition(env, s)
                    from e2b import Template

                    Template.build(sdk_template, name=name, cpu_count=cpu, memory_mb=memory_mb, on_build_logs=log, **s.api_params())
                except BuildException as exc:
                    raise _build_error(name, exc, tail, time.time() - started) from exc
        except EnvironmentBuildError:
            _remove_failed(name, s)
            raise
        with translated("template list", retry_safe=True, s=s):
            done = _find(name, s)
        if done is None:
            raise EnvironmentBuildError(
                "E2B reported template %s built, but it is not in the team's template list" % name,
                hint="retry the run; if it persists, check the E2B dashboard for the template",
                backend=NAME,
                op="sandbox_environment_prepare",
            )
        return _prepared(done, name, built=True)


def _wait_for(t: Any, s: Settings, log: Callable[[Any], None]) -> bool:
    """Follow another launcher's build of the same name (its log too); True if it ended ready.

    A build still ``waiting`` (requested, never started: its launcher may have died in between) for
    ``STALE_WAITING_SECONDS`` is given up on, and this launcher builds instead.
    """
    from e2b import BuildException
    from e2b.template_sync.build_api import get_build_status

    log("waiting for the build of %s that another launcher started (build %s)" % (_names(t)[0], t.build_id))
    client, offset, since = _client(s), 0, time.monotonic()
    while True:
        try:
            status = get_build_status(client, t.template_id, str(t.build_id), offset)
        except BuildException:
            return False
        offset += len(status.log_entries)
        for entry in status.log_entries:
            log(entry)
        state = str(getattr(status.status, "value", status.status))
        if state == "ready":
            return True
        if state == "error" or (state == "waiting" and time.monotonic() - since > STALE_WAITING_SECONDS):
            log("that build %s; building it here" % ("failed" if state == "error" else "never started"))
            return False
        time.sleep(POLL_SECONDS)


def _build_error(name: str, exc: BaseException, tail: collections.deque[str], elapsed: float) -> EnvironmentBuildError:
    reason = str(exc).strip() or type(exc).__name__
    return EnvironmentBuildError(
        "building E2B template %s failed after %.0f s: %s" % (name, elapsed, reason),
        build_log="".join(tail),
        hint="fix the step's packages= / requirements_file= (the build log shows pip's error), "
        "or skip preparing with @sandbox(prepare=False) or METAFLOW_SANDBOX_PREPARE=0",
        backend=NAME,
        op="sandbox_environment_prepare",
    )


def _remove_failed(name: str, s: Settings) -> None:
    """A failed build leaves no template behind (unless another build of it is ready or still running)."""
    try:
        t = _find(name, s)
        if t is not None and _status(t) == "error":
            _delete(t.template_id, s)
    except Exception:  # best effort: a failed template is never taken for a ready one anyway
        pass


def _delete(template_id: str, s: Settings) -> bool:
    from e2b.api import encode_path_param, handle_api_exception
    from e2b.api.client.api.templates import delete_templates_template_id
    from e2b.exceptions import TemplateException

    res = delete_templates_template_id.sync_detailed(template_id=encode_path_param(template_id), client=_client(s))
    if res.status_code == 404:
        return False
    if res.status_code >= 300:
        raise handle_api_exception(res, TemplateException)
    return True


def environments(options: Mapping[str, Any]) -> list[PreparedEnvironment]:
    from ._client import translated

    s = settings(options)
    require_key(s)
    with translated("template list", retry_safe=True, s=s):
        out = []
        for t in _templates(s):
            ours = [n for n in _names(t) if n.startswith(PREFIX)]
            if ours:
                out.append(_prepared(t, ours[0], built=False))
    return sorted(out, key=lambda e: (e.created_at or 0, e.ref))


def remove(ref: str, options: Mapping[str, Any]) -> bool:
    """Delete our template ``ref`` (a name we built); False if it is already gone."""
    from ._client import translated

    s = settings(options)
    require_key(s)
    if not ref.startswith(PREFIX):
        from metaflow_sandbox import UnsupportedOptionError

        raise UnsupportedOptionError(
            "%r is not a prepared environment (their names start with %s)" % (ref, PREFIX),
            hint="list them with `metaflow-sandbox environments list --backend e2b`",
            backend=NAME,
        )
    with translated("template delete", retry_safe=True, s=s):
        t = _find(ref, s)
        return False if t is None else _delete(t.template_id, s)
