"""What goes into a step's prepared environment (sandbox_environments.environment_spec), with the real backends."""

from __future__ import annotations

import sys

import metaflow  # noqa: F401  (the extension's plugins resolve through metaflow's import)
import pytest
from metaflow_extensions.sandbox_core.plugins.sandbox_decorator import SandboxDecorator
from metaflow_extensions.sandbox_core.plugins.sandbox_environments import PREPARE_ENV, EnvironmentException, environment_spec
from metaflow_extensions.sandbox_core.plugins.sandbox_inputs import SandboxInputError
from metaflow_sandbox import Backend


def deco(**attributes):
    d = SandboxDecorator(attributes=attributes)
    d.external_init()
    d.step, d.run_time_limit, d.has_timeout = "train", 3600, False
    return d


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    from metaflow import metaflow_config

    monkeypatch.delenv(PREPARE_ENV, raising=False)
    monkeypatch.delenv("METAFLOW_SKIP_INSTALL_DEPENDENCIES", raising=False)
    monkeypatch.setattr(metaflow_config, "SANDBOX_PREPARE", None, raising=False)


def test_remote_backend_gets_the_datastore_dependencies_and_the_steps_packages(tmp_path):
    spec = environment_spec(deco(packages=["tabulate==0.9.0"], image="python:3.12-slim", cpu=2), Backend("e2b"), "s3", str(tmp_path))
    assert spec.requirements == ("boto3", "requests", "tabulate==0.9.0")
    assert spec.python_version == "%d.%d" % sys.version_info[:2]
    assert spec.image == "python:3.12-slim" and spec.resources.cpu == 2


def test_requirements_file_lines_join_and_change_the_key(tmp_path):
    (tmp_path / "requirements.txt").write_text("# pinned\ntoolz==0.12.1\n\n")
    with_file = environment_spec(
        deco(packages=["tabulate==0.9.0"], requirements_file="requirements.txt"), Backend("local"), "s3", str(tmp_path)
    )
    without = environment_spec(deco(packages=["tabulate==0.9.0"]), Backend("local"), "s3", str(tmp_path))
    assert with_file.requirements == ("tabulate==0.9.0", "toolz==0.12.1")
    assert with_file.key != without.key


def test_local_backend_needs_no_datastore_dependencies_and_nothing_to_install_means_no_environment(tmp_path):
    assert environment_spec(deco(packages=["tabulate==0.9.0"]), Backend("local"), "s3", str(tmp_path)).requirements == ("tabulate==0.9.0",)
    assert environment_spec(deco(), Backend("local"), "s3", str(tmp_path)) is None


def test_skip_install_dependencies_drops_the_datastore_dependencies(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLOW_SKIP_INSTALL_DEPENDENCIES", "1")
    assert environment_spec(deco(), Backend("daytona"), "s3", str(tmp_path)) is None
    assert environment_spec(deco(packages=["tabulate"]), Backend("daytona"), "gs", str(tmp_path)).requirements == ("tabulate",)


def test_azure_and_gs_take_metaflows_own_lists(tmp_path):
    assert "azure-storage-blob" in environment_spec(deco(), Backend("e2b"), "azure", str(tmp_path)).requirements
    assert "google-cloud-storage" in environment_spec(deco(), Backend("e2b"), "gs", str(tmp_path)).requirements


def test_turned_off_per_step_or_per_run(tmp_path, monkeypatch):
    assert environment_spec(deco(packages=["tabulate"], prepare=False), Backend("local"), "s3", str(tmp_path)) is None
    assert environment_spec(deco(packages=["tabulate"], prepare="off"), Backend("local"), "s3", str(tmp_path)) is None
    monkeypatch.setenv(PREPARE_ENV, "0")
    assert environment_spec(deco(packages=["tabulate"]), Backend("local"), "s3", str(tmp_path)) is None
    monkeypatch.setenv(PREPARE_ENV, "sometimes")
    with pytest.raises(EnvironmentException) as info:
        environment_spec(deco(packages=["tabulate"]), Backend("local"), "s3", str(tmp_path))
    assert PREPARE_ENV in str(info.value) and "Fix:" in str(info.value)


def test_prepare_attribute_is_parsed_strictly():
    with pytest.raises(SandboxInputError) as info:
        deco(prepare="perhaps")
    assert "prepare" in str(info.value) and "Fix:" in str(info.value)


def test_steps_share_a_build_only_when_they_ask_for_the_same_thing(tmp_path):
    from metaflow_extensions.sandbox_core.plugins import sandbox_environments as envs

    backend = Backend("local", options={"environments_dir": str(tmp_path)})
    try:
        builds = []
        for step, cpu in (("a", 1), ("b", 1), ("c", 2)):
            d = deco(packages=["tabulate==0.9.0"], cpu=cpu)
            d.step = step
            spec = environment_spec(d, backend, "s3", str(tmp_path))
            builds.append(envs.start(d, backend, spec, None))
        assert builds[0] is builds[1] and builds[0].steps == ["a", "b"]
        assert builds[2] is not builds[0] and builds[2].spec.key == builds[0].spec.key  # same content, other size
        assert {b.wait().ref for b in builds} == {str(tmp_path / builds[0].spec.key)}  # local: one directory either way
    finally:
        envs.reset()


def test_the_console_follows_a_build(tmp_path, monkeypatch):
    from metaflow_extensions.sandbox_core.plugins import sandbox_environments as envs

    monkeypatch.setattr(envs, "PROGRESS_SECONDS", 0.3)
    said: list[str] = []
    backend = Backend("local", options={"environments_dir": str(tmp_path)})
    d = deco(packages=["toolz==0.12.1"])
    try:
        build = envs.start(d, backend, environment_spec(d, backend, "s3", str(tmp_path)), lambda line, **kw: said.append(line))
        build.wait("train")
    finally:
        envs.reset()
    assert said[0].startswith("Preparing the 'local' environment mfsb-env-") and "toolz==0.12.1" in said[0]
    assert "Step *train* waits for its environment" in said[1]
    assert any(line.startswith("Still building the 'local' environment") for line in said)
    assert "is ready: built in" in said[-1]
