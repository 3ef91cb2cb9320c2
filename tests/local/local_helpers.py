"""Helpers shared by the local backend tests (host-side process checks, CLI runner)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable

PY = sys.executable


def pids_with(token: str) -> list[int]:
    """Host pids of processes running ``PROG ARG...`` where ``token`` is "PROG ARG" (e.g. "sleep 317.5"),
    to see a sandbox's processes from outside it."""
    prog, _, arg = token.partition(" ")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if os.path.basename(argv[0]) == prog and arg in argv[1:]:
                found.append(int(entry))
    return found


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def run_cli(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "metaflow_sandbox", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,  # type: ignore
    )
