"""An offline emulator of the Daytona API that the real ``daytona`` SDK talks to, built on ``metaflow_sandbox.emulation``.

    from metaflow_sandbox_daytona.emulator import start_emulator
    with start_emulator(latency_ms=5) as emu:
        os.environ.update(emu.env)      # DAYTONA_API_URL / DAYTONA_API_KEY / DAYTONA_TARGET / NO_PROXY
        ...
        emu.live_sandboxes()            # [{"id", "labels", "state", ...}] not yet ended
        emu.set_faults(error_next=2, error_endpoints=["list"])   # merges; emu.clear_faults() resets all

The server runs in a subprocess (``python -m metaflow_sandbox_daytona.emulator``); this module imports
neither aiohttp nor the SDK. Commands run in sandboxes of the core's ``local`` backend. Switches: ``faults.DaytonaFaults``.
"""

from __future__ import annotations

from typing import Any

from metaflow_sandbox.emulation import DEFAULT_KEY, EmulatorHandle, launch

from .faults import DaytonaFaults


def start_emulator(
    port: int = 0, api_key: str = DEFAULT_KEY, timeout: float = 30.0, bare_base: bool = False, **faults: Any
) -> EmulatorHandle:
    """Start the emulator on 127.0.0.1 in a subprocess and return once it serves.

    ``bare_base=True``: sandboxes start from a stdlib-only Python without pip (``emu.pip_attempts()``
    lists what tried), as a real default image lacks the launcher's packages.
    """
    DaytonaFaults().set(**faults)  # a misspelt switch fails here, in this process
    args = ["--port", str(port), "--api-key", api_key] + (["--bare-base"] if bare_base else [])
    return launch("metaflow_sandbox_daytona.emulator", args, faults, timeout)


__all__ = ["DaytonaFaults", "EmulatorHandle", "start_emulator"]
