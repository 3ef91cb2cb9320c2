"""Backend options (``METAFLOW_SANDBOX_E2B_<KEY>`` -> ``options[key]``), E2B's env vars and plan limits.

No SDK import and no network: ``check_config`` and ``capabilities`` are built from this alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from metaflow_sandbox import BackendNotConfiguredError, UnsupportedOptionError, read_number_option, read_option

NAME = "e2b"


@dataclasses.dataclass(frozen=True)
class Plan:
    """E2B plan limits (docs: sandbox/rate-limits, the SDK's create() docstring)."""

    max_ttl_seconds: int
    max_cpu: int
    max_memory_mb: int
    #: https://e2b.dev/docs/sandbox/rate-limits: "Concurrent sandboxes: Hobby 20, Pro 100 (up to 1,100
    #: with an add-on)" and "Sandbox creation rate: Hobby 1 / sec, Pro 5 / sec". Above them E2B answers 429.
    max_concurrent_sandboxes: int = 20
    max_creates_per_minute: float = 60.0


PLANS = {
    "hobby": Plan(max_ttl_seconds=3600, max_cpu=8, max_memory_mb=8192, max_concurrent_sandboxes=20, max_creates_per_minute=60.0),
    "pro": Plan(max_ttl_seconds=86400, max_cpu=8, max_memory_mb=16384, max_concurrent_sandboxes=100, max_creates_per_minute=300.0),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    api_key: str | None
    api_url: str | None
    sandbox_url: str | None
    domain: str | None
    plan_name: str
    plan: Plan
    template: str | None
    #: Overrides ``SandboxSpec.lease_seconds`` (the core's METAFLOW_SANDBOX_LEASE_SECONDS) when set:
    #: the sandbox's E2B timeout, renewed while its owner lives, so an orphan ends within one lease.
    lease_seconds: int | None
    #: Seconds between lease renewals; None: a sixth of the lease (several tries before it runs out).
    renew_seconds: float | None
    default_ttl_seconds: int
    request_timeout: float
    workdir: str | None

    @property
    def api_endpoint(self) -> str:
        """Where the REST API is, as the SDK resolves it (for error messages)."""
        return self.api_url or "https://api.%s" % (self.domain or "e2b.app")

    @property
    def sandbox_endpoint(self) -> str:
        """Where envd is reached, as the SDK resolves it (for error messages)."""
        return self.sandbox_url or "https://<port>-<sandbox id>.%s" % (self.domain or "e2b.app")

    def api_params(self) -> dict[str, Any]:
        """Keyword arguments every SDK call gets (classmethods do not inherit them)."""
        params: dict[str, Any] = {"api_key": self.api_key, "request_timeout": self.request_timeout}
        for key in ("api_url", "sandbox_url", "domain"):
            if getattr(self, key):
                params[key] = getattr(self, key)
        return params


def _opt(options: Mapping[str, Any], key: str, env: str | None = None) -> str | None:
    """``options[key]``, else ``METAFLOW_SANDBOX_E2B_<KEY>``, else E2B's own ``env`` (metaflow_sandbox.read_option)."""
    return read_option(options, NAME, key, (env,) if env else ())


def _number(options: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    """A finite number in [low, high] from option ``key``, or None if unset; anything else names the fix."""
    return read_number_option(options, NAME, key, None, low, high)


def _int(options: Mapping[str, Any], key: str, default: int) -> int:
    value = _number(options, key, 1, 10**9)
    return default if value is None else int(value)


def _positive(options: Mapping[str, Any], key: str) -> int | None:
    value = _number(options, key, 1, 86400)
    return None if value is None else int(value)


def settings(options: Mapping[str, Any]) -> Settings:
    plan_name = (_opt(options, "plan", "METAFLOW_SANDBOX_E2B_PLAN") or "hobby").lower()
    if plan_name not in PLANS:
        raise UnsupportedOptionError(
            "unknown E2B plan %r" % plan_name,
            hint="set METAFLOW_SANDBOX_E2B_PLAN to one of %s" % ", ".join(sorted(PLANS)),
            backend=NAME,
        )
    base = PLANS[plan_name]
    plan = dataclasses.replace(
        base,
        max_ttl_seconds=_int(options, "max_ttl_seconds", base.max_ttl_seconds),
        max_cpu=_int(options, "max_cpu", base.max_cpu),
        max_memory_mb=_int(options, "max_memory_mb", base.max_memory_mb),
    )
    return Settings(
        api_key=_opt(options, "api_key", "E2B_API_KEY"),
        api_url=_opt(options, "api_url", "E2B_API_URL"),
        sandbox_url=_opt(options, "sandbox_url", "E2B_SANDBOX_URL"),
        domain=_opt(options, "domain", "E2B_DOMAIN"),
        plan_name=plan_name,
        plan=plan,
        template=_opt(options, "template"),
        lease_seconds=_positive(options, "lease_seconds"),
        renew_seconds=_number(options, "renew_seconds", 0.1, 3600),
        default_ttl_seconds=_int(options, "default_ttl_seconds", plan.max_ttl_seconds),
        request_timeout=_number(options, "request_timeout", 1, 3600) or 60.0,
        workdir=_opt(options, "workdir"),
    )


def require_key(s: Settings) -> str:
    if not s.api_key:
        raise BackendNotConfiguredError(NAME, "E2B_API_KEY")
    return s.api_key
