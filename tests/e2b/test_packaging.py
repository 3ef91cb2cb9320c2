"""Packaging: the plugin imports cheaply and offline, and the E2B distribution never pulls in Daytona."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from importlib_metadata import PackageNotFoundError, distribution

ROOT = Path(__file__).resolve().parents[2]


def test_plugin_import_loads_neither_sdk_nor_metaflow() -> None:
    code = (
        "import sys, json; from metaflow_sandbox import get_plugin_manager; get_plugin_manager('e2b');"
        "print(json.dumps([m for m in ('e2b', 'aiohttp', 'metaflow', 'daytona') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def _requires(name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Transitive requirement names of an installed distribution (markers honoured, given extras only)."""
    seen: set[str] = set()
    todo = [(name, extras)]
    while todo:
        dist_name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", dist_name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(dist_name)
        except PackageNotFoundError:
            continue
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if extra and extra.group(1) not in wanted:
                continue
            dep = re.match(r"[A-Za-z0-9_.-]+", spec.strip())
            if dep:
                todo.append((dep.group(0), ()))
    return seen


def test_installed_e2b_distribution_does_not_reach_daytona() -> None:
    reached = _requires("metaflow-sandbox-e2b", ("emulator",))
    assert "e2b" in reached and "metaflow-sandbox" in reached
    assert not [d for d in reached if "daytona" in d], sorted(reached)


@pytest.mark.slow
def test_pip_resolution_of_core_and_e2b_has_no_daytona(tmp_path: Path) -> None:
    """What `pip install metaflow-sandbox metaflow-sandbox-e2b` would install, resolved by pip itself."""
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        str(ROOT / "packages" / "metaflow-sandbox-core"), str(ROOT / "packages" / "metaflow-sandbox-e2b"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"metaflow-sandbox", "metaflow-sandbox-e2b", "e2b"} <= names
    assert not [n for n in names if "daytona" in n], sorted(names)
