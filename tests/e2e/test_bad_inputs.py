"""Bad input fails at launch with an error that names the fix, and leaves nothing behind."""

from __future__ import annotations

import pytest

from .conftest import Target, s3_env


@pytest.fixture
def local(tmp_path) -> Target:
    t = Target("local-localds", "local", "localds", {"METAFLOW_SANDBOX_BACKEND": "local"}, tmp=tmp_path)
    yield t


def test_second_compute_decorator_is_refused(local):
    run = local.flow("two_compute_flow.py")
    assert run.returncode != 0
    assert "has both @sandbox and @batch" in run.output and "remove one of them" in run.output


def test_parallel_is_refused(local):
    run = local.flow("parallel_flow.py")
    assert run.returncode != 0
    assert "@parallel" in run.output and "does not support" in run.output


def test_unknown_backend_lists_installed_ones(local):
    run = local.flow("plain_flow.py", "run", "--with", "sandbox:backend=nope")
    assert run.returncode != 0
    assert "No sandbox backend named 'nope'" in run.output
    assert "local" in run.output.split("Installed backends:")[1].splitlines()[0]


def test_cloud_backend_refuses_the_local_datastore(local):
    run = local.flow("daytona_flow.py", env={"DAYTONA_API_KEY": "x"})
    assert run.returncode != 0
    assert "cannot see this machine's files" in run.output
    assert "--datastore=s3" in run.output and "METAFLOW_DATASTORE_SYSROOT_S3" in run.output


def test_missing_api_key_fails_before_any_upload(tmp_path, s3_server, daytona_emulator):
    env = s3_env(s3_server, "nokey-%s" % tmp_path.name)
    env.update({k: v for k, v in daytona_emulator.env.items() if k != "DAYTONA_API_KEY"})
    t = Target("daytona-s3", "daytona", "s3", env, tmp=tmp_path)
    run = t.flow("daytona_flow.py")
    assert run.returncode != 0
    assert "DAYTONA_API_KEY" in run.output
    import boto3

    from .conftest import S3_KEY, S3_SECRET

    client = boto3.client(
        "s3", endpoint_url=s3_server["url"], aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1"
    )
    listed = client.list_objects_v2(Bucket="metaflow", Prefix="nokey-%s/" % tmp_path.name)
    assert listed.get("KeyCount", 0) == 0, "nothing may be uploaded before credentials are checked"
    assert daytona_emulator.live_sandboxes() == []


def test_gpu_on_a_backend_without_gpus_is_refused(local):
    run = local.flow("plain_flow.py", "run", "--with", "sandbox:gpu=1")
    assert run.returncode != 0
    assert "has no GPUs" in run.output and "gpu=" in run.output


def test_network_no_cuts_the_network(local):
    """`network='no'` (a string, as `--with` passes it) means off: the step cannot reach a port on the host."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        run = local.flow("network_flow.py", "run", "--with", "sandbox:network=no", "--with", 'environment:vars={"PROBE_PORT": "%d"}' % port)
    finally:
        listener.close()
    assert run.returncode == 0, run.output[-3000:]
    assert local.client("emit(Flow('NetworkFlow').latest_run['start'].task.data.reached)", run) is False
    assert local.live_sandboxes() == []


def test_provider_refusal_at_task_time_reads_clean(tmp_path, s3_server, e2b_emulator):
    """An unknown template needs a provider call, so it fails at task time: with the provider's reason and its
    fix, never Metaflow's "Internal error", and no sandbox left."""
    env = s3_env(s3_server, "tpl-%s" % tmp_path.name)
    env.update(e2b_emulator.env)
    env.update({"METAFLOW_SANDBOX_BACKEND": "e2b", "METAFLOW_SKIP_INSTALL_DEPENDENCIES": "1"})
    t = Target("e2b-s3", "e2b", "s3", env, tmp=tmp_path)
    run = t.flow("plain_flow.py", "run", "--with", 'sandbox:options={"template": "no-such-template"}')
    assert run.returncode != 0
    assert "E2B template not found" in run.output and "Fix: build the templates" in run.output, run.output[-3000:]
    assert "Step start (task 1) could not start its 'e2b' sandbox: E2B template not found" in run.stderr, run.output[-3000:]
    assert "Internal error" not in run.output and "Traceback" not in run.output, run.output[-3000:]
    assert e2b_emulator.live_sandboxes() == []
