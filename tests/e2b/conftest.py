"""The E2B emulator as a session fixture: the real, unpatched e2b SDK talks to it over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from metaflow_sandbox_e2b.emulator import EmulatorHandle, start_emulator


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorHandle]:
    with start_emulator(port=0, templates={"custom-big": (4, 4096)}) as emu:
        yield emu


@pytest.fixture(scope="session", autouse=True)
def e2b_env(emulator: EmulatorHandle) -> Iterator[dict[str, str]]:
    """E2B_API_KEY/E2B_API_URL/E2B_SANDBOX_URL (+ NO_PROXY) pointing at the emulator, for every test here."""
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


def _execs(emulator: EmulatorHandle, sandbox_id: str) -> int:
    """How many commands the emulator started in this sandbox (Process/Start calls)."""
    (view,) = [s for s in emulator.records() if s["id"] == sandbox_id]
    return int(view["execs"])


@pytest.fixture(scope="module", autouse=True)
def no_leftovers(emulator: EmulatorHandle) -> Iterator[None]:
    """After each test module the emulator holds no live sandbox."""
    yield
    left = emulator.live_sandboxes()
    assert left == [], "sandboxes left alive after this module: %s" % [s["id"] for s in left]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (still part of CI)")
