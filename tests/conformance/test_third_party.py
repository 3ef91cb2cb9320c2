"""A third-party backend works with no change to core: pip-install the example ``metaflow-sandbox-acme``
distribution, then discover, select and conformance-test it in separate interpreters.

pip builds the wheel and installs it into a private ``--target`` directory put on PYTHONPATH (fast: no
dependencies are fetched because core is already in this environment, which we check against the
distribution's declared requirement). Entry points are found from its installed ``.dist-info``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import importlib_metadata
import pytest
from packaging.requirements import Requirement

from . import installed_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example copied out of the repo and pip-installed into a private target directory."""
    return installed_example.install("third_party_backend", tmp_path_factory.mktemp("third-party"), "metaflow-sandbox-acme")


def _run(acme: dict[str, Path], args: list[str], installed: bool = True, **kw):
    return installed_example.run(acme, args, "ACME_ROOT", with_it=installed, **kw)


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
