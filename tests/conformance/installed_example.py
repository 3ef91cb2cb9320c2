"""Install an example backend from examples/ the way a user would, into a private directory.

pip builds the wheel and installs it into a ``--target`` directory put on PYTHONPATH (fast: no
dependencies are fetched because core is already in this environment). Entry points are found from
its installed ``.dist-info``. Shared by the acme and agent example tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def install(example: str, base: Path, distribution: str) -> dict[str, Path]:
    """Copy ``examples/<example>`` out of the repo and pip-install it; returns project, target and a root dir."""
    project, target = base / distribution, base / "site"
    shutil.copytree(EXAMPLES / example, project, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    # Offline and fast when this environment already has the build backend; else pip fetches hatchling.
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("hatchling") else []
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline, "--target", str(target), str(project)],
        check=True,
        timeout=300,
    )
    return {"project": project, "target": target, "root": base / "sandboxes"}


def run(
    installed: dict[str, Path], args: list[str], root_env: str, with_it: bool = True, env: Optional[dict[str, str]] = None, **kw
) -> subprocess.CompletedProcess:
    """Run ``args`` with the example on PYTHONPATH (or not) and ``<root_env>`` pointing at a fresh root."""
    installed["root"].mkdir(exist_ok=True)
    full = dict(os.environ, **{root_env: str(installed["root"])}, **(env or {}))
    full.pop("PYTHONPATH", None)
    if with_it:
        full["PYTHONPATH"] = str(installed["target"])
    return subprocess.run(args, capture_output=True, text=True, env=full, timeout=900, check=False, **kw)
