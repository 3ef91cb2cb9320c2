"""The lease: an E2B sandbox whose owner dies by SIGKILL ends by its E2B timeout alone; one whose owner
lives is renewed through long commands and between calls, never past its ttl. Real SDK, real emulator,
real processes and signals; no lifeline here (the reaper is tested in tests/e2e/test_lifeline.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from metaflow_sandbox import MARKER_LABEL, Backend, SandboxNotFoundError, SandboxSpec
from metaflow_sandbox_e2b.emulator import EmulatorHandle

OWNER = textwrap.dedent(
    """
    import sys
    from metaflow_sandbox import Backend, SandboxSpec
    lease = float(sys.argv[2]) if sys.argv[2] != "-" else None
    sb = Backend("e2b").create(SandboxSpec(labels={"metaflow-sandbox": "1", "run": sys.argv[1]}, ttl_seconds=600, lease_seconds=lease))
    print(sb.id, flush=True)
    sb.exec(["sleep", "600"])
    """
)


@pytest.fixture
def labels() -> dict[str, str]:
    return {MARKER_LABEL: "1", "run": uuid.uuid4().hex[:8]}


def _alive(emulator: EmulatorHandle, sandbox_id: str) -> dict | None:
    return next((s for s in emulator.live_sandboxes() if s["id"] == sandbox_id), None)


def _wait_gone(emulator: EmulatorHandle, sandbox_id: str, within: float) -> float:
    start = time.monotonic()
    while _alive(emulator, sandbox_id) is not None:
        assert time.monotonic() - start < within, "sandbox %s still alive %.0fs after its owner died" % (sandbox_id, within)
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.mark.parametrize(
    "lease, env, faults",
    [
        ("3", {}, {}),  # a 3 s lease, real time
        # METAFLOW_SANDBOX_LEASE_SECONDS' minimum (60 s) on an emulator whose clock runs 20x faster:
        # what an end-to-end test uses; the owner renews every second so it would keep a live sandbox.
        ("-", {"METAFLOW_SANDBOX_LEASE_SECONDS": "60", "METAFLOW_SANDBOX_E2B_RENEW_SECONDS": "1"}, {"time_scale": 0.05}),
    ],
    ids=["lease-3s", "lease-60s-time-scale-0.05"],
)
def test_sigkilled_owner_sandbox_ends_by_the_lease_alone(emulator: EmulatorHandle, labels, lease, env, faults) -> None:
    emulator.set_faults(**faults)
    expired = emulator.stats().get("expired", 0)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, labels["run"], lease], stdout=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    try:
        sandbox_id = owner.stdout.readline().strip()  # type: ignore[union-attr]
        assert sandbox_id, "the owner did not create a sandbox"
        time.sleep(4.0)  # > one lease: the live owner's renewals kept it
        assert _alive(emulator, sandbox_id) is not None
        assert 0 < _alive(emulator, sandbox_id)["expires_in"] <= 3.5
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    took = _wait_gone(emulator, sandbox_id, within=8)
    assert took <= 4.5
    assert emulator.stats().get("expired", 0) == expired + 1  # the lease ended it, not a kill


def test_live_owner_renews_through_a_long_command_and_between_calls(emulator: EmulatorHandle, labels) -> None:
    with Backend("e2b").create(SandboxSpec(labels=labels, ttl_seconds=600, lease_seconds=3)) as sb:
        assert 0 < _alive(emulator, sb.id)["expires_in"] <= 3
        assert sb.exec(["sleep", "7"]).exit_code == 0  # 2+ leases inside one command
        time.sleep(5)  # 1+ lease with no call at all: the launcher busy elsewhere (e.g. a long upload)
        sb.write_file(sb.handle.workdir + "/f", b"x")
        assert sb.run(["cat", sb.handle.workdir + "/f"])[:2] == (0, "x")
        assert sb.handle.native.renewals >= 8


def test_renewals_never_reach_past_the_ttl(emulator: EmulatorHandle, labels) -> None:
    sb = Backend("e2b").create(SandboxSpec(labels=labels, ttl_seconds=5, lease_seconds=3))
    start = time.monotonic()
    with pytest.raises(SandboxNotFoundError):
        sb.exec(["sleep", "30"])
    assert 4 <= time.monotonic() - start <= 8
    assert _alive(emulator, sb.id) is None
    sb.destroy()


@pytest.mark.parametrize(
    "env, options, expected",
    [
        ({}, {}, 300),  # the core's default lease
        ({"METAFLOW_SANDBOX_LEASE_SECONDS": "120"}, {}, 120),  # the core's setting
        ({"METAFLOW_SANDBOX_LEASE_SECONDS": "120"}, {"lease_seconds": "90"}, 90),  # the backend option overrides it
    ],
)
def test_the_sandbox_timeout_is_the_lease(
    emulator: EmulatorHandle, labels, monkeypatch: pytest.MonkeyPatch, env, options, expected
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with Backend("e2b", options=options).create(SandboxSpec(labels=labels, ttl_seconds=3000)) as sb:
        assert expected - 5 < _alive(emulator, sb.id)["expires_in"] <= expected
    with Backend("e2b", options=options).create(SandboxSpec(labels=labels, ttl_seconds=30)) as sb:
        assert _alive(emulator, sb.id)["expires_in"] <= 30  # never past the ttl
