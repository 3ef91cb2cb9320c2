"""Daytona and E2B under provider faults, through real flows and the real SDKs, one scenario each for both:

- seeded 429/503 on every endpoint but the command start, plus dropped output streams (and, on Daytona,
  lost answers) must not fail a run, run a body twice within an attempt, duplicate a create or leave a
  sandbox;
- the provider going down mid-task (every request 503, streams cut) fails the run cleanly, with a message
  naming the fix, and once it is back nothing is left (destroyed, or ended by its lease).

What differs per provider is data: its extra fault switches, its settings, its messages, its counters.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import re
import threading
import time
from typing import Any, Callable

import pytest

from .conftest import S3_KEY, S3_SECRET, Target, s3_env


@dataclasses.dataclass
class Provider:
    name: str
    start: Callable[[], Any]
    #: Faults beyond the shared 20 % 429/503 on every endpoint but "exec" (and the seed that makes them bite).
    foreach_faults: dict[str, Any]
    foreach_args: tuple[str, ...]
    check_foreach: Callable[[Any, dict[str, Any], list[dict[str, Any]]], None]
    #: The clock speed and settings that make a lease short and renewed often.
    vanish_time_scale: float
    vanish_env: dict[str, str]
    vanish_messages: tuple[str, ...]
    #: Endpoints never faulted: the command start (so a body never runs twice unseen) and the SDK's event stream.
    spared: tuple[str, ...] = ("exec",)


def _daytona() -> Any:
    from metaflow_sandbox_daytona.emulator import start_emulator

    return start_emulator()


def _e2b() -> Any:
    from metaflow_sandbox_e2b.emulator import start_emulator

    return start_emulator()


def _daytona_foreach(emulator: Any, stats: dict[str, Any], served: list[dict[str, Any]]) -> None:
    lost = collections.Counter(r["endpoint"] for r in served if r.get("lost_reply"))
    assert lost["exec"] >= 1 and lost["create"] >= 1, "no start or create answer was lost: %s" % lost


def _e2b_foreach(emulator: Any, stats: dict[str, Any], served: list[dict[str, Any]]) -> None:
    assert stats.get("injected_envd", 0) > 5 and stats.get("injected_api", 0) > 5, stats
    assert stats.get("stream_dropped", 0) == 3
    assert stats.get("process_connect", 0) >= 3  # each dropped stream was reattached, not re-run


PROVIDERS = [
    Provider(
        "daytona",
        _daytona,
        # seed 11: per-endpoint fates lose the 3rd create, session and command-start answers whatever the interleaving;
        # harder than refusals: 10 % of creates, session creations, command starts and deletes are carried out but
        # their answer is lost, so only finding them again (never repeating them) keeps the counts right
        dict(seed=11, drop_log_stream=3, lost_reply_rate=0.1, lost_reply_endpoints=["create", "session", "exec", "delete"]),
        (),
        _daytona_foreach,
        vanish_time_scale=0.5 / 60,  # the default 5-minute lease lasts 2.5 s
        vanish_env={"METAFLOW_SANDBOX_DAYTONA_RETRY_SECONDS": "4", "METAFLOW_SANDBOX_DAYTONA_LEASE_RENEW_SECONDS": "0.3"},
        vanish_messages=("kept failing", "503", "METAFLOW_SANDBOX_DAYTONA_RETRY_SECONDS"),
        spared=("exec", "socketio"),
    ),
    Provider(
        "e2b",
        _e2b,
        # seed 47: enough 429s and 503s among the first requests of every endpoint
        dict(seed=47, retry_after=1, drop_stream_after=1.5, drop_streams=3),
        ("--nap", "2"),  # long enough for a dropped stream to cut a running body
        _e2b_foreach,
        vanish_time_scale=0.05,  # the 60 s lease lasts 3 s
        vanish_env={"METAFLOW_SANDBOX_LEASE_SECONDS": "60", "METAFLOW_SANDBOX_E2B_RENEW_SECONDS": "0.5"},
        vanish_messages=("lost the command's output stream", "NOT retried"),
    ),
]


@pytest.fixture(params=PROVIDERS, ids=lambda p: p.name)
def provider(request) -> Provider:
    return request.param


@pytest.fixture
def emulator(provider: Provider):
    """A private emulator, so its records and counters are this test's alone."""
    emu = provider.start()
    yield emu
    emu.stop()


def _target(provider: Provider, emulator, s3_server, tmp_path, **env: str) -> Target:
    full = {"METAFLOW_SANDBOX_BACKEND": provider.name, "METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1"}
    full.update(s3_env(s3_server, "%s-faults-%s" % (provider.name, tmp_path.name)))
    full.update(emulator.env)
    full.update(env)
    return Target("%s-s3" % provider.name, provider.name, "s3", full, emulator.live_sandboxes, tmp_path)


def _markers(s3_server, prefix: str) -> list[str]:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=s3_server["url"], aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1"
    )
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="metaflow", Prefix=prefix):
        keys += [o["Key"].rsplit("/", 1)[-1] for o in page.get("Contents", []) if "/marker-" in o["Key"]]
    return keys


