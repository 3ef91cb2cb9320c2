"""Reliability under injected faults: throttling, dropped log streams, vanishing sandboxes, expiry."""

from __future__ import annotations

import time
import uuid

import pytest
from metaflow_sandbox import (
    MARKER_LABEL,
    Backend,
    SandboxError,
    SandboxNotFoundError,
    SandboxSpec,
    TransientBackendError,
)


def _labels() -> dict[str, str]:
    return {MARKER_LABEL: "1", "run": uuid.uuid4().hex[:8]}


def _statuses(emulator, endpoint: str) -> list[int]:
    return [r["status"] for r in emulator.requests() if r["endpoint"] == endpoint]


@pytest.fixture
def backend() -> Backend:
    return Backend("daytona", backoff=0.01)


@pytest.mark.parametrize("status", [429, 503])
def test_throttled_list_is_retried_by_the_facade(backend, emulator, status):
    labels = _labels()
    with backend.create(SandboxSpec(labels=labels)) as sb:
        emulator.clear_requests()
        emulator.set_faults(error_next=2, error_status=status, error_endpoints=["list"])
        assert [s.id for s in backend.list({"run": labels["run"]})] == [sb.id]
        assert _statuses(emulator, "list") == [status, status, 200]


def test_throttled_get_and_delete_are_retried(backend, emulator):
    sb = backend.create(SandboxSpec(labels=_labels()))
    rebuilt = Backend("daytona", backoff=0.01)
    from metaflow_sandbox import Sandbox, SandboxHandle

    # A handle rebuilt from the id alone (as `metaflow-sandbox kill` does) needs a GET first.
    handle = SandboxHandle("daytona", sb.id, workdir=sb.handle.workdir)
    emulator.clear_requests()
    emulator.set_faults(error_next=1, error_status=503, error_endpoints=["get", "delete"])
    assert Sandbox(rebuilt, handle).destroy() is True
    assert _statuses(emulator, "get") == [503, 200]
    assert emulator.live_sandboxes() == []


def test_seeded_error_rate_is_repeatable(emulator):
    backend = Backend("daytona", backoff=0.001, retries=20)
    labels = _labels()
    with backend.create(SandboxSpec(labels=labels)):
        runs = []
        for _ in range(2):
            emulator.clear_requests()
            emulator.set_faults(error_rate=0.5, seed=7, error_status=429, error_endpoints=["list"])
            for _ in range(6):
                backend.list({"run": labels["run"]})
            runs.append(_statuses(emulator, "list"))
        assert runs[0] == runs[1]
        assert 429 in runs[0] and runs[0].count(200) == 6


def test_throttled_create_without_idempotency_key_is_retried_once_made(emulator):
    """Every sandbox gets a unique name, so even a create without an idempotency key is safe to retry."""
    backend = Backend("daytona", backoff=0.01)
    before = len(emulator.records())
    emulator.set_faults(error_next=2, error_status=429, error_endpoints=["create"])
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        assert sb.run(["true"])[0] == 0
    assert len(emulator.records()) == before + 1


def test_throttled_create_with_idempotency_key_is_retried(emulator):
    backend = Backend("daytona", backoff=0.01)
    emulator.set_faults(error_next=2, error_status=429, error_endpoints=["create"])
    with backend.create(SandboxSpec(labels=_labels(), idempotency_key=uuid.uuid4().hex)) as sb:
        assert sb.run(["true"])[0] == 0


@pytest.mark.parametrize(
    "drop, close_code, streams",
    [(1, 1000, 2), (1, 1011, 2), (True, 1000, 4)],
    ids=["one-clean-close", "one-error-close", "every-stream"],
)
def test_dropped_log_stream_still_delivers_complete_output(backend, emulator, drop, close_code, streams):
    """Decision: a log stream that ends early (cleanly or not) is reconnected (it replays from the start and
    what was already delivered is skipped); if it keeps failing, the logs endpoint is polled. Either way the
    caller gets every byte exactly once, in order per stream, and the real exit code."""
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        emulator.clear_requests()
        dropped = emulator.stats().get("stream_dropped", 0)
        emulator.set_faults(drop_log_stream=drop, drop_close_code=close_code)
        out: list[str] = []
        err: list[str] = []
        script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; sleep 0.2; done; exit 3"
        result = sb.exec(["sh", "-c", script], timeout=30, on_stdout=out.append, on_stderr=err.append)
        assert result.exit_code == 3
        assert "".join(out) == "".join("out%d\n" % i for i in range(1, 6))
        assert "".join(err) == "".join("err%d\n" % i for i in range(1, 6))
        follows = [r for r in emulator.requests() if r["endpoint"] == "logs" and "follow" in r["query"]]
        assert len(follows) == streams
        assert emulator.stats().get("stream_dropped", 0) - dropped == (streams if drop is True else drop)  # the fault bit


