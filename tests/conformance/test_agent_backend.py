"""The `agent` example, a backend built like a provider's from docs/adding-a-backend.md alone (a
persistent agent per sandbox, JSON lines over a unix socket), works with no change to core: installed
with pip, it passes the conformance kit and the flow tier, on S3 and (sharing the host) locally.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import importlib_metadata
import pytest

from tests.e2e.conftest import s3_env
from tests.e2e.conftest import s3_server as s3_server  # a session fixture, shared with e2e

from . import installed_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example copied out of the repo and pip-installed into a private target directory."""
    return installed_example.install("agent_backend", tmp_path_factory.mktemp("agent-example"), "metaflow-sandbox-agent")


def _run(agent: dict[str, Path], args: list[str], **kw):
    return installed_example.run(agent, args, "AGENT_ROOT", **kw)


def _pytest(agent: dict[str, Path], *args: str, env: dict[str, str] | None = None):
    """The example's own tests, as its author runs them (``pytest`` in the project)."""
    return _run(agent, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *args], cwd=agent["project"], env=env)


def _agents_alive(root: Path) -> list[str]:
    """Agent processes serving a sandbox under ``root``."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path("/proc/%s/cmdline" % pid).read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "metaflow_sandbox_agent.agent" in cmdline and str(root) in cmdline:
            alive.append(cmdline.replace("\0", " "))
    return alive


def test_installed_distribution_declares_entry_point(agent) -> None:
    """The wheel pip built registers ``agent`` in the backends entry-point group."""
    (dist,) = importlib_metadata.distributions(path=[str(agent["target"])])
    assert dist.metadata["Name"] == "metaflow-sandbox-agent"
    (ep,) = dist.entry_points.select(group="metaflow_sandbox.backends")
    assert (ep.name, ep.value) == ("agent", "metaflow_sandbox_agent.plugin")


def test_bare_api_runs_a_command_and_leaves_nothing(agent) -> None:
    """``Backend("agent")`` creates a sandbox whose agent runs a command; destroy ends the agent and its directory."""
    code = (
        "import json\n"
        "from metaflow_sandbox import Backend\n"
        "with Backend('agent').create() as sb:\n"
        "    code, out, err = sb.run(['sh', '-c', 'echo from-agent; echo oops >&2; exit 3'])\n"
        "    print(json.dumps([sb.handle.backend, code, out, err]))\n"
        "print(json.dumps(sb.destroy()))\n"
    )
    proc = _run(agent, [sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [["agent", 3, "from-agent\n", "oops\n"], False]
    assert list(agent["root"].iterdir()) == []
    assert _agents_alive(agent["root"]) == []


def test_conformance_kit_passes_against_installed_agent(agent) -> None:
    """The example's tests/test_conformance.py (the kit) passes, limits enforced and checked: no skip."""
    proc = _pytest(agent, "tests/test_conformance.py")
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    from metaflow_sandbox.testing import BackendConformance

    kit_tests = [name for name in vars(BackendConformance) if name.startswith("test_")]
    assert "%d passed" % len(kit_tests) in tail, tail
    assert "skipped" not in tail and "failed" not in tail, tail
    assert _agents_alive(agent["root"]) == []


def test_flow_tier_passes_on_s3(agent, s3_server, tmp_path: Path) -> None:
    """The flow tier runs its flow through installed agent sandboxes on a real S3 server (SeaweedFS)."""
    env = s3_env(s3_server, "agent-%s" % tmp_path.name)
    env["METAFLOW_HOME"] = str(tmp_path / "mf-home")  # no user config
    proc = _pytest(agent, "tests/test_flow_conformance.py", "-k", "OnS3", env=env)
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, tail
    assert "7 passed" in tail and "skipped" not in tail, tail
    assert _agents_alive(agent["root"]) == []


def test_flow_tier_passes_on_local_datastore_when_sharing_host(agent, tmp_path: Path) -> None:
    """Declaring ``shares_host_filesystem`` (AGENT_SHARE_HOST_FS=1) lets the flow run on the local datastore.

    Core picks the local-files path (datastore bound in, code package shared) by that capability, not by
    the backend's name.
    """
    proc = _pytest(agent, "tests/test_flow_conformance.py", "-k", "SharingHost", env={"METAFLOW_HOME": str(tmp_path / "mf-home")})
    tail = proc.stdout[-6000:]
    assert _agents_alive(agent["root"]) == []
    assert proc.returncode == 0, tail
    assert "7 passed" in tail, tail


def test_sharing_declared_through_a_backend_option_is_seen_at_launch(agent, tmp_path: Path) -> None:
    """``METAFLOW_SANDBOX_AGENT_SHARE_HOST_FS=1`` (the documented way to set an option) allows the local datastore."""
    from importlib import resources

    flow = tmp_path / "kitflow.py"
    flow.write_text(resources.files("metaflow_sandbox.testing").joinpath("flows/kitflow.py.txt").read_text())
    env = {"METAFLOW_SANDBOX_AGENT_SHARE_HOST_FS": "1", "METAFLOW_SANDBOX_BACKEND": "agent", "METAFLOW_HOME": str(tmp_path / "mf-home")}
    env["USER"] = "tester"  # Metaflow refuses to run as "root"
    args = [sys.executable, str(flow), "--no-pylint", "--datastore=local", "--metadata=local", "run", "--with", "sandbox"]
    proc = _run(agent, args, cwd=tmp_path, env=env)
    assert "cannot see this machine's files" not in proc.stdout + proc.stderr
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
