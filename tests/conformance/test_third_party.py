"""A third-party backend works with no change to core: pip-install the example ``metaflow-sandbox-acme``
distribution, then discover, select and conformance-test it in separate interpreters.

pip builds the wheel and installs it into a private ``--target`` directory put on PYTHONPATH (fast: no
dependencies are fetched because core is already in this environment, which we check against the
distribution's declared requirement). Entry points are found from its installed ``.dist-info``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import importlib_metadata
import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "third_party_backend"


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example copied out of the repo and pip-installed into a private target directory."""
    base = tmp_path_factory.mktemp("third-party")
    project, target = base / "metaflow-sandbox-acme", base / "site"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    # Offline and fast when this environment already has the build backend; else pip fetches hatchling.
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("hatchling") else []
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline, "--target", str(target), str(project)],
        check=True,
        timeout=300,
    )
    return {"project": project, "target": target, "root": base / "sandboxes"}


def _run(acme: dict[str, Path], args: list[str], installed: bool = True, **kw) -> subprocess.CompletedProcess:
    acme["root"].mkdir(exist_ok=True)
    env = dict(os.environ, ACME_ROOT=str(acme["root"]))
    env.pop("PYTHONPATH", None)
    if installed:
        env["PYTHONPATH"] = str(acme["target"])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False, **kw)


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "metaflow-sandbox"
    return [str(script)] if script.exists() else [sys.executable, "-m", "metaflow_sandbox"]


def test_installed_distribution_declares_entry_point_and_core_range(acme) -> None:
    """The wheel pip built carries the entry point and a core requirement this core satisfies."""
    (dist,) = importlib_metadata.distributions(path=[str(acme["target"])])
    assert dist.metadata["Name"] == "metaflow-sandbox-acme"
    (ep,) = dist.entry_points.select(group="metaflow_sandbox.backends")
    assert (ep.name, ep.value) == ("acme", "metaflow_sandbox_acme.plugin")
    requires = [Requirement(r) for r in dist.requires or []]
    (core,) = [r for r in requires if r.name == "metaflow-sandbox" and r.marker is None]  # not the [test] extra
    assert core.specifier.contains(importlib_metadata.version("metaflow-sandbox"))


def test_cli_lists_acme_with_distribution_and_version(acme) -> None:
    """``metaflow-sandbox backends --json`` shows acme (and still local) once it is installed."""
    proc = _run(acme, _cli() + ["backends", "--json"])
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["acme"]["distribution"] == "metaflow-sandbox-acme"
    assert rows["acme"]["version"] == "0.1.0"
    assert rows["acme"]["loads"] is True
    assert rows["acme"]["configured"] is True
    assert rows["local"]["loads"] is True


def test_not_discovered_when_not_installed(acme) -> None:
    """Control: without the installed distribution the name is unknown (discovery is what finds it)."""
    code = "from metaflow_sandbox import Backend\ntry:\n    Backend('acme')\nexcept Exception as e:\n    print(type(e).__name__)"
    proc = _run(acme, [sys.executable, "-c", code], installed=False)
    assert proc.stdout.strip() == "UnknownBackendError", proc.stderr


def test_backend_selectable_by_name(acme) -> None:
    """``Backend("acme")`` creates a sandbox that runs a command and is destroyed."""
    code = (
        "from metaflow_sandbox import Backend\n"
        "with Backend('acme').create() as sb:\n"
        "    code, out, err = sb.run(['sh', '-c', 'echo from-acme; echo oops >&2; exit 3'])\n"
        "    print(sb.handle.backend, code, out.strip(), err.strip())\n"
        "print('destroyed-again', sb.destroy())\n"
    )
    proc = _run(acme, [sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["acme 3 from-acme oops", "destroyed-again False"]
    assert list(acme["root"].iterdir()) == []  # the context manager left nothing behind


def test_conformance_kit_passes_against_installed_acme(acme) -> None:
    """The example's own tests/test_conformance.py (the kit) passes against the installed backend."""
    proc = _run(acme, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"], cwd=acme["project"])
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    from metaflow_sandbox.testing import BackendConformance

    kit_tests = [name for name in vars(BackendConformance) if name.startswith("test_")]
    assert "%d passed, 1 skipped" % (len(kit_tests) - 1) in tail, tail  # acme's cpu/memory are advisory, and it says so
    assert "enforces_limits=False" in tail and "failed" not in tail, tail
