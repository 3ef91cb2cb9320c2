"""Daytona at E2B's level of fault tolerance: retried reads, a lost start or create found again (never
repeated), destroy retried or left to the lease, errors that name the setting to check.

Real SDK against the emulator; each test asserts on what the emulator itself recorded.
"""

from __future__ import annotations

import time
import uuid

import pytest
from metaflow_sandbox import (
    MARKER_LABEL,
    Backend,
    SandboxError,
    SandboxSpec,
    TransientBackendError,
)

FAST = {"retry_seconds": 20}


def _labels() -> dict[str, str]:
    return {MARKER_LABEL: "1", "run": uuid.uuid4().hex[:8]}


def _statuses(emulator, endpoint: str) -> list[int]:
    return [r["status"] for r in emulator.requests() if r["endpoint"] == endpoint]


def _creates(emulator) -> int:
    return len(emulator.records())


def _cycle(sb) -> tuple[int, str]:
    """Upload, run (appending to a run log), download: the whole life of a task."""
    log = sb.handle.workdir + "/runs.log"
    sb.write_file(sb.handle.workdir + "/in.txt", content=b"payload")
    code, out, _ = sb.run(["sh", "-c", 'cat in.txt; echo run >> "$1"; exit 7', "sh", log], cwd=sb.handle.workdir, timeout=60)
    assert out == "payload"
    return code, (sb.read_file(log) or b"").decode()


@pytest.mark.parametrize("endpoint", ["get", "list", "delete", "session", "command", "logs", "upload", "download", "info", "snapshot"])
@pytest.mark.parametrize("status", [429, 503])
def test_every_idempotent_endpoint_is_retried(emulator, endpoint, status):
    """Two failures in a row on one endpoint: the task still runs once, with its real exit code, and nothing is left."""
    from metaflow_sandbox import Resources, Sandbox, SandboxHandle

    labels = _labels()
    backend = Backend("daytona", options={**FAST, "snapshot": "daytona-small"})
    spec = SandboxSpec(labels=labels, resources=Resources(cpu=1))  # resources: the snapshot's size is looked up
    from metaflow_sandbox_daytona import plugin

    plugin._snapshots.clear()
    emulator.clear_requests()
    emulator.set_faults(error_next=2, error_status=status, error_endpoints=[endpoint])
    sb = backend.create(spec)
    assert [s.id for s in backend.list({"run": labels["run"]})] == [sb.id]
    assert _cycle(sb) == (7, "run\n")
    # a handle rebuilt from the id alone (as `metaflow-sandbox kill` does) costs a GET first
    assert Sandbox(backend, SandboxHandle("daytona", sb.id, options=FAST)).destroy() is True
    assert emulator.live_sandboxes() == []
    seen = _statuses(emulator, endpoint)
    assert seen[:2] == [status, status] and 100 < seen[2] < 300, seen  # 101: a log stream's upgrade


@pytest.mark.parametrize("endpoint", ["list", "download"])
def test_retry_after_is_honoured(emulator, endpoint):
    """Control-plane calls (urllib3) and toolbox file calls (httpx) both wait as long as the server asks."""
    backend = Backend("daytona", options=FAST)
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        emulator.clear_requests()
        emulator.set_faults(error_next=1, error_status=429, retry_after=2, error_endpoints=[endpoint])
        start = time.monotonic()
        if endpoint == "list":
            backend.list({"run": "none"})
        else:
            assert sb.read_file("/etc/hostname") is not None
        assert time.monotonic() - start >= 2
        assert _statuses(emulator, endpoint) == [429, 200]


def test_retries_are_bounded_and_the_error_says_what_to_do(emulator):
    backend = Backend("daytona", options={"retry_seconds": 1.5})
    emulator.set_faults(error_rate=1.0, error_status=503, error_endpoints=["list"])
    start = time.monotonic()
    with pytest.raises(SandboxError) as err:
        backend.list({})
    assert time.monotonic() - start < 6
    assert not isinstance(err.value, TransientBackendError), "a retried-out failure is final, not retried again"
    text = str(err.value)
    assert "kept failing" in text and "503" in text and "METAFLOW_SANDBOX_DAYTONA_RETRY_SECONDS" in text


def test_lost_start_answer_is_recovered_without_running_twice(emulator):
    """The command starts but its answer is lost: it is found in the session, not started again."""
    backend = Backend("daytona", options=FAST)
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        emulator.clear_requests()
        emulator.set_faults(lost_reply_next=1, lost_reply_status=504, lost_reply_endpoints=["exec"])
        assert _cycle(sb) == (7, "run\n")
        assert [r["status"] for r in emulator.requests() if r["endpoint"] == "exec"] == [504]


