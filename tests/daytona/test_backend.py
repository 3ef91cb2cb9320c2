"""Daytona backend behaviour, real SDK against the emulator, asserting on what the emulator recorded."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
from metaflow_sandbox import (
    MARKER_LABEL,
    Backend,
    BackendNotConfiguredError,
    Resources,
    SandboxError,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxTimeoutError,
    UnsupportedOptionError,
)


def _labels(**extra: str) -> dict[str, str]:
    return {MARKER_LABEL: "1", "flow": "DaytonaFlow", "run": uuid.uuid4().hex[:8], "step": "start", **extra}


def _request(emulator, sandbox_id: str) -> dict:
    (record,) = [r for r in emulator.records() if r["id"] == sandbox_id]
    return record["request"]


@pytest.fixture
def backend() -> Backend:
    return Backend("daytona")


def test_labels_carried_and_list_filters_by_them(backend, emulator):
    labels = _labels(task="7", attempt="0", user="ana")
    with backend.create(SandboxSpec(labels=labels)) as sb, backend.create(SandboxSpec(labels=_labels())) as other:
        live = {s["id"]: s for s in emulator.live_sandboxes()}
        assert live[sb.id]["labels"] == {**labels, "code-toolbox-language": "python"}
        listed = [s.id for s in backend.list({"run": labels["run"]})]
        assert listed == [sb.id]
        assert other.id not in listed
        assert sb.handle.labels[MARKER_LABEL] == "1"
    assert backend.list({"run": labels["run"]}) == []


def test_list_never_returns_unmarked_sandboxes(backend, emulator):
    """A user's own sandbox (no marker label) is invisible to list/gc even if other labels match."""
    from daytona import CreateSandboxFromSnapshotParams, Daytona

    run = uuid.uuid4().hex[:8]
    theirs = Daytona().create(CreateSandboxFromSnapshotParams(labels={"run": run}), timeout=0)
    try:
        assert backend.list({"run": run}) == []
    finally:
        theirs.delete(timeout=0)


def test_snapshot_create_is_fast_path_without_resources(backend, emulator):
    with Backend("daytona", options={"snapshot": "daytona-medium"}).create(SandboxSpec(labels=_labels())) as sb:
        body = _request(emulator, sb.id)
    assert body["snapshot"] == "daytona-medium"
    assert "buildInfo" not in body and "cpu" not in body and "memory" not in body


def test_default_snapshot_when_no_option(backend, emulator):
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        body = _request(emulator, sb.id)
    assert "snapshot" not in body and "buildInfo" not in body


def test_image_create_sends_resources_in_gib_and_notes_rounding(backend, emulator, caplog):
    spec = SandboxSpec(image="python:3.12-slim", labels=_labels(), resources=Resources(cpu=1.5, memory_mb=3000, disk_mb=5 * 1024))
    with caplog.at_level(logging.INFO, logger="metaflow_sandbox.daytona"):
        with backend.create(spec) as sb:
            body = _request(emulator, sb.id)
            assert sb.run(["echo", "built"])[1] == "built\n"
    assert body["cpu"] == 2 and body["memory"] == 3 and body["disk"] == 5
    assert "FROM python:3.12-slim" in body["buildInfo"]["dockerfileContent"]
    assert "snapshot" not in body
    notes = [r.getMessage() for r in caplog.records]
    assert any("memory=3000 MB rounded up to 3 GiB" in n for n in notes), notes
    assert not any("disk=" in n for n in notes), "5120 MB is exactly 5 GiB: no rounding note expected"


def test_resources_beyond_snapshot_warn_by_default_and_fail_when_strict(backend, emulator, caplog):
    """Metaflow always passes cpu/memory defaults, so a too-small snapshot is a loud warning, not a failure;
    with strict_resources it is refused before anything is created."""
    spec = SandboxSpec(labels=_labels(), resources=Resources(cpu=1, memory_mb=4096))
    before = len(emulator.records())
    strict = Backend("daytona", options={"snapshot": "daytona-small", "strict_resources": "true"})
    with pytest.raises(UnsupportedOptionError) as err:
        strict.create(spec)
    assert "image=" in str(err.value) and "snapshot" in str(err.value) and "'memory': 4" in str(err.value)
    assert len(emulator.records()) == before
    with caplog.at_level(logging.WARNING, logger="metaflow_sandbox.daytona"):
        with Backend("daytona", options={"snapshot": "daytona-small"}).create(spec) as sb:
            body = _request(emulator, sb.id)
    assert body["snapshot"] == "daytona-small" and "memory" not in body
    assert any("daytona-small" in r.getMessage() and "image=" in r.getMessage() for r in caplog.records)
    # A snapshot big enough: no warning, resources not sent (Daytona refuses them on snapshot creates).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaflow_sandbox.daytona"):
        with Backend("daytona", options={"snapshot": "daytona-medium"}).create(spec) as sb:
            body = _request(emulator, sb.id)
    assert body["snapshot"] == "daytona-medium" and "memory" not in body
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unknown_snapshot_names_the_option(emulator):
    with pytest.raises(SandboxError, match="SNAPSHOT") as err:
        Backend("daytona", options={"snapshot": "no-such-snapshot"}).create(SandboxSpec(labels=_labels()))
    assert "no-such-snapshot" in str(err.value)
    assert not isinstance(err.value, SandboxNotFoundError)