def test_sandbox_vanishing_mid_command_is_not_found(backend, emulator):
    sb = backend.create(SandboxSpec(labels=_labels()))
    emulator.set_faults(vanish_next_exec=1, vanish_delay_ms=300)
    start = time.monotonic()
    with pytest.raises(SandboxNotFoundError) as err:
        sb.exec(["sleep", "30"], timeout=60)
    assert time.monotonic() - start < 10
    assert err.value.sandbox_id == sb.id
    assert sb.destroy() is False


def test_exit_minus_one_is_an_error_not_a_retry(backend, emulator):
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        log = sb.handle.workdir + "/runs.log"
        emulator.set_faults(exit_minus_one_next=1)
        with pytest.raises(SandboxError) as err:
            sb.exec(["sh", "-c", 'echo run >> "$1"', "sh", log], timeout=30)
        assert "-1" in str(err.value) and sb.id in str(err.value)
        assert not isinstance(err.value, TransientBackendError)
        assert sb.read_file(log) == b"run\n"


def test_latency_is_added_to_every_call(backend, emulator):
    emulator.set_faults(latency_ms=50)
    emulator.clear_requests()
    start = time.monotonic()
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        assert sb.run(["true"])[0] == 0
    elapsed = time.monotonic() - start
    served = [r for r in emulator.requests() if r["endpoint"] != "socketio"]
    assert len(served) >= 8  # create, work-dir, session, exec, logs (ws), command, logs, session delete, delete
    assert all(r["ms"] >= 50 for r in served)
    assert elapsed > 0.05 * len(served)


def test_ttl_expiry_deletes_an_orphan(backend, emulator):
    """The launcher dies without destroying: the provider-side TTL still removes the sandbox."""
    emulator.set_faults(time_scale=0.3 / 60)
    sb = backend.create(SandboxSpec(labels=_labels(), ttl_seconds=60))
    deadline = time.monotonic() + 10
    while any(s["id"] == sb.id for s in emulator.live_sandboxes()):
        assert time.monotonic() < deadline, "ttl did not delete the sandbox"
        time.sleep(0.1)
    (record,) = [r for r in emulator.records() if r["id"] == sb.id]
    assert record["reason"] == "expired"
    with pytest.raises(SandboxNotFoundError):
        sb.exec(["true"])
    assert sb.destroy() is False


def test_auto_stop_then_auto_delete_in_the_emulator(emulator):
    """The emulator honours auto-stop/auto-delete the way Daytona does (SDK call with auto-stop on)."""
    from daytona import CreateSandboxFromSnapshotParams, Daytona

    emulator.set_faults(time_scale=0.2 / 60)
    sb = Daytona().create(CreateSandboxFromSnapshotParams(auto_stop_interval=1, auto_delete_interval=0), timeout=0)
    deadline = time.monotonic() + 10
    while any(s["id"] == sb.id for s in emulator.live_sandboxes()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (record,) = [r for r in emulator.records() if r["id"] == sb.id]
    assert record["reason"] == "auto-deleted"


def test_create_that_never_starts_times_out_and_leaves_nothing(emulator):
    """A sandbox stuck before "started" (a slow image build) is deleted, not left to its TTL."""
    emulator.set_faults(image_build_ms=60_000, image_build_polls=10_000)
    backend = Backend("daytona", options={"create_timeout": 1})
    before = {r["id"] for r in emulator.records()}
    start = time.monotonic()
    with pytest.raises(SandboxError) as err:
        backend.create(SandboxSpec(image="python:3.12-slim", labels=_labels()))
    assert time.monotonic() - start < 10
    (new,) = [r for r in emulator.records() if r["id"] not in before]
    assert err.value.sandbox_id == new["id"]
    assert new["ended"] and emulator.live_sandboxes() == []
    emulator.set_faults(image_build_ms=100, image_build_polls=1)
