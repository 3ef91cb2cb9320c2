"""Daytona's fault switches: the toolkit's schedule, its endpoint names and Daytona's own switches."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from metaflow_sandbox.emulation import FaultSchedule


@dataclasses.dataclass
class DaytonaFaults(FaultSchedule):
    #: Control plane: create, get, list, delete, lifecycle (stop/start/intervals/labels), snapshot, socketio;
    #: toolbox: exec (starting a command), session, command (its status), logs, upload, download, info.
    ENDPOINTS = (
        *("create", "get", "list", "delete", "lifecycle", "snapshot", "socketio"),
        *("session", "exec", "command", "logs", "upload", "download", "info"),
    )

    error_endpoints: tuple[str, ...] = ("list", "get")
    lost_reply_endpoints: tuple[str, ...] = ("create",)
    #: Close the next N log WebSockets early (True: all of them), with ``drop_close_code``.
    drop_log_stream: Union[int, bool] = 0
    drop_close_code: int = 1000
    #: The next N session commands report exit code -1 (Daytona's "could not run it").
    exit_minus_one_next: int = 0
    #: GET polls an image create stays in "creating" before "started" (the server-side build)...
    image_build_polls: int = 1
    #: ...or this long, whichever comes first; the change is pushed over socket.io.
    image_build_ms: float = 100.0
    #: Serve socket.io (the SDK's event stream); False answers 404 so the SDK falls back to polling.
    socketio: bool = True

    def error_for(self, endpoint: str) -> Optional[int]:
        """An outage spares the SDK's event stream (losing it is the ``socketio`` switch's job)."""
        if self.outage and endpoint == "socketio":
            return None
        return super().error_for(endpoint)
