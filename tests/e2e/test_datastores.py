"""Sandboxed steps on Google Cloud Storage and Azure Blob, on every backend (issue 12).

The servers (fake-gcs-server, Azurite) start with the session (conftest.gcs_server/azure_server).
Per store and backend: one flow proving artifacts, logs (client and `logs` command), a card and
which credentials arrived, and one failed run plus `resume`.
"""

from __future__ import annotations

import pytest

from .conftest import Target, cloud_store_env, local_leftovers

COMBOS = ["%s-%s" % (b, s) for s in ("gs", "azure") for b in ("local", "daytona", "e2b")]


@pytest.fixture(params=COMBOS)
def store_target(request, tmp_path) -> Target:
    backend, store = request.param.split("-")
    env = {"METAFLOW_SANDBOX_BACKEND": backend}
    env.update(cloud_store_env(store, request, "%s-%s" % (request.param, tmp_path.name)))
    if backend == "local":
        live = lambda: local_leftovers(tmp_path)  # noqa: E731
    else:
        emu = request.getfixturevalue("%s_emulator" % backend)
        env.update(emu.env)
        env["METAFLOW_SKIP_INSTALL_DEPENDENCIES"] = "1"  # the emulated sandboxes run this machine's Python
        live = emu.live_sandboxes
    t = Target(request.param, backend, store, env, live, tmp_path)
    yield t
    assert t.live_sandboxes() == [], "sandboxes left alive after the test"


def store_objects(t: Target) -> list[str]:
    """Object names under the test's prefix, read from the server itself (not through Metaflow)."""
    from .datastore_servers import AZURITE_ACCOUNT, AZURITE_KEY, BUCKET

    if t.datastore == "gs":
        import requests

        prefix = t.env["METAFLOW_DATASTORE_SYSROOT_GS"].split("/", 3)[3]
        url = "%s/storage/v1/b/%s/o" % (t.env["STORAGE_EMULATOR_HOST"], BUCKET)
        return [o["name"] for o in requests.get(url, params={"prefix": prefix}, timeout=30).json().get("items", [])]
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient(
        t.env["METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT"],
        credential={"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY},
        connection_verify=t.env["REQUESTS_CA_BUNDLE"],
    )
    prefix = t.env["METAFLOW_DATASTORE_SYSROOT_AZURE"].split("/", 1)[1]
    return [b.name for b in client.get_container_client(BUCKET).list_blobs(name_starts_with=prefix)]


def _ok(run):
    assert run.returncode == 0, run.output[-6000:]


def test_artifacts_logs_card_and_credentials(store_target):
    t = store_target
    run = t.flow("ds_flow.py")
    _ok(run)
    rid = run.run_id()
    data = t.client(
        """
        t = Run('DatastoreFlow/%s')['work'].task
        import base64, re
        from metaflow.cards import get_cards
        def card_text(html):
            return ' '.join(base64.b64decode(b).decode('utf-8', 'replace') for b in re.findall(r'__MF_DATA__.[^]]+. = "([^"]+)"', html))
        emit({k: getattr(t.data, k) for k in ('y', 'in_sandbox', 'gcp_key', 'gcp_key_path', 'azure_connection_string')}
             | {'meta': t.metadata_dict, 'stdout': t.stdout, 'stderr': t.stderr,
                'location': t['y']._object.get('location', ''), 'cards': [card_text(c.get()) for c in get_cards(t)]})
        """
        % rid,
        run,
    )
    assert data["y"] == 42
    assert data["in_sandbox"] == "1"
    assert data["meta"]["sandbox-backend"] == t.backend and data["meta"]["sandbox-id"]
    # the artifacts really live in the cloud store, under this test's root
    root = t.env["METAFLOW_DATASTORE_SYSROOT_GS" if t.datastore == "gs" else "METAFLOW_DATASTORE_SYSROOT_AZURE"]
    assert data["location"].endswith(root), data["location"]
    assert any("/DatastoreFlow/%s/work/" % rid in name for name in store_objects(t)), "no task files in the store"
    if t.datastore == "gs":
        # the key file travels as a file; inside a remote sandbox it is a copy, not the launcher's path
        assert data["gcp_key"] == open(t.env["GOOGLE_APPLICATION_CREDENTIALS"]).read()
        if t.backend != "local":
            assert data["gcp_key_path"] != t.env["GOOGLE_APPLICATION_CREDENTIALS"]
    else:
        assert data["azure_connection_string"] == t.env["AZURE_STORAGE_CONNECTION_STRING"]
    assert any("stored in %s" % t.datastore in html for html in data["cards"])
    assert [ln for ln in data["stdout"].splitlines() if ln.startswith("ds-out")] == ["ds-out-%d" % i for i in range(3)]
    assert [ln for ln in data["stderr"].splitlines() if ln.startswith("ds-err")] == ["ds-err-%d" % i for i in range(3)]
    logs = t.flow("ds_flow.py", "logs", "%s/work" % rid)
    assert logs.returncode == 0, logs.output
    assert [ln for ln in logs.stdout.splitlines() if "ds-out" in ln] == ["ds-out-%d" % i for i in range(3)]
    # credentials never travel on a command line: the trampoline's argv has no secret
    for secret in ("GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_CONNECTION_STRING", "IDENTITY_HEADER"):
        if secret in t.env:
            assert t.env[secret] not in run.output


def test_resume_reruns_the_failed_step_in_a_sandbox(store_target):
    t = store_target
    forward = ",".join(filter(None, [t.env.get("METAFLOW_SANDBOX_FORWARD_ENV"), "FAIL_B"]))
    failed = t.flow("resume_flow.py", env={"FAIL_B": "1", "METAFLOW_SANDBOX_FORWARD_ENV": forward})
    assert failed.returncode != 0 and "b fails on purpose" in failed.output
    resumed = t.flow("resume_flow.py", "resume")
    _ok(resumed)
    data = t.client(
        """
        r = Flow('ResumeFlow').latest_run
        emit({'id': r.id, 'b': r['b'].task.data.b_value, 'b_meta': r['b'].task.metadata_dict,
              'a_origin': r['a'].task.metadata_dict.get('origin-task-id')})
        """,
        resumed,
    )
    assert data["id"] == resumed.run_id() != failed.run_id()
    assert data["b"] == "from-a+b"
    assert data["b_meta"]["sandbox-backend"] == t.backend and data["b_meta"]["sandbox-id"]
    assert data["a_origin"], "`a` is cloned from the failed run, not re-run"
