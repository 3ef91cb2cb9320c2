"""What every emulator knows about one emulated sandbox: identity, labels, lease, how and when it ended."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from ..session import Sandbox


@dataclasses.dataclass(eq=False)
class EmulatedSandbox:
    """One emulated sandbox, backed by one ``local`` sandbox. Providers subclass it for their own state.

    The lease is counted in provider seconds from ``lease_start`` and scaled to real time by the
    fault schedule's ``time_scale`` when it is read, so changing the clock speed moves every lease.
    """

    id: str
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    request: dict[str, Any] = dataclasses.field(default_factory=dict)
    local: Optional[Sandbox] = None
    workdir: str = ""
    created: float = dataclasses.field(default_factory=time.time)
    lease_start: float = dataclasses.field(default_factory=time.monotonic)
    #: Provider seconds the sandbox may live from ``lease_start`` (None: no lease).
    lease_seconds: Optional[float] = None
    #: When and why it ended (wall time; "deleted", "expired", "vanished", "shutdown", or a provider's reason).
    ended: Optional[float] = None
    reason: Optional[str] = None
    #: Exec ids of the commands running in it (``LocalRunner.start``).
    running: set[str] = dataclasses.field(default_factory=set)

    @property
    def alive(self) -> bool:
        return self.ended is None

    def expires_at(self, time_scale: float) -> Optional[float]:
        """The monotonic time its lease runs out, or None."""
        if self.lease_seconds is None:
            return None
        return self.lease_start + self.lease_seconds * time_scale

    def renew(self, seconds: Optional[float]) -> None:
        self.lease_start, self.lease_seconds = time.monotonic(), seconds

    def view(self, time_scale: float) -> dict[str, Any]:
        """The admin API's view (``live_sandboxes`` / ``records``); providers add their own fields."""
        expires = self.expires_at(time_scale)
        return {
            "id": self.id,
            "labels": dict(self.labels),
            "request": self.request,
            "workdir": self.workdir,
            "created": self.created,
            "expires_in": None if expires is None else round(expires - time.monotonic(), 3),
            "ended": self.ended,
            "reason": self.reason,
        }
