"""The Daytona emulator as a session fixture: the real SDK talks to it over real HTTP."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from metaflow_sandbox_daytona.emulator import EmulatorHandle, start_emulator


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorHandle]:
    with start_emulator(port=0) as emu:
        yield emu


@pytest.fixture(scope="session", autouse=True)
def daytona_env(emulator: EmulatorHandle) -> Iterator[dict[str, str]]:
    """DAYTONA_API_URL/KEY/TARGET pointing at the emulator, for every test of this directory."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in emulator.env.items():
            mp.setenv(key, value)
        yield emulator.env


@pytest.fixture(autouse=True)
def no_faults(emulator: EmulatorHandle) -> Iterator[None]:
    """Every test starts and ends with the emulator's faults switched off."""
    emulator.clear_faults()
    yield
    emulator.clear_faults()


@pytest.fixture(scope="module", autouse=True)
def no_leftovers(emulator: EmulatorHandle) -> Iterator[None]:
    """After each test module the emulator holds no live sandbox."""
    yield
    left = emulator.live_sandboxes()
    assert left == [], "sandboxes left alive after this module: %s" % [s["id"] for s in left]


def pytest_report_header() -> str:
    return "daytona emulator: real daytona SDK over HTTP (DAYTONA_API_URL is set per session); cwd=%s" % os.getcwd()
