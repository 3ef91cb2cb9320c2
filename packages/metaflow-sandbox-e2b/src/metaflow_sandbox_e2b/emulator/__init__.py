"""An offline E2B emulator that the real ``e2b`` SDK talks to over HTTP, built on ``metaflow_sandbox.emulation``.

    from metaflow_sandbox_e2b.emulator import start_emulator
    with start_emulator(latency_ms=50) as emu:
        os.environ.update(emu.env)      # E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL, NO_PROXY
        ...
        emu.live_sandboxes()            # [{"id", "labels", "state", "template", ...}]
        emu.set_faults(error_rate=0.3)  # merges; emu.clear_faults() resets all

Templates are really built (``Template.build``: pip install steps into an image directory; see
``templates``); ``bare_base=True`` gives sandboxes a stdlib-only Python where pip fails, as a task on
E2B's stock image would find no boto3.

The server runs in a subprocess (REST API and envd on two ports; commands run in `local` backend
sandboxes) and exits by itself if this process dies. Switches: ``faults.E2BFaults``.
"""

from __future__ import annotations

from typing import Any, Optional

from metaflow_sandbox.emulation import DEFAULT_KEY, EmulatorHandle, launch

from .faults import API_ENDPOINTS, ENVD_ENDPOINTS, E2BFaults


def start_emulator(
    port: int = 0,
    *,
    envd_port: int = 0,
    api_key: str = DEFAULT_KEY,
    plan: str = "hobby",
    max_sandboxes: Optional[int] = None,
    templates: Optional[dict[str, tuple[int, int]]] = None,
    bare_base: bool = False,
    timeout: float = 30.0,
    **faults: Any,
) -> EmulatorHandle:
    """Start the emulator on 127.0.0.1 in a subprocess and return once it serves."""
    E2BFaults().set(**faults)  # a misspelt switch fails here, in this process
    args = ["--port", str(port), "--envd-port", str(envd_port), "--api-key", api_key, "--plan", plan]
    if max_sandboxes is not None:
        args += ["--max-sandboxes", str(max_sandboxes)]
    if bare_base:
        args.append("--bare-base")
    for name, (cpu, mem) in (templates or {}).items():
        args += ["--template", "%s=%d:%d" % (name, cpu, mem)]
    return launch("metaflow_sandbox_e2b.emulator", args, faults, timeout)


__all__ = ["API_ENDPOINTS", "ENVD_ENDPOINTS", "E2BFaults", "EmulatorHandle", "start_emulator"]
