"""A toolkit for emulating a sandbox provider's API, so the provider's real SDK can be tested offline.

What every emulator shares lives here, once; a provider's package keeps only its protocol:

- :class:`FaultSchedule` (``faults``): switches, validated endpoint names, one set/clear rule, seeded fates;
- :func:`launch` and :class:`EmulatorHandle` (``handle``): the child process, its ready handshake,
  exit with the launcher, and the admin client (``/_emulator/``);
- :class:`LocalRunner` (``local``): emulated sandboxes as ``local`` sandboxes, with their resources enforced;
- :class:`ImageStore`, :class:`Image`, :class:`BareBase` (``images``): images built by real pip installs
  (a provider's snapshots or templates), and a stdlib-only base where pip is a recording shim;
- :class:`EmulatedSandbox` (``sandboxes``): identity, labels, lease, end;
- ``server.EmulatorServer``: the request log, latency and injected faults, the admin API, TTL reaping
  and the process's main loop. It needs aiohttp (``pip install 'metaflow-sandbox[emulator]'``), so it
  is not imported here.

See docs/adding-a-backend.md, "Emulating your provider".
"""

from .faults import FaultSchedule
from .handle import ADMIN, DEFAULT_KEY, EmulatorHandle, launch
from .images import BareBase, Image, ImageStore
from .local import LocalRunner
from .sandboxes import EmulatedSandbox

__all__ = [
    "ADMIN",
    "DEFAULT_KEY",
    "BareBase",
    "EmulatedSandbox",
    "EmulatorHandle",
    "FaultSchedule",
    "Image",
    "ImageStore",
    "LocalRunner",
    "launch",
]