def test_caps_refuse_more_than_the_org_allows(backend):
    with pytest.raises(UnsupportedOptionError, match="at most 4"):
        backend.create(SandboxSpec(image="python:3.12", resources=Resources(cpu=8)))


@pytest.mark.parametrize("lease, minutes", [(None, 5), (61, 2), (600, 10)])
def test_lease_is_auto_stop_then_delete_and_ttl_stays_the_cap(backend, emulator, lease, minutes):
    with backend.create(SandboxSpec(labels=_labels(), ttl_seconds=3 * 3600 + 1, lease_seconds=lease)) as sb:
        body = _request(emulator, sb.id)
    assert body["autoStopInterval"] == minutes, "the lease (default 300 s) rounds up to whole minutes of auto-stop"
    assert body["autoDeleteInterval"] == 0, "a stopped sandbox must be deleted, not kept"
    assert body["ttlMinutes"] == 181, "ttl rounds up to whole minutes"


def test_env_and_network_flag_reach_the_sandbox(backend, emulator):
    spec = SandboxSpec(labels=_labels(), env={"MF_VALUE": "x y 'z'"}, network=False)
    with backend.create(spec) as sb:
        assert sb.run(["sh", "-c", 'printf %s "$MF_VALUE"'])[1] == "x y 'z'"
        assert _request(emulator, sb.id)["networkBlockAll"] is True


def test_output_reaches_on_stdout_before_the_command_ends(backend):
    seen: list[tuple[float, str]] = []
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        result = sb.exec(
            ["sh", "-c", "echo first; sleep 2; echo second"], timeout=30, on_stdout=lambda t: seen.append((time.monotonic(), t))
        )
        ended = time.monotonic()
    assert result.exit_code == 0
    assert "".join(t for _, t in seen) == "first\nsecond\n"
    first_at = next(t for t, text in seen if "first" in text)
    assert ended - first_at > 1.5, "the first line arrived only when the command ended"


def test_failing_command_does_not_break_the_next_one(backend):
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        assert sb.run(["sh", "-c", "set -e; false"])[0] == 1
        assert sb.run(["sh", "-c", "exit 42"])[0] == 42
        assert sb.run(["echo", "still fine"]) == (0, "still fine\n", "")
        assert sb.run(["printf", "%s|", "a b", "$HOME", "'q'"])[1] == "a b|$HOME|'q'|", "argv is quoted, not re-split"


def test_timeout_raises_kills_and_never_reruns(backend):
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        log = sb.handle.workdir + "/runs.log"
        start = time.monotonic()
        with pytest.raises(SandboxTimeoutError) as err:
            sb.exec(["sh", "-c", 'echo run >> "$1"; sleep 30; echo late >> "$1"', "sh", log], timeout=1.5)
        assert time.monotonic() - start < 6
        assert err.value.sandbox_id == sb.id
        time.sleep(0.5)
        assert sb.read_file(log) == b"run\n", "the command ran more than once, or survived the timeout"


def test_missing_key_fails_before_any_http_request(emulator, monkeypatch):
    monkeypatch.delenv("DAYTONA_API_KEY")
    emulator.clear_requests()
    backend = Backend("daytona")
    with pytest.raises(BackendNotConfiguredError) as err:
        backend.check_config()
    assert err.value.variable == "DAYTONA_API_KEY"
    with pytest.raises(BackendNotConfiguredError, match="DAYTONA_API_KEY"):
        backend.create(SandboxSpec(labels=_labels()))
    assert emulator.requests() == []


def test_options_override_env(emulator, monkeypatch):
    """METAFLOW_SANDBOX_DAYTONA_API_KEY etc. arrive as options and win over DAYTONA_*."""
    monkeypatch.setenv("DAYTONA_API_KEY", "wrong-key")
    monkeypatch.setenv("DAYTONA_API_URL", "http://127.0.0.1:9/api")
    backend = Backend("daytona", options={"api_key": emulator.api_key, "api_url": emulator.url, "target": "us"})
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        assert sb.run(["true"])[0] == 0


def test_wrong_key_is_a_clear_error(emulator, monkeypatch):
    monkeypatch.setenv("DAYTONA_API_KEY", "not-the-key")
    with pytest.raises(SandboxError, match="DAYTONA_API_KEY"):
        Backend("daytona").create(SandboxSpec(labels=_labels()))


def test_idempotency_key_makes_create_retry_safe(backend, emulator):
    spec = SandboxSpec(labels=_labels(), idempotency_key="run-1/start/2/0")
    with backend.create(spec) as first:
        # The same key again (a retry after a lost reply) finds the first sandbox instead of a second one.
        second = backend.create(spec)
        assert second.id == first.id
        assert len([s for s in emulator.live_sandboxes() if s["id"] == first.id]) == 1


def test_destroy_deletes_and_is_idempotent(backend, emulator):
    sb = backend.create(SandboxSpec(labels=_labels()))
    assert sb.destroy() is True
    assert sb.destroy() is False
    (record,) = [r for r in emulator.records() if r["id"] == sb.id]
    assert record["ended"] and record["reason"] == "deleted"


def test_parallel_execs_in_one_sandbox(backend):
    """Each exec has its own session, so concurrent commands do not interfere."""
    with backend.create(SandboxSpec(labels=_labels())) as sb:
        results: dict[int, tuple] = {}

        def run(i: int) -> None:
            results[i] = sb.run(["sh", "-c", "sleep 0.3; echo $0", str(i)])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {i: (0, "%d\n" % i, "") for i in range(4)}
