"""Fault injection: rate limits and 5xx are retried only where safe; vanished sandboxes and dropped
streams become clear errors, and user code is never re-run."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from metaflow_sandbox import (
    MARKER_LABEL,
    Backend,
    SandboxError,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
)
from metaflow_sandbox_e2b.emulator import E2BFaults, EmulatorHandle

from .conftest import _execs

#: Every REST and envd endpoint but the command start (Process/Start is never faulted: nothing may re-run it).
ALL_BUT_EXEC = [e for e in E2BFaults.ENDPOINTS if e != "exec"]


@pytest.fixture
def labels() -> dict[str, str]:
    return {MARKER_LABEL: "1", "run": uuid.uuid4().hex[:8]}


@pytest.fixture
def backend() -> Backend:
    return Backend("e2b", backoff=0.05)


def _mine(emulator: EmulatorHandle, labels: dict[str, str]) -> list[str]:
    return [s["id"] for s in emulator.live_sandboxes() if s["labels"].get("run") == labels["run"]]


def test_rate_limits_retried_by_sdk(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    emulator.set_faults(error_next=2, error_status=[429])
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=60)) as sb:
        assert sb.run(["echo", "ok"])[:2] == (0, "ok\n")
    assert emulator.stats().get("injected_429", 0) >= 2


def test_seeded_error_share_on_every_call(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    emulator.set_faults(error_rate=0.3, error_status=[429, 503], seed=7, retry_after=0)
    sandboxes = [backend.create(SandboxSpec(labels=labels, ttl_seconds=60, idempotency_key="k%d-%s" % (i, labels["run"])))
                 for i in range(4)]  # fmt: skip
    assert len(backend.list({"run": labels["run"]})) == 4
    for sb in sandboxes:
        assert sb.destroy() is True
    stats = emulator.stats()
    assert stats.get("injected_429", 0) + stats.get("injected_503", 0) > 0
    assert _mine(emulator, labels) == []


def test_persistent_503_on_create_with_key_is_transient_and_retried(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    """4 SDK attempts fail, the facade retries (the key makes it safe), the next SDK attempt succeeds."""
    emulator.set_faults(error_next=5, error_status=[503])
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=60, idempotency_key="p-" + labels["run"])) as sb:
        assert _mine(emulator, labels) == [sb.id]


def test_persistent_503_on_create_without_key_not_retried(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    emulator.set_faults(error_next=5, error_status=[503])
    with pytest.raises(SandboxError) as info:
        backend.create(SandboxSpec(labels=labels, ttl_seconds=60))
    assert "busy" in str(info.value)
    assert emulator.stats().get("injected_503", 0) >= 4
    emulator.clear_faults()
    assert _mine(emulator, labels) == []


def test_destroy_retried_through_outage(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    sb = backend.create(SandboxSpec(labels=labels, ttl_seconds=60))
    emulator.set_faults(error_next=6, error_status=[503])
    assert sb.destroy() is True
    assert _mine(emulator, labels) == []


def test_sandbox_vanishing_mid_command(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    sb = backend.create(SandboxSpec(labels=labels, ttl_seconds=60))
    emulator.set_faults(vanish_next_exec=True, vanish_delay_ms=1000)
    start = time.monotonic()
    with pytest.raises(SandboxNotFoundError):
        sb.exec(["sh", "-c", "echo started; sleep 20"], timeout=60)
    assert time.monotonic() - start < 10
    assert sb.destroy() is False
    assert emulator.stats().get("vanished", 0) >= 1


def test_dropped_streams_are_reattached_and_the_command_runs_once(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    """Every stream (Start's and each Connect's) is cut after 1 s: the backend reattaches to the running
    command (Process/Connect) each time, sees its later output and its real exit code, and never re-runs it."""
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=120)) as sb:
        runs = sb.handle.workdir + "/runs.txt"
        execs = _execs(emulator, sb.id)
        emulator.set_faults(drop_stream_after=1.0)
        out: list[str] = []
        err: list[str] = []
        result = sb.exec(["sh", "-c", 'echo run >> "$0"; echo begin; sleep 3.5; echo end; exit 3', runs], timeout=60,
                         on_stdout=out.append, on_stderr=err.append)  # fmt: skip
        emulator.clear_faults()
        assert result.exit_code == 3
        assert "begin\n" in out and "end\n" in out
        assert "reattached" in "".join(err)
        assert sb.read_file(runs) == b"run\n"
        stats = emulator.stats()
        assert _execs(emulator, sb.id) == execs + 1  # started once: no hidden retry
        assert stats.get("process_connect", 0) >= 3 and stats.get("stream_dropped", 0) >= 3


def test_stream_lost_while_e2b_is_down_is_a_clear_error_and_not_rerun(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=120)) as sb:
        runs = sb.handle.workdir + "/runs.txt"
        execs = _execs(emulator, sb.id)
        timer = threading.Timer(1.0, lambda: emulator.set_faults(outage=True))
        timer.start()
        with pytest.raises(SandboxError) as info:
            sb.exec(["sh", "-c", 'echo run >> "$0"; sleep 3', runs], timeout=60)
        timer.join()
        emulator.clear_faults()
        assert not isinstance(info.value, (SandboxNotFoundError, SandboxTimeoutError))
        assert "output stream" in str(info.value) and "NOT retried" in str(info.value)
        assert "@retry" in info.value.hint
        assert sb.read_file(runs) == b"run\n"
        assert _execs(emulator, sb.id) == execs + 1


def test_latency_is_applied(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=60)) as sb:
        start = time.monotonic()
        sb.run(["true"])
        fast = time.monotonic() - start
        emulator.set_faults(latency_ms=300)
        start = time.monotonic()
        sb.run(["true"])
        assert time.monotonic() - start >= 0.3 > fast  # at least one request (the command start) waited


# -- seeded faults on every endpoint but the command start ------------------------------------------
def test_every_idempotent_call_survives_seeded_faults_on_rest_and_envd(emulator: EmulatorHandle, labels) -> None:
    """30 % of REST and envd answers are 429/503 (with Retry-After: 0): every call still succeeds, and
    each command ran exactly once (Process/Start is never faulted; nothing re-runs it)."""
    backend = Backend("e2b", backoff=0.05)
    emulator.set_faults(error_rate=0.3, error_status=[429, 503], error_endpoints=ALL_BUT_EXEC, seed=2, retry_after=0)
    before = emulator.stats()
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=120, idempotency_key="faults-" + labels["run"])) as sb:
        work = sb.handle.workdir
        for i in range(5):
            sb.write_file("%s/in%d" % (work, i), b"data%d" % i)
            assert sb.read_file("%s/in%d" % (work, i)) == b"data%d" % i
            assert sb.run(["sh", "-c", 'echo run >> "$0"; cat "$1"', work + "/runs", "%s/in%d" % (work, i)])[:2] == (0, "data%d" % i)
            for _ in range(3):
                assert [s.id for s in backend.list({"run": labels["run"]})] == [sb.id]
        emulator.clear_faults()
        assert sb.read_file(work + "/runs") == b"run\n" * 5  # no command ran twice
    stats = emulator.stats()
    assert _execs(emulator, sb.id) == 5
    assert stats.get("injected_envd", 0) - before.get("injected_envd", 0) >= 3
    assert stats.get("injected_api", 0) - before.get("injected_api", 0) >= 1
    assert _mine(emulator, labels) == []


def test_fault_sequence_is_reproducible_from_the_seed(emulator: EmulatorHandle) -> None:
    """One seeded RNG: the same seed gives the same answers in the same order."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def answers() -> list[int]:
        emulator.set_faults(error_rate=0.5, error_status=[429, 503], error_endpoints=ALL_BUT_EXEC, seed=5, retry_after=0)
        out = []
        for _ in range(12):
            req = urllib.request.Request(emulator.url + "/v2/sandboxes?metadata=run%3Dnone", headers={"X-API-KEY": emulator.api_key})
            try:
                opener.open(req, timeout=10).close()
                out.append(200)
            except urllib.error.HTTPError as exc:
                out.append(exc.code)
        return out

    first = answers()
    assert answers() == first
    assert {429, 503} <= set(first) and 200 in first


def test_retry_after_is_honoured(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    emulator.set_faults(error_next=1, error_status=[429], retry_after=2)
    start = time.monotonic()
    backend.list({"run": labels["run"]})
    assert time.monotonic() - start >= 1.9


def test_only_the_first_n_streams_are_dropped(backend: Backend, emulator: EmulatorHandle, labels) -> None:
    with backend.create(SandboxSpec(labels=labels, ttl_seconds=120)) as sb:
        before = emulator.stats()
        emulator.set_faults(drop_stream_after=0.5, drop_streams=1)
        assert sb.exec(["sleep", "2"], timeout=30).exit_code == 0  # dropped once, reattached
        assert sb.exec(["sleep", "2"], timeout=30).exit_code == 0  # not dropped
        stats = emulator.stats()
        for counter in ("stream_dropped", "process_connect"):
            assert stats.get(counter, 0) - before.get(counter, 0) == 1, counter
