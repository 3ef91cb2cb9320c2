"""The trampoline's prepared environment: the launcher's ref when given, else found or built right there
(a step run by another scheduler), and a failed build ends the task before any sandbox exists."""

from __future__ import annotations

import types

import metaflow  # noqa: F401  (the extension's plugins resolve through metaflow's import)
import pytest
from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY
from metaflow_extensions.sandbox_core.plugins import sandbox_cli
from metaflow_extensions.sandbox_core.plugins.sandbox_decorator import SandboxDecorator
from metaflow_extensions.sandbox_core.plugins.sandbox_environments import PREPARE_ENV, REF_ENV
from metaflow_extensions.sandbox_core.plugins.sandbox_inputs import REFUSALS_ENV
from metaflow_sandbox import Backend

TASK = {"step": "train", "task_id": "7"}


def deco(**attributes):
    d = SandboxDecorator(attributes=attributes)
    d.external_init()
    d.step, d.run_time_limit, d.has_timeout = "train", 3600, False
    return d


@pytest.fixture
def said(monkeypatch):
    monkeypatch.delenv(REF_ENV, raising=False)
    monkeypatch.delenv(PREPARE_ENV, raising=False)
    lines: list[str] = []
    obj = types.SimpleNamespace(flow_datastore=types.SimpleNamespace(TYPE="local"), echo_always=lambda text, **kw: lines.append(text))
    return obj, lines


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return Backend("local", options={"environments_dir": str(tmp_path_factory.mktemp("environments"))})


def test_without_the_launchers_ref_the_trampoline_prepares_itself_then_finds_it(said, local, monkeypatch):
    obj, lines = said
    ref = sandbox_cli._environment_ref(obj, deco(packages=["toolz==0.12.1"]), local, TASK)
    assert ref and "built in" in lines[-1] and ref in lines[-1]
    assert sandbox_cli._environment_ref(obj, deco(packages=["toolz==0.12.1"]), local, TASK) == ref
    assert "found in" in lines[-1]
    monkeypatch.setenv(REF_ENV, ref)  # the launcher's ref wins, without asking the backend
    assert sandbox_cli._environment_ref(obj, deco(packages=["toolz==0.12.1"]), local, TASK) == ref
    monkeypatch.setenv(REF_ENV, "")  # the launcher decided: no environment for this step
    assert sandbox_cli._environment_ref(obj, deco(packages=["toolz==0.12.1"]), local, TASK) is None


def test_a_failed_build_ends_the_task_with_the_log_and_tells_the_launcher(said, local, tmp_path, monkeypatch):
    obj, lines = said
    refusals = tmp_path / "refusals"
    monkeypatch.setenv(REFUSALS_ENV, str(refusals))
    with pytest.raises(SystemExit) as info:
        sandbox_cli._environment_ref(obj, deco(packages=["mfsb-no-such-package==9.9"]), local, TASK)
    assert info.value.code == METAFLOW_EXIT_DISALLOW_RETRY
    assert "No matching distribution found for mfsb-no-such-package==9.9" in lines[-1] and "Fix:" in lines[-1]
    assert "Step *train* (task 7) could not start its 'local' sandbox" in refusals.read_text()