def test_16_way_foreach_survives_seeded_429_503_and_dropped_streams(provider: Provider, emulator, s3_server, tmp_path):
    faulted = [e for e in emulator.endpoints if e not in provider.spared]
    emulator.set_faults(error_rate=0.2, error_status=[429, 503], error_endpoints=faulted, **provider.foreach_faults)
    target = _target(provider, emulator, s3_server, tmp_path)
    start = time.monotonic()
    run = target.flow("faults_foreach_flow.py", "run", "--max-workers", "8", *provider.foreach_args, timeout=900)
    took = time.monotonic() - start
    stats, served = emulator.stats(), emulator.requests()
    emulator.clear_faults()
    assert run.returncode == 0, run.output[-6000:]
    injected = {s: stats.get("injected_%d" % s, 0) for s in (429, 503)}
    assert injected[429] > 10 and injected[503] > 10, "the faults were not injected: %s" % stats
    provider.check_foreach(emulator, stats, served)
    data = target.client("emit(Run('FaultsForeachFlow/%s')['join'].task.data.doubled)" % run.run_id(), run)
    assert data == [2 * i for i in range(16)]
    # each body ran exactly once per attempt: one marker per (item, attempt)
    markers = _markers(s3_server, "%s-faults-%s/data/FaultsForeachFlow/%s/" % (provider.name, tmp_path.name, run.run_id()))
    runs = collections.Counter(tuple(m.split("-")[1:3]) for m in markers)
    assert sorted({item for item, _ in runs}, key=int) == [str(i) for i in range(16)]
    assert set(runs.values()) == {1}, "a body ran twice within an attempt: %s" % runs
    # one sandbox per task attempt in the emulator's own records (a retried create found again, never repeated)
    every = [r for r in emulator.records() if r["labels"].get("metaflow.step") == "work"]
    creates = collections.Counter((r["labels"].get("metaflow.task"), r["labels"].get("metaflow.attempt")) for r in every)
    assert set(creates.values()) == {1}, "a create was duplicated: %s" % creates
    assert len(creates) >= len(runs), "creates %d < task attempts with a body run %d" % (len(creates), len(runs))
    assert emulator.live_sandboxes() == []
    print(
        "%s faults: %d requests, injected 429=%d 503=%d, %d answers lost, %d streams dropped, %d creates for %d task attempts "
        "with a body run, %.0fs"
        % (
            provider.name,
            len(served),
            injected[429],
            injected[503],
            stats.get("lost_reply", 0),
            stats.get("stream_dropped", 0),
            len(creates),
            len(runs),
            took,
        )
    )


def test_provider_vanishing_mid_task_fails_cleanly_and_leaves_nothing(provider: Provider, emulator, s3_server, tmp_path):
    """The provider goes down while the step runs (every request 503, streams cut): the task fails with a message
    naming what failed and what to do, and once the provider is back nothing is left (destroyed, or ended by its lease)."""
    emulator.set_time_scale(provider.vanish_time_scale)
    target = _target(provider, emulator, s3_server, tmp_path, **provider.vanish_env)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run=target.flow("faults_vanish_flow.py", timeout=300)))
    runner.start()
    deadline = time.monotonic() + 180
    while not any(r["endpoint"] == "exec" for r in emulator.requests()):
        assert runner.is_alive() and time.monotonic() < deadline, "the step never started: %s" % result
        time.sleep(0.2)
    time.sleep(4)  # the step runs past its lease only because its live owner renews it
    assert len(emulator.live_sandboxes()) == 1
    emulator.set_faults(outage=True)
    outage = time.monotonic()
    runner.join(240)
    failed_after = time.monotonic() - outage
    assert not runner.is_alive()
    emulator.set_faults(outage=False)  # the lease clock stays fast
    run = result["run"]
    assert run.returncode != 0
    for message in provider.vanish_messages:
        assert message in run.output, run.output[-4000:]
    assert "Traceback" not in run.output, run.output[-4000:]
    deadline = time.monotonic() + 20
    while emulator.live_sandboxes():
        assert time.monotonic() < deadline, "a sandbox outlived its vanished provider: %s" % emulator.live_sandboxes()
        time.sleep(0.2)
    (record,) = emulator.records()
    assert record["ended"] and record["reason"] in ("deleted", "expired", "auto-deleted"), record  # by the client or the provider
    lines = [line for line in run.output.splitlines() if "Fix:" in line or "NOT retried" in line or "wait/" in line]
    print(
        "%s vanish: the run failed %.0fs into the outage; its sandbox %s\n%s"
        % (provider.name, failed_after, record["reason"], "\n".join(lines))
    )


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_a_slow_delete_does_not_hold_the_task_and_the_run_still_ends_clean(provider: Provider, emulator, s3_server, tmp_path):
    """The runtime sees a task end once its outcome is final; its sandbox's delete (3 s here) runs after that,
    and the run still ends with that sandbox gone (the run's server waits for the teardowns)."""
    emulator.set_faults(latency_ms=3000, latency_endpoints=["delete"])
    target = _target(provider, emulator, s3_server, tmp_path)
    try:
        run = target.flow("plain_flow.py", "run", "--with", "sandbox")
        deletes = [r for r in emulator.requests() if r["endpoint"] == "delete" and r["method"] == "DELETE"]
    finally:
        emulator.clear_faults()
    assert run.returncode == 0, run.output[-6000:]
    assert emulator.live_sandboxes() == []
    finished = {}
    for line in run.output.splitlines():
        m = re.match(r"^(\S+ \S+) \[\d+/(\w+)/\d+ \(pid \d+\)\] Task finished successfully", line)
        if m:  # the runtime prints the launcher's local time
            finished[m.group(2)] = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    assert "start" in finished and len(deletes) == 2, (run.output[-3000:], deletes)
    # `start`'s sandbox was deleted after the runtime saw the task end, not before: its delete ended >2 s later.
    assert min(r["done_at"] for r in deletes) - finished["start"] > 2.0, (finished, deletes)