def test_refused_start_is_started_again_once(emulator):
    """A 503 on the start: nothing started (the session is empty), so it is started again, once."""
    backend = Backend("daytona", options=FAST)
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        emulator.clear_requests()
        emulator.set_faults(error_next=1, error_status=503, error_endpoints=["exec"])
        assert _cycle(sb) == (7, "run\n")
        assert [r["status"] for r in emulator.requests() if r["endpoint"] == "exec"] == [503, 202]


def test_lost_status_and_streams_take_the_exit_code_from_the_provider(emulator):
    """Status reads fail and every log stream drops: output is complete, the exit code is the command's own."""
    backend = Backend("daytona", options=FAST)
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        emulator.set_faults(error_rate=0.5, seed=3, error_status=[429, 503], error_endpoints=["command", "logs"], drop_log_stream=True)
        assert _cycle(sb) == (7, "run\n")


def test_lost_create_answer_is_found_by_name_not_duplicated(emulator):
    backend = Backend("daytona", options=FAST)
    before = _creates(emulator)
    emulator.clear_requests()
    emulator.set_faults(lost_reply_next=1, lost_reply_status=504, lost_reply_endpoints=["create"])
    with backend.create(SandboxSpec(labels=_labels(), idempotency_key=uuid.uuid4().hex)) as sb:
        assert sb.run(["true"])[0] == 0
    assert _creates(emulator) == before + 1, "one sandbox for one create"
    assert _statuses(emulator, "create") == [504, 409]


def test_create_that_gives_up_leaves_nothing(emulator):
    """The create happened but its answer was lost, then Daytona kept failing: the half-made sandbox is deleted."""
    backend = Backend("daytona", options={"retry_seconds": 1})
    before = {r["id"] for r in emulator.records()}
    emulator.set_faults(lost_reply_rate=1.0, lost_reply_endpoints=["create"])  # made, but never an answer
    with pytest.raises(SandboxError) as err:
        backend.create(SandboxSpec(labels=_labels(), idempotency_key=uuid.uuid4().hex))
    assert "Traceback" not in str(err.value)
    emulator.set_faults(lost_reply_rate=0)
    (made,) = [r for r in emulator.records() if r["id"] not in before]
    assert made["ended"] and made["reason"] == "deleted"
    assert emulator.live_sandboxes() == []


def test_destroy_retries_until_gone(emulator):
    backend = Backend("daytona", options=FAST)
    sb = backend.create(SandboxSpec(labels=_labels()))
    emulator.clear_requests()
    emulator.set_faults(error_next=3, error_status=503, error_endpoints=["delete"])
    assert sb.destroy() is True
    assert _statuses(emulator, "delete") == [503, 503, 503, 200]
    assert emulator.live_sandboxes() == []


def test_destroy_that_keeps_failing_says_so_and_the_lease_ends_it(emulator):
    backend = Backend("daytona", options={"retry_seconds": 1})
    sb = backend.create(SandboxSpec(labels=_labels(), lease_seconds=60))
    emulator.set_faults(error_rate=1.0, error_status=503, error_endpoints=["delete"])
    with pytest.raises(SandboxError) as err:
        sb.destroy()
    text = str(err.value)
    assert "could not delete" in text and "lease" in text and sb.id in text
    assert any(s["id"] == sb.id for s in emulator.live_sandboxes())
    emulator.set_faults(time_scale=0.2 / 60)  # the 1-minute lease passes in 0.2 s
    deadline = time.monotonic() + 10
    while any(s["id"] == sb.id for s in emulator.live_sandboxes()):
        assert time.monotonic() < deadline, "the lease did not end the sandbox"
        time.sleep(0.1)
    (record,) = [r for r in emulator.records() if r["id"] == sb.id]
    assert record["reason"] == "auto-deleted"


def test_lost_session_and_delete_answers_count_as_done(emulator):
    """A session made or a sandbox deleted whose answer was lost: the retry's 409/404 means it is done."""
    backend = Backend("daytona", options=FAST)
    sb = backend.create(SandboxSpec(labels=_labels()))
    emulator.clear_requests()
    emulator.set_faults(lost_reply_next=1, lost_reply_endpoints=["session"])
    assert _cycle(sb) == (7, "run\n")
    assert [r["status"] for r in emulator.requests() if r["endpoint"] == "session"][:2] == [504, 409]
    emulator.set_faults(lost_reply_next=1, lost_reply_endpoints=["delete"])
    assert sb.destroy() is True, "the first destroy deleted it, though its answer was lost"
    assert _statuses(emulator, "delete") == [504, 404]
    assert emulator.live_sandboxes() == []
    assert sb.destroy() is False
