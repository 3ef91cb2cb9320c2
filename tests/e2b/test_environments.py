"""Prepared environments on E2B: templates built through the real SDK's Template.build against the emulator.

The emulator really pip-installs each template (PyPI is reachable) and runs its sandboxes on a bare
base (a stdlib-only Python where pip fails), with the template's cpu and memory enforced. ``toolz`` is
absent from the dev venv, so importing it proves the template's image is what the sandbox runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from metaflow_sandbox import (
    ENVIRONMENT_LABEL,
    Backend,
    EnvironmentBuildError,
    EnvironmentSpec,
    Resources,
    SandboxSpec,
    UnsupportedOptionError,
)
from metaflow_sandbox_e2b.emulator import EmulatorHandle, start_emulator

PY = "%d.%d" % sys.version_info[:2]
SMALL = Resources(cpu=1, memory_mb=1024)


@pytest.fixture(scope="module")
def bare() -> Iterator[EmulatorHandle]:
    """An emulator whose sandboxes start from a bare base: no boto3, no pip, nothing of the launcher's."""
    with start_emulator(bare_base=True) as emu:
        yield emu


@pytest.fixture(autouse=True)
def bare_env(bare: EmulatorHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in bare.env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def toolz_env(bare: EmulatorHandle) -> EnvironmentSpec:
    """toolz at 1 vCPU / 1 GB, built once for the module (through the first test that prepares it)."""
    return EnvironmentSpec(python_version=PY, requirements=("toolz",), resources=SMALL)


def _run(sb, code: str) -> tuple[int, str]:
    out: list[str] = []
    res = sb.exec(["python", "-c", code], on_stdout=out.append, on_stderr=out.append)
    return res.exit_code, "".join(out)


def test_prepare_builds_once_then_finds_it(bare: EmulatorHandle, toolz_env: EnvironmentSpec) -> None:
    backend = Backend("e2b")
    assert backend.prepares_environments()
    logs: list[str] = []
    before = bare.stats().get("template_build", 0)
    env = backend.prepare_environment(toolz_env, on_log=logs.append)
    assert env.built and env.state == "ready"
    assert env.ref == "mfsb-env-%s-c1-m1024" % toolz_env.key  # one template per resource class
    assert env.labels[ENVIRONMENT_LABEL] == toolz_env.key
    assert any("Successfully installed toolz" in line for line in logs), "".join(logs)
    again = backend.prepare_environment(toolz_env, on_log=logs.append)
    assert (again.ref, again.built, again.state) == (env.ref, False, "ready")
    assert bare.stats()["template_build"] == before + 1


def test_sandbox_from_template_runs_its_image_with_its_size(bare: EmulatorHandle, toolz_env: EnvironmentSpec) -> None:
    backend = Backend("e2b")
    env = backend.prepare_environment(toolz_env)
    with backend.create(SandboxSpec(environment=env.ref, resources=SMALL)) as sb:
        (listed,) = [s for s in bare.live_sandboxes() if s["id"] == sb.id]
        assert (listed["template"], listed["cpu"], listed["memory_mb"]) == (env.ref, 1, 1024)
        code, out = _run(sb, "import os, toolz; print('toolz-ok', len(os.sched_getaffinity(0)))")
        assert code == 0 and "toolz-ok 1" in out, out  # the template's package, on the template's 1 vCPU
        code, out = _run(sb, "import boto3")
        assert code != 0 and "No module named 'boto3'" in out  # the base image has none of the launcher's packages
        attempts = len(bare.pip_attempts())
        res = sb.exec(["pip", "install", "six"], on_stdout=lambda _: None, on_stderr=lambda _: None)
        assert res.exit_code != 0 and len(bare.pip_attempts()) == attempts + 1  # pip is not on the base
        code, out = _run(sb, "b = bytearray(1536 * 1024 * 1024); print('allocated')")
        assert code != 0 and "allocated" not in out  # 1.5 GB does not fit the template's 1024 MB


def test_broken_requirement_fails_with_pips_message_and_leaves_nothing(bare: EmulatorHandle) -> None:
    backend = Backend("e2b")
    broken = EnvironmentSpec(python_version=PY, requirements=("mfsb-no-such-package-e2b==0.0.1",))
    with pytest.raises(EnvironmentBuildError) as info:
        backend.prepare_environment(broken)
    err = info.value
    assert "No matching distribution found for mfsb-no-such-package-e2b" in err.build_log
    assert "mfsb-env-%s-c2-m512" % broken.key in str(err) and "packages=" in (err.hint or "")
    assert all(e.key != broken.key for e in backend.environments())  # no failed template left behind


def test_concurrent_prepares_in_one_launcher_build_one_template(bare: EmulatorHandle) -> None:
    spec = EnvironmentSpec(python_version=PY, requirements=("toolz", "six"), resources=SMALL)
    before = bare.stats().get("template_build", 0)
    results: list = []

    def prepare() -> None:
        results.append(Backend("e2b").prepare_environment(spec))

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and results[0].ref == results[1].ref
    assert sorted(r.built for r in results) == [False, True]
    assert bare.stats()["template_build"] == before + 1
    assert [e.ref for e in Backend("e2b").environments()].count(results[0].ref) == 1


def test_a_second_launcher_waits_for_the_build_in_progress(bare: EmulatorHandle) -> None:
    """Another process's build of the same name is followed (its log too), not repeated."""
    spec = EnvironmentSpec(python_version=PY, requirements=("toolz", "six"), resources=Resources(cpu=2, memory_mb=2048))
    before = bare.stats().get("template_build", 0)
    script = (
        "import json, sys\nfrom metaflow_sandbox import Backend, EnvironmentSpec, Resources\n"
        "e = Backend('e2b').prepare_environment(EnvironmentSpec(python_version=%r, requirements=('toolz', 'six'), "
        "resources=Resources(cpu=2, memory_mb=2048)))\nprint(json.dumps([e.ref, e.built]))\n" % PY
    )
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        deadline = time.time() + 60
        while bare.stats().get("template_build", 0) == before:  # its build started
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        logs: list[str] = []
        mine = Backend("e2b").prepare_environment(spec, on_log=logs.append)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    theirs = json.loads(out.strip().splitlines()[-1])
    assert theirs == [mine.ref, True] and not mine.built
    assert any("waiting for the build" in line for line in logs) and any("Successfully installed" in line for line in logs)
    assert bare.stats()["template_build"] == before + 1


def test_list_and_remove_only_ours(bare: EmulatorHandle, toolz_env: EnvironmentSpec) -> None:
    backend = Backend("e2b")
    env = backend.prepare_environment(toolz_env)
    listed = {e.ref: e for e in backend.environments()}
    assert listed[env.ref].key == toolz_env.key and listed[env.ref].state == "ready"
    assert all(ref.startswith("mfsb-env-") for ref in listed)
    with pytest.raises(UnsupportedOptionError, match="not a prepared environment"):
        backend.remove_environment("base")
    with backend.create(SandboxSpec(environment=env.ref, resources=SMALL)) as running:
        assert backend.remove_environment(env.ref) is True
        assert _run(running, "import toolz")[0] == 0  # a sandbox running from it keeps its packages
    assert backend.remove_environment(env.ref) is False
    assert env.ref not in {e.ref for e in backend.environments()}
    with pytest.raises(UnsupportedOptionError, match="prepared environment") as info:
        backend.create(SandboxSpec(environment=env.ref, resources=SMALL))
    assert "metaflow-sandbox prepare" in (info.value.hint or "")


def test_a_build_requested_but_never_started_is_not_waited_for_forever(bare: EmulatorHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher that died between requesting a build and starting it leaves it 'waiting': build anyway."""
    import urllib.request

    from metaflow_sandbox_e2b import environments

    monkeypatch.setattr(environments, "STALE_WAITING_SECONDS", 0.5)
    spec = EnvironmentSpec(python_version=PY, requirements=("toolz",), resources=Resources(cpu=1, memory_mb=2048))
    name = "mfsb-env-%s-c1-m2048" % spec.key
    body = json.dumps({"name": name, "cpuCount": 1, "memoryMB": 2048}).encode()
    req = urllib.request.Request(bare.url + "/v3/templates", data=body, method="POST", headers={"X-API-KEY": bare.api_key})
    with urllib.request.urlopen(req) as answer:
        assert answer.status == 202
    logs: list[str] = []
    env = Backend("e2b").prepare_environment(spec, on_log=logs.append)
    assert env.ref == name and env.built and env.state == "ready"
    assert any("never started" in line for line in logs), "".join(logs)


def test_commands_run_in_a_login_shell_whose_profile_sets_the_images_path(bare: EmulatorHandle, toolz_env: EnvironmentSpec) -> None:
    """envd runs `bash -l -c`: /etc/profile resets PATH (one sent with the command is lost, as on E2B)."""
    backend = Backend("e2b")
    env = backend.prepare_environment(toolz_env)
    with backend.create(SandboxSpec(environment=env.ref, resources=SMALL)) as sb:
        out: list[str] = []
        script = "echo PATH=$PATH; python -c 'import toolz; print(\"toolz-ok\")'"
        sent = "/usr/bin:/bin:/mfsb-not-here"
        res = sb.exec(["bash", "-c", script], env={"PATH": sent}, on_stdout=out.append, on_stderr=out.append)
        text = "".join(out)
        assert res.exit_code == 0, text
        assert "toolz-ok" in text and "/mfsb-not-here" not in text, text  # the profile's PATH, with the image's python


def test_every_sized_template_has_its_cpu_and_memory_enforced(bare: EmulatorHandle) -> None:
    """Not only built ones: E2B sizes every sandbox's VM by its template (the ladder's too)."""
    with Backend("e2b").create(SandboxSpec(resources=SMALL)) as sb:
        (listed,) = [s for s in bare.live_sandboxes() if s["id"] == sb.id]
        assert (listed["template"], listed["cpu"], listed["memory_mb"]) == ("metaflow-sandbox-base-c1-m1024", 1, 1024)
        code, out = _run(sb, "import os; print('cpus', len(os.sched_getaffinity(0)))")
        assert code == 0 and "cpus 1" in out, out
        code, out = _run(sb, "b = bytearray(1536 * 1024 * 1024); print('allocated')")
        assert code != 0 and "allocated" not in out
