"""The cross-process quota (core ``limits_rate``) as Daytona uses it: real processes, real flock, real emulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from metaflow_sandbox import MARKER_LABEL, Backend, SandboxError, SandboxSpec
from metaflow_sandbox.limits_rate import Limiter, limiter_for


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path, monkeypatch):
    """Each test's slots live in its own directory (children inherit it)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))


TASK = textwrap.dedent(
    """
    import os, sys, time
    from metaflow_sandbox import Backend, SandboxSpec
    backend = Backend("daytona", options={"concurrency": 2})
    backend.capabilities()
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):  # all tasks create at once, however slow their imports were
        time.sleep(0.05)
    with backend.create(SandboxSpec(labels={"metaflow-sandbox": "1", "run": sys.argv[1]})) as sb:
        sb.run(["sleep", "1"])
    """
)


def test_concurrency_holds_across_processes(emulator, tmp_path):
    """Five task processes, concurrency 2: the emulator never sees more than 2 of their sandboxes at once."""
    run, go = uuid.uuid4().hex[:8], tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", TASK, run, str(go)], stdout=subprocess.PIPE, text=True) for _ in range(5)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            live = [s for s in emulator.live_sandboxes() if s["labels"].get("run") == run]
            peak[0] = max(peak[0], len(live))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert [p.wait(300) for p in procs] == [0] * 5
    finally:
        stop.set()
        watcher.join()
    made = [r for r in emulator.records() if r["labels"].get("run") == run]
    assert len(made) == 5 and all(r["ended"] for r in made)
    assert peak[0] == 2, "expected at most (and, with 5 waiting tasks, exactly) 2 live sandboxes; saw %d" % peak[0]


HOLDER = textwrap.dedent(
    """
    import time
    from metaflow_sandbox.limits_rate import Limiter
    slot = Limiter("test-backend", concurrency=1).acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_a_sigkilled_holder_frees_its_slot_and_waiting_is_bounded():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(SandboxError) as err:
            Limiter("test-backend", concurrency=1, wait=0.5).acquire()
        assert 0.4 < time.monotonic() - start < 3
        text = str(err.value)
        assert "METAFLOW_SANDBOX_TEST_BACKEND_CONCURRENCY" in text and "LIMIT_WAIT" in text and "--max-workers" in text
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        slot = Limiter("test-backend", concurrency=1, wait=5).acquire()  # the kernel released the dead holder's lock
        slot.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


BURST = textwrap.dedent(
    """
    from metaflow_sandbox.limits_rate import Limiter
    for _ in range(15):
        Limiter("rate-backend", per_minute=1200).acquire()
    """
)


def test_create_rate_is_shared_across_processes():
    """1200/min = 20/s with a burst of 20: 2 processes x 15 creates cannot finish in under ~0.5 s."""
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", BURST]) for _ in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    elapsed = time.monotonic() - start
    assert elapsed >= 0.45, "30 tokens at 20/s after a burst of 20 need >= 0.5 s; took %.2fs" % elapsed


@pytest.mark.parametrize(
    "options, fix",
    [
        ({"concurrency": "-1"}, "METAFLOW_SANDBOX_DAYTONA_CONCURRENCY"),
        ({"concurrency": "lots"}, "METAFLOW_SANDBOX_DAYTONA_CONCURRENCY"),
        ({"create_rate": "inf"}, "METAFLOW_SANDBOX_DAYTONA_CREATE_RATE"),
        ({"limit_wait": "0"}, "METAFLOW_SANDBOX_DAYTONA_LIMIT_WAIT"),
        ({"retry_attempts": "0"}, "METAFLOW_SANDBOX_DAYTONA_RETRY_ATTEMPTS"),
        ({"retry_seconds": "nan"}, "METAFLOW_SANDBOX_DAYTONA_RETRY_SECONDS"),
    ],
)
def test_bad_limit_options_are_refused_before_any_create(emulator, options, fix):
    before = len(emulator.records())
    with pytest.raises(SandboxError) as err:
        Backend("daytona", options=options).create(SandboxSpec(labels={MARKER_LABEL: "1"}))
    assert fix in str(err.value) and "Fix:" in str(err.value)
    assert len(emulator.records()) == before


def test_daytona_declares_its_published_quotas_and_options_override_them():
    caps = Backend("daytona").capabilities()
    assert (caps.max_concurrent_sandboxes, caps.max_creates_per_minute) == (10, 600.0)
    assert limiter_for("daytona", caps, {}) == Limiter("daytona", 10, 600.0)
    assert limiter_for("daytona", caps, {"concurrency": "0", "create_rate": "0"}) == Limiter("daytona", None, None)


def test_cost_of_a_slot_is_small():
    """Taking and giving back a slot and a token is a few file operations (~0.5 ms on an idle machine); the bound
    is loose for loaded CI machines but below the 20 ms a create would lose to one wait for a slot."""
    limiter = Limiter("cost-backend", concurrency=10, per_minute=10**9)
    limiter.acquire().release()
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        limiter.acquire().release()
    per_call = (time.perf_counter() - start) / n
    print("limits_rate: acquire+release %.3f ms" % (per_call * 1000))
    assert per_call < 0.015


@pytest.mark.parametrize("key", ["retry_attempts", "retry_seconds", "lease_renew_seconds", "concurrency", "create_rate", "limit_wait"])
def test_bad_daytona_options_are_refused_by_check_config(key):
    """check_config runs at launch (before any task): a bad number is refused there, naming the setting."""
    with pytest.raises(SandboxError) as err:
        Backend("daytona", options={key: "-3"}).check_config()
    assert "METAFLOW_SANDBOX_DAYTONA_%s" % key.upper() in str(err.value)
