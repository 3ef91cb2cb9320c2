"""E2B's fault switches: the toolkit's schedule, E2B's endpoint names and its own switches."""

from __future__ import annotations

import dataclasses
from typing import Optional

from metaflow_sandbox.emulation import FaultSchedule

#: The REST control plane (the default target of injected errors).
API_ENDPOINTS = ("create", "list", "get", "delete", "timeout", "connect", "templates")
#: envd, the in-sandbox agent: "exec" starts a command (Process/Start), "attach" reattaches to one (Process/Connect).
ENVD_ENDPOINTS = ("health", "upload", "download", "exec", "attach", "signal", "processes", "stat", "other")


@dataclasses.dataclass
class E2BFaults(FaultSchedule):
    ENDPOINTS = API_ENDPOINTS + ENVD_ENDPOINTS

    error_endpoints: tuple[str, ...] = API_ENDPOINTS
    lost_reply_endpoints: tuple[str, ...] = ("create",)
    #: Abort command streams (Process/Start and Connect) this many seconds after they open...
    drop_stream_after: Optional[float] = None
    #: ...but only the next N of them (None: every one).
    drop_streams: Optional[int] = None
    #: Overrides the client's keepalive-ping-interval (seconds).
    keepalive_every: Optional[float] = None

    def take_stream_drop(self) -> bool:
        """Whether to drop one more stream (a countdown unless ``drop_streams`` is None)."""
        if self.drop_streams is None:
            return True
        if self.drop_streams > 0:
            self.drop_streams -= 1
            return True
        return False
