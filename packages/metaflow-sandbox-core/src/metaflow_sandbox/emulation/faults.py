"""One fault schedule for every emulator: switches, validated endpoint names, one set/clear rule, seeded fates.

A provider's emulator subclasses :class:`FaultSchedule`, declares the endpoint names its requests
are given (``ENDPOINTS``) and adds its own switches as dataclass fields. The rules never change:

- ``set(**changes)`` merges: only the named switches change;
- ``clear()`` puts every switch (seed and countdowns included) back to its default, so no test
  leaks a switch into the next one;
- an unknown switch, or an unknown endpoint in any ``*_endpoints`` list, is a ValueError naming the
  known ones;
- randomness is one seeded stream per (switch, endpoint): the n-th request to an endpoint meets the
  same fate however requests to other endpoints interleave with it, so a concurrent flow is repeatable.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, ClassVar, Optional, Union


@dataclasses.dataclass
class FaultSchedule:
    #: The endpoint names this emulator gives its requests (a subclass declares them).
    ENDPOINTS: ClassVar[tuple[str, ...]] = ()

    #: Milliseconds added to every request (only to ``latency_endpoints``' requests, when any are named).
    latency_ms: float = 0.0
    latency_endpoints: tuple[str, ...] = ()
    #: Share (0..1) of requests to ``error_endpoints`` answered with ``error_status`` (seeded, so repeatable).
    error_rate: float = 0.0
    #: The next N requests to ``error_endpoints`` are answered with ``error_status`` (fully deterministic).
    error_next: int = 0
    #: One status, or a list to pick from at random (seeded), e.g. [429, 503].
    error_status: Union[int, list[int]] = 503
    error_endpoints: tuple[str, ...] = ()
    #: Seconds sent as ``Retry-After`` with every injected error (None: no header).
    retry_after: Optional[float] = None
    #: Share (0..1) / next N requests to ``lost_reply_endpoints`` that are carried out but answered with
    #: ``lost_reply_status``: a reply lost on the way back, so the client cannot know it happened.
    lost_reply_rate: float = 0.0
    lost_reply_next: int = 0
    lost_reply_status: int = 504
    lost_reply_endpoints: tuple[str, ...] = ()
    #: The next N started commands (True: every one) lose their sandbox ``vanish_delay_ms`` after they start.
    vanish_next_exec: Union[int, bool] = 0
    vanish_delay_ms: float = 300.0
    #: The provider is down: every request answers 503 and open streams are cut (the server's job), until
    #: this is set back to False. Sandboxes keep running and their leases keep counting meanwhile.
    outage: bool = False
    #: Real seconds per provider second, for every timer the provider counts (TTL, leases, auto-stop):
    #: 0.01 makes a 5-minute lease last 3 s.
    time_scale: float = 1.0
    seed: int = 0
    _rngs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check(self.as_dict())

    # ---------------------------------------------------------------- the set/clear rule
    @classmethod
    def names(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))

    def set(self, **changes: Any) -> FaultSchedule:
        """Change the named switches only (validated first: a bad call changes nothing)."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError("unknown fault switch(es) %s; known: %s" % (unknown, self.names()))
        merged = dict(self.as_dict(), **changes)
        self._check(merged)
        for key, value in changes.items():
            setattr(self, key, self._normalized(key, value))
        if "seed" in changes:
            self._rngs.clear()
        return self

    def clear(self) -> FaultSchedule:
        """Every switch back to its default, and every random stream restarted."""
        fresh = type(self)()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    def _check(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key.endswith("_endpoints"):
                names = [value] if isinstance(value, str) else list(value)
                unknown = sorted(set(names) - set(self.ENDPOINTS))
                if unknown:
                    raise ValueError("unknown endpoint(s) %s in %s; known: %s" % (unknown, key, sorted(self.ENDPOINTS)))
        if not float(values["time_scale"]) > 0:
            raise ValueError("time_scale must be > 0 (real seconds per provider second), not %r" % values["time_scale"])
        for key in ("error_rate", "lost_reply_rate"):
            if not 0 <= float(values[key]) <= 1:
                raise ValueError("%s is a share of requests, from 0 to 1, not %r" % (key, values[key]))

    @staticmethod
    def _normalized(key: str, value: Any) -> Any:
        if key.endswith("_endpoints"):
            return tuple([value] if isinstance(value, str) else value)
        if key == "error_status" and isinstance(value, (list, tuple)):
            return [int(s) for s in value]
        return value

    # ---------------------------------------------------------------- fates
    def rng(self, switch: str, endpoint: str) -> random.Random:
        """The seeded stream of one switch at one endpoint."""
        key = (switch, endpoint)
        if key not in self._rngs:
            self._rngs[key] = random.Random("%s:%s:%s" % (self.seed, switch, endpoint))
        return self._rngs[key]

    def delays(self, endpoint: str) -> bool:
        """Whether ``latency_ms`` applies to this request."""
        return not self.latency_endpoints or endpoint in self.latency_endpoints

    def error_for(self, endpoint: str) -> Optional[int]:
        """The status to answer instead of serving this request, or None."""
        if self.outage:
            return 503
        if endpoint not in self.error_endpoints:
            return None
        rng = self.rng("error", endpoint)
        if self.error_next > 0:
            self.error_next -= 1
            return self._status(rng)
        if self.error_rate and rng.random() < self.error_rate:
            return self._status(rng)
        return None

    def _status(self, rng: random.Random) -> int:
        if isinstance(self.error_status, (list, tuple)):
            return int(rng.choice(list(self.error_status)))
        return int(self.error_status)

    def lose_reply(self, endpoint: str) -> bool:
        """Whether to carry out this request but answer ``lost_reply_status`` instead of its result."""
        if endpoint not in self.lost_reply_endpoints:
            return False
        if self.lost_reply_next > 0:
            self.lost_reply_next -= 1
            return True
        return bool(self.lost_reply_rate) and self.rng("lost", endpoint).random() < self.lost_reply_rate

    def take(self, name: str) -> bool:
        """Consume one unit of a countdown switch (True means: inject now; a switch set to True never runs out)."""
        value = getattr(self, name)
        if value is True:
            return True
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            setattr(self, name, value - 1)
            return True
        return False

    def scaled(self, provider_seconds: float) -> float:
        """Real seconds for a span the provider counts in its own seconds."""
        return provider_seconds * self.time_scale
