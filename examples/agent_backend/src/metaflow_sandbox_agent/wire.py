"""The agent's protocol: one request per connection, JSON lines both ways, bytes as base64.

Requests: ``{"op": "ping"}``, ``{"op": "exec", "id", "argv", "env", "cwd"}`` (answered by
``{"ev": "out"|"err", "data"}`` events, then ``{"ev": "exit", "code"}``), ``{"op": "kill", "id"}``,
``{"op": "upload", "path"}`` followed by ``{"data"}`` lines and ``{"end": true}`` (answered by
``{"error"}``), ``{"op": "download", "path"}`` (answered by ``{"error"}``, then ``{"data"}`` lines and
``{"end": true}``) and ``{"op": "shutdown"}``. Used by both sides; standard library only.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, BinaryIO, Optional

CHUNK = 1 << 20


def socket_path(sandbox_id: str) -> str:
    """Where a sandbox's agent listens: short (unix socket paths are limited to 107 bytes) and derived from the id."""
    return os.path.join("/tmp", "mfsb-agent-%d" % os.getuid(), sandbox_id + ".sock")


def send(stream: BinaryIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def recv(stream: BinaryIO) -> Optional[dict[str, Any]]:
    """The next message, or None when the other side closed the connection."""
    line = stream.readline()
    return json.loads(line) if line else None


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode(text: str) -> bytes:
    return base64.b64decode(text)
