"""The bash command a sandboxed task runs: what it adds depends on what the trampoline did."""

from __future__ import annotations

import pytest
from metaflow.metaflow_environment import MetaflowEnvironment
from metaflow_extensions.sandbox_core.plugins.sandbox_task import AGE_SEEDED_METADATA, task_command

CODE = {"url": "s3://bucket/flow/code.tgz", "metadata": None, "sha": "abc"}


@pytest.mark.parametrize("seeded", [False, True])
def test_seeded_metadata_is_aged_only_when_seeded(seeded):
    cmd = task_command(MetaflowEnvironment(None), "start", "python flow.py step start", CODE, "s3", None, [], seeded=seeded)
    assert cmd[:2] == ["bash", "-c"]
    assert (AGE_SEEDED_METADATA in cmd[2]) is seeded
    assert "mkdir -p metaflow" in cmd[2], "the package may land in a dir the trampoline seeded"
