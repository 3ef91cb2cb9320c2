"""Fault injection switches, shared by the constructor, the CLI and the admin endpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

#: Endpoint names faults can target (see server.endpoint_name).
ENDPOINTS = (
    "create",
    "get",
    "list",
    "delete",
    "lifecycle",
    "snapshot",
    "session",
    "exec",
    "command",
    "logs",
    "upload",
    "download",
    "info",
)


@dataclass
class Faults:
    latency_ms: float = 0.0
    #: Share (0..1) of requests to ``error_endpoints`` answered with ``error_status``; seeded, so repeatable.
    error_rate: float = 0.0
    #: The next N requests to ``error_endpoints`` are answered with ``error_status`` (fully deterministic).
    error_next: int = 0
    #: One status, or a list to pick from at random (seeded), e.g. [429, 503].
    error_status: Any = 503
    error_endpoints: tuple[str, ...] = ("list", "get")
    #: Seconds sent as ``Retry-After`` with every injected error (None: no header).
    retry_after: Any = None
    #: Share (0..1) / next N requests to ``lost_reply_endpoints`` that are carried out, but whose answer is
    #: replaced by ``lost_reply_status`` (a reply lost on the way back: the client cannot know it happened).
    lost_reply_rate: float = 0.0
    lost_reply_next: int = 0
    lost_reply_status: int = 504
    lost_reply_endpoints: tuple[str, ...] = ("create",)
    seed: int = 0
    #: Close the next N log WebSockets early (True: all of them), with ``drop_close_code``.
    drop_log_stream: Any = 0
    drop_close_code: int = 1000
    #: The next N session commands lose their sandbox ``vanish_delay_ms`` after they start.
    vanish_next_exec: int = 0
    vanish_delay_ms: float = 300.0
    #: The next N session commands report exit code -1 (Daytona's "could not run it").
    exit_minus_one_next: int = 0
    #: Real seconds in one emulated minute (TTL, auto-stop and auto-delete are given in minutes).
    minute_seconds: float = 60.0
    #: GET polls an image create stays in "creating" before "started" (simulates the server-side build)...
    image_build_polls: int = 1
    #: ...or this long, whichever comes first; the change is pushed over socket.io.
    image_build_ms: float = 100.0
    #: Serve socket.io (the SDK's event stream); False answers 404 so the SDK falls back to polling.
    socketio: bool = True
    #: One seeded stream per (switch, endpoint): the n-th request to an endpoint meets the same fate
    #: however requests to other endpoints interleave with it (a concurrent flow stays repeatable).
    _rngs: dict = field(default_factory=dict, repr=False)

    def _rng(self, switch: str, endpoint: str) -> random.Random:
        key = (switch, endpoint)
        if key not in self._rngs:
            self._rngs[key] = random.Random("%s:%s:%s" % (self.seed, switch, endpoint))
        return self._rngs[key]

    def update(self, changes: Mapping[str, Any]) -> None:
        names = {f.name for f in fields(self) if not f.name.startswith("_")}
        unknown = set(changes) - names
        if unknown:
            raise ValueError("unknown fault(s) %s; known: %s" % (sorted(unknown), sorted(names)))
        for key, value in changes.items():
            if key in ("error_endpoints", "lost_reply_endpoints"):
                value = tuple([value] if isinstance(value, str) else value)
            setattr(self, key, value)
        if "seed" in changes:
            self._rngs.clear()

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def error_for(self, endpoint: str) -> int | None:
        """Status to answer instead of serving ``endpoint``, or None."""
        if endpoint not in self.error_endpoints:
            return None
        rng = self._rng("error", endpoint)
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
        return bool(self.lost_reply_rate) and self._rng("lost", endpoint).random() < self.lost_reply_rate

    def take(self, name: str) -> bool:
        """Consume one unit of a countdown switch (True means: inject now)."""
        value = getattr(self, name)
        if value is True:
            return True
        if isinstance(value, (int, float)) and value > 0:
            setattr(self, name, value - 1)
            return True
        return False
