"""Prepared environments on Daytona, through the facade and the real SDK, against an emulator whose
sandboxes start from a bare base (a stdlib-only Python, pip a recording shim) and whose snapshots are
built by really pip-installing their requirements. ``tabulate`` is absent from the launcher's venv, so
importing it inside a sandbox proves the snapshot was used."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import uuid
from typing import Iterator

import pytest
from metaflow_sandbox import Backend, EnvironmentBuildError, EnvironmentSpec, ExecResult, Resources, SandboxSpec
from metaflow_sandbox_daytona.emulator import EmulatorHandle, start_emulator

PY = "%d.%d" % sys.version_info[:2]


@pytest.fixture(scope="module")
def bare() -> Iterator[EmulatorHandle]:
    with start_emulator(bare_base=True) as emu:
        yield emu


@pytest.fixture(scope="module")
def backend(bare: EmulatorHandle) -> Backend:
    return Backend("daytona", options={"api_url": bare.url, "api_key": bare.api_key})


@pytest.fixture(scope="module")
def tabulate_env(backend: Backend) -> tuple[EnvironmentSpec, list[str], object]:
    """Built once for the module: (spec, the build log lines, the PreparedEnvironment)."""
    spec = EnvironmentSpec(python_version=PY, requirements=("tabulate",), resources=Resources(cpu=1, memory_mb=1024))
    lines: list[str] = []
    prepared = backend.prepare_environment(spec, on_log=lines.append)
    return spec, lines, prepared


def run(backend: Backend, spec: SandboxSpec, script: str) -> tuple[ExecResult, str]:
    out: list[str] = []
    with backend.create(spec) as sb:
        res = sb.exec(["bash", "-c", script], on_stdout=out.append, on_stderr=out.append)
    return res, "".join(out)


def test_prepare_builds_once_and_a_sandbox_from_it_imports_the_package_without_pip(backend, bare, tabulate_env) -> None:
    spec, lines, prepared = tabulate_env
    with pytest.raises(ImportError):
        __import__("tabulate")
    assert prepared.built and prepared.state == "ready" and prepared.key == spec.key
    assert prepared.ref == "%s-c1m1d3" % spec.name
    log = "".join(lines)
    assert "Successfully installed tabulate" in log and "built Daytona snapshot %s" % prepared.ref in log
    res, out = run(
        backend,
        SandboxSpec(environment=prepared.ref),
        "python -c 'import tabulate; print(\"TAB\", tabulate.__version__)'; python -c 'import boto3' 2>&1 | tail -1; nproc",
    )
    assert res.exit_code == 0 and "TAB " in out
    assert "No module named 'boto3'" in out  # the base has nothing of the launcher's
    assert out.strip().splitlines()[-1] == "1"  # the snapshot's cpu=1 is enforced
    assert bare.pip_attempts() == []
    request = [r for r in bare.records() if r["request"].get("snapshot") == prepared.ref][0]["request"]
    assert not any(request.get(k) for k in ("cpu", "memory", "disk"))  # Daytona refuses resources with a snapshot

    builds = bare.stats()["image_builds"]
    again = backend.prepare_environment(spec)
    assert (again.built, again.ref, again.state) == (False, prepared.ref, "ready")
    assert bare.stats()["image_builds"] == builds


def test_the_base_has_no_package_and_pip_is_refused_and_recorded(backend, bare) -> None:
    res, out = run(backend, SandboxSpec(), "python -c 'import tabulate' 2>&1 | tail -1; pip install tabulate; echo rc=$?")
    assert "No module named 'tabulate'" in out and "rc=127" in out
    assert bare.pip_attempts()[-1] == "pip install tabulate"


def test_a_broken_requirement_fails_with_pips_message_and_leaves_no_snapshot(backend, bare) -> None:
    bad = "mfsb-no-such-package-%s" % uuid.uuid4().hex[:8]
    spec = EnvironmentSpec(python_version=PY, requirements=(bad,))
    with pytest.raises(EnvironmentBuildError) as info:
        backend.prepare_environment(spec)
    err = info.value
    assert "No matching distribution found for %s" % bad in err.build_log
    assert "returned a non-zero code" in str(err) and "packages=" in (err.hint or "")
    assert not [e for e in backend.environments() if e.key == spec.key]


def test_two_concurrent_prepares_end_with_one_snapshot(backend, bare) -> None:
    spec = EnvironmentSpec(python_version=PY, requirements=("tabulate", "toolz"), resources=Resources(cpu=2, memory_mb=2048))
    creates = bare.stats().get("snapshot_creates", 0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: backend.prepare_environment(spec), range(2)))
    assert {r.ref for r in results} == {"%s-c2m2d3" % spec.name}
    assert sorted(r.built for r in results) == [False, True]
    assert bare.stats()["snapshot_creates"] == creates + 1
    assert [e.ref for e in backend.environments()].count(results[0].ref) == 1


def test_list_shows_ours_only_and_remove_is_idempotent(backend, bare, tabulate_env) -> None:
    _, _, prepared = tabulate_env
    spec = EnvironmentSpec(python_version=PY, requirements=("tabulate",), resources=Resources(cpu=2, memory_mb=1024))
    other = backend.prepare_environment(spec)  # the same key, another size: its own snapshot
    assert other.key == prepared.key and other.ref != prepared.ref and other.built
    listed = {e.ref: e for e in backend.environments()}
    assert {prepared.ref, other.ref} <= set(listed) and not any(r.startswith("daytona-") for r in listed)
    assert listed[other.ref].state == "ready" and (listed[other.ref].size_bytes or 0) > 0
    assert backend.remove_environment(other.ref) is True
    assert backend.remove_environment(other.ref) is False
    assert other.ref not in {e.ref for e in backend.environments()}


def test_a_sandbox_cannot_read_the_launchers_home(backend) -> None:
    secret = os.path.join(os.path.expanduser("~"), ".mfsb-daytona-probe-%s" % uuid.uuid4().hex[:6])
    with open(secret, "w") as f:
        f.write("launcher secret")
    try:
        res, out = run(backend, SandboxSpec(), "cat %s; echo home=$HOME" % secret)
    finally:
        os.unlink(secret)
    assert "launcher secret" not in out and "home=%s" % os.path.expanduser("~") not in out


def test_a_snapshot_deactivated_after_14_days_is_reactivated_not_rebuilt(backend, bare, tabulate_env) -> None:
    import urllib.request

    spec, _, prepared = tabulate_env
    assert [e.state for e in backend.environments() if e.ref == prepared.ref] == ["ready"]
    request = urllib.request.Request(
        "%s/snapshots/%s/deactivate" % (bare.url, prepared.ref), method="POST", headers={"Authorization": "Bearer %s" % bare.api_key}
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        assert response.status == 204
    assert [e.detail.split(";")[0] for e in backend.environments() if e.ref == prepared.ref] == ["inactive"]
    lines: list[str] = []
    builds = bare.stats()["image_builds"]
    again = backend.prepare_environment(spec, on_log=lines.append)
    assert (again.ref, again.built, again.state) == (prepared.ref, False, "ready")
    assert "reactivating" in "".join(lines) and bare.stats()["image_builds"] == builds


def test_the_snapshots_memory_is_enforced(backend) -> None:
    """The default snapshot is 1 GiB: 64 MB fits, 1.5 GiB is stopped (the emulator's memory cgroup)."""
    with backend.create(SandboxSpec()) as sb:
        small = sb.exec(["python", "-c", "b = b'x' * (64 << 20); print('ok')"])
        out: list[str] = []
        big = sb.exec(["python", "-c", "b = b'x' * (1536 << 20); print('allocated')"], on_stdout=out.append)
    assert small.exit_code == 0
    assert (big.exit_code != 0 or big.oom_killed) and "allocated" not in "".join(out)
