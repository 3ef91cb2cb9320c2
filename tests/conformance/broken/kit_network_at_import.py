"""A backend that connects at import time (the kit must catch it even though it swallows the error)."""

import socket

try:
    socket.create_connection(("127.0.0.1", 9), timeout=0.2).close()
except OSError:
    pass

from kit_broken_backends import Good  # noqa: E402

NET = Good("network-at-import")
