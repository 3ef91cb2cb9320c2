"""Daytona under provider faults, through real flows: seeded 429/503 on every endpoint but the command
start plus dropped log streams must not fail a run, run a body twice, duplicate a create or leave a
sandbox; a provider that vanishes mid-task fails the run cleanly and leaves nothing.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest

from .conftest import S3_KEY, S3_SECRET, Target, s3_env

#: Every endpoint the emulator names, except starting the command ("exec") and the SDK's socket.io.
FAULTED = ["create", "get", "list", "delete", "lifecycle", "snapshot", "session", "command", "logs", "upload", "download", "info"]


@pytest.fixture
def emulator():
    """A private emulator, so its records count this test's creates only."""
    from metaflow_sandbox_daytona.emulator import start_emulator

    emu = start_emulator(port=0)
    yield emu
    emu.stop()


def _target(emulator, s3_server, tmp_path, **env: str) -> Target:
    full = {"METAFLOW_SANDBOX_BACKEND": "daytona", "METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1"}
    full.update(s3_env(s3_server, "daytona-faults-%s" % tmp_path.name))
    full.update(emulator.env)
    full.update(env)
    return Target("daytona-s3", "daytona", "s3", full, emulator.live_sandboxes, tmp_path)


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
    # seed 11: per-endpoint fates lose the 3rd create, session and command-start answers whatever the interleaving
    emulator.set_faults(error_rate=0.2, error_status=[429, 503], seed=11, error_endpoints=FAULTED, drop_log_stream=3)
    # and, harder than refusals: 10 % of creates, session creations, command starts and deletes are carried
    # out but their answer is lost, so only finding them again (never repeating them) keeps the counts right
    emulator.set_faults(lost_reply_rate=0.1, lost_reply_endpoints=["create", "session", "exec", "delete"])
    target = _target(emulator, s3_server, tmp_path)
    run = target.flow("faults_foreach_flow.py", "run", "--max-workers", "8", timeout=600)
    served = emulator.requests()
    emulator.set_faults(error_rate=0, drop_log_stream=0, lost_reply_rate=0)
    assert run.returncode == 0, run.output[-6000:]
    injected = collections.Counter(r["status"] for r in served if r["status"] in (429, 503))
    lost = collections.Counter(r["endpoint"] for r in served if r.get("lost_reply"))
    assert lost["exec"] >= 1 and lost["create"] >= 1, "no start or create answer was lost: %s" % lost
    assert injected[429] > 10 and injected[503] > 10, "the faults were not injected: %s" % injected
    data = target.client("emit(Run('FaultsForeachFlow/%s')['join'].task.data.doubled)" % run.run_id(), run)
    assert data == [2 * i for i in range(16)]
    # each body ran exactly once per attempt: one marker per (item, attempt)
    markers = _markers(s3_server, "daytona-faults-%s/data/FaultsForeachFlow/%s/" % (tmp_path.name, run.run_id()))
    runs = collections.Counter(tuple(m.split("-")[1:3]) for m in markers)
    assert sorted({item for item, _ in runs}, key=int) == [str(i) for i in range(16)]
    assert set(runs.values()) == {1}, "a body ran twice within an attempt: %s" % runs
    # one create per task attempt, in the emulator's own records, and nothing left alive
    creates = collections.Counter(
        (r["request"]["labels"].get("metaflow.task"), r["request"]["labels"].get("metaflow.attempt")) for r in emulator.records()
    )
    assert set(creates.values()) == {1}, "a create was duplicated: %s" % creates
    assert len(creates) == len(runs), "creates %d != task attempts %d" % (len(creates), len(runs))
    assert emulator.live_sandboxes() == []
    print(
        "faults: %d requests, %d refused %s, %d answers lost %s, %d creates for %d task attempts"
        % (len(served), sum(injected.values()), dict(injected), sum(lost.values()), dict(lost), len(creates), len(runs))
    )


def test_provider_vanishing_mid_task_fails_cleanly_and_leaves_nothing(emulator, s3_server, tmp_path):
    """Every request fails while the step runs: the task gives up within its retry budget, says what failed,
    and once the provider is back nothing is left (destroyed, or ended by its lease)."""
    emulator.set_faults(minute_seconds=0.5)  # the default 5-minute lease lasts 2.5 s
    target = _target(
        emulator,
        s3_server,
        tmp_path,
        METAFLOW_SANDBOX_DAYTONA_RETRY_SECONDS="4",
        METAFLOW_SANDBOX_DAYTONA_LEASE_RENEW_SECONDS="0.3",
    )
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run=target.flow("faults_vanish_flow.py", timeout=300)))
    runner.start()
    deadline = time.monotonic() + 120
    while not any(r["endpoint"] == "exec" and r["status"] == 202 for r in emulator.requests()):
        assert runner.is_alive() and time.monotonic() < deadline, "the step never started: %s" % result
        time.sleep(0.2)
    time.sleep(3)  # the step runs past its lease only because the lease is renewed
    assert len(emulator.live_sandboxes()) == 1
    emulator.set_faults(error_rate=1.0, error_status=503, error_endpoints=FAULTED + ["exec"], drop_log_stream=True)
    runner.join(240)
    emulator.set_faults(error_rate=0, drop_log_stream=0)
    run = result["run"]
    assert run.returncode != 0
    assert "kept failing" in run.output and "503" in run.output, run.output[-4000:]
    assert "METAFLOW_SANDBOX_DAYTONA_RETRY_SECONDS" in run.output
    assert "Traceback" not in run.output, run.output[-4000:]
    print("\n".join(line for line in run.output.splitlines() if "wait/" in line or "Fix:" in line))
    deadline = time.monotonic() + 20
    while emulator.live_sandboxes():
        assert time.monotonic() < deadline, "a sandbox outlived its vanished provider: %s" % emulator.live_sandboxes()
        time.sleep(0.2)
    (record,) = emulator.records()
    assert record["deleted"]
