"""E2B under provider faults, through real flows and the real SDK: seeded 429/503 on every REST and envd
endpoint but the command start, plus dropped command streams, must not fail a run, run a body twice within
an attempt, duplicate a create or leave a sandbox; E2B vanishing mid-task fails the run cleanly, with a
message, and leaves nothing once the lease has run out.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest

from .conftest import S3_KEY, S3_SECRET, Target, s3_env


@pytest.fixture
def emulator():
    """A private emulator, so its records and counters are this test's alone."""
    from metaflow_sandbox_e2b.emulator import start_emulator

    emu = start_emulator(port=0)
    yield emu
    emu.stop()


def _target(emulator, s3_server, tmp_path, **env: str) -> Target:
    full = {"METAFLOW_SANDBOX_BACKEND": "e2b", "METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1"}
    full.update(s3_env(s3_server, "e2b-faults-%s" % tmp_path.name))
    full.update(emulator.env)
    full.update(env)
    return Target("e2b-s3", "e2b", "s3", full, emulator.live_sandboxes, tmp_path)


def _markers(s3_server, prefix: str) -> list[str]:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=s3_server["url"], aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1"
    )
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="metaflow", Prefix=prefix):
        keys += [o["Key"].rsplit("/", 1)[-1] for o in page.get("Contents", []) if "/marker-" in o["Key"]]
    return keys


def test_16_way_foreach_survives_seeded_429_503_and_dropped_streams(emulator, s3_server, tmp_path):
    emulator.set_faults(
        error_rate=0.2, error_statuses=[429, 503], error_scope="all", retry_after=1, seed=8, drop_stream_after=1.5, drop_streams=3
    )
    target = _target(emulator, s3_server, tmp_path)
    start = time.monotonic()
    run = target.flow("faults_e2b_foreach.py", "run", "--max-workers", "8", timeout=900)
    took = time.monotonic() - start
    stats = emulator.stats()
    emulator.set_faults()
    assert run.returncode == 0, run.output[-6000:]
    injected = {s: stats.get("injected_%d" % s, 0) for s in (429, 503)}
    assert injected[429] > 10 and injected[503] > 10, "the faults were not injected: %s" % stats
    assert stats.get("injected_envd", 0) > 5 and stats.get("injected_api", 0) > 5, stats
    assert stats.get("stream_dropped", 0) == 3
    assert stats.get("process_connect", 0) >= 3  # each dropped stream was reattached, not re-run
    data = target.client("emit(Run('FaultsE2BForeachFlow/%s')['join'].task.data.doubled)" % run.run_id(), run)
    assert data == [2 * i for i in range(16)]
    # each body ran exactly once per attempt: one marker per (item, attempt)
    markers = _markers(s3_server, "e2b-faults-%s/data/FaultsE2BForeachFlow/%s/" % (tmp_path.name, run.run_id()))
    runs = collections.Counter(tuple(m.split("-")[1:3]) for m in markers)
    assert sorted({item for item, _ in runs}, key=int) == [str(i) for i in range(16)]
    assert set(runs.values()) == {1}, "a body ran twice within an attempt: %s" % runs
    # one sandbox per task attempt in the emulator's own records (retried creates found by their key)
    every = [s for s in emulator.all_sandboxes() if s["metadata"].get("metaflow.step") == "work"]
    creates = collections.Counter((s["metadata"].get("metaflow.task"), s["metadata"].get("metaflow.attempt")) for s in every)
    assert set(creates.values()) == {1}, "a create was duplicated: %s" % creates
    assert len(creates) >= 16
    assert emulator.live_sandboxes() == []
    print(
        "e2b faults: %d REST + %d envd requests, injected 429=%d 503=%d (envd %d), %d streams dropped (%d reattached), "
        "%d creates (%d idempotent hits) for %d task attempts with a body run, %.0fs"
        % (
            stats.get("api_requests", 0),
            stats.get("envd_requests", 0),
            injected[429],
            injected[503],
            stats.get("injected_envd", 0),
            stats.get("stream_dropped", 0),
            stats.get("process_connect", 0),
            stats.get("create", 0),
            stats.get("create_idempotent_hit", 0),
            len(runs),
            took,
        )
    )


def test_provider_vanishing_mid_task_fails_cleanly_and_leaves_nothing(emulator, s3_server, tmp_path):
    """E2B goes down while the step runs (streams cut, every request 503): the task fails with a message
    naming what to do, and once E2B is back nothing is left (destroyed, or ended by its lease)."""
    emulator.set_faults(time_scale=0.05)  # the 60 s lease lasts 3 s of real time
    target = _target(emulator, s3_server, tmp_path, METAFLOW_SANDBOX_LEASE_SECONDS="60", METAFLOW_SANDBOX_E2B_RENEW_SECONDS="0.5")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run=target.flow("faults_e2b_vanish.py", timeout=300)))
    runner.start()
    deadline = time.monotonic() + 180
    while not emulator.stats().get("process_start"):
        assert runner.is_alive() and time.monotonic() < deadline, "the step never started: %s" % result
        time.sleep(0.2)
    time.sleep(5)  # the step runs past its lease only because its live owner renews it
    assert len(emulator.live_sandboxes()) == 1
    emulator.set_faults(time_scale=0.05, outage=True)
    outage = time.monotonic()
    runner.join(240)
    failed_after = time.monotonic() - outage
    assert not runner.is_alive()
    emulator.set_faults(time_scale=0.05)
    run = result["run"]
    assert run.returncode != 0
    assert "lost the command's output stream" in run.output and "NOT retried" in run.output, run.output[-4000:]
    deadline = time.monotonic() + 10
    while emulator.live_sandboxes():
        assert time.monotonic() < deadline, "a sandbox outlived its vanished provider: %s" % emulator.live_sandboxes()
        time.sleep(0.2)
    (record,) = emulator.all_sandboxes()
    assert record["state"] in ("killed", "expired")
    print(
        "e2b vanish: the run failed %.0fs into the outage; its sandbox %s\n%s" % (failed_after, record["state"], _error_lines(run.output))
    )


def _error_lines(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if "E2B" in line or "Fix:" in line or "NOT retried" in line)
