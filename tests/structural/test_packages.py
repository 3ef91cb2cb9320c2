"""Architecture rules checked on the source tree (every ``packages/*`` distribution, present and future):

- one version for all distributions, in pyproject.toml and in each package's ``__version__``;
- first-party pins agree with that version (core extras ``==X.Y.Z``, backends ``>=X.Y,<X.(Y+1)``);
- the core ``metaflow_sandbox`` and every backend never import ``metaflow`` (only the extension layer does);
- backends import only the public ``metaflow_sandbox`` API, never ``metaflow_sandbox.<submodule>``.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.parent for p in REPO.glob("packages/*/pyproject.toml"))
CORE = REPO / "packages" / "metaflow-sandbox-core"
BACKEND_DIRS = [p for p in PACKAGES if p != CORE] + [REPO / "examples" / "third_party_backend", REPO / "examples" / "agent_backend"]


def _project(pkg: Path) -> dict:
    return tomllib.loads((pkg / "pyproject.toml").read_text())["project"]


def _top_packages(pkg: Path) -> list[Path]:
    """Importable packages under src/, without the Metaflow extension layer."""
    return [p for p in sorted((pkg / "src").iterdir()) if (p / "__init__.py").exists() and p.name != "metaflow_extensions"]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import statement in a file; relative imports resolved to their package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _sources(pkgs: list[Path]) -> list[Path]:
    return [f for pkg in pkgs for top in _top_packages(pkg) for f in sorted(top.rglob("*.py"))]


def test_all_known_distributions_are_checked() -> None:
    names = {_project(p)["name"] for p in PACKAGES}
    assert "metaflow-sandbox" in names and len(names) == len(PACKAGES)


def test_distributions_share_one_version() -> None:
    versions = {_project(p)["name"]: _project(p)["version"] for p in PACKAGES}
    assert len(set(versions.values())) == 1, versions


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_dunder_version_matches_pyproject(pkg: Path) -> None:
    version = _project(pkg)["version"]
    tops = _top_packages(pkg)
    assert tops, "no package under %s/src" % pkg
    for top in tops:
        tree = ast.parse((top / "__init__.py").read_text())
        values = [
            node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ]
        assert values == [version], "%s/__init__.py __version__ = %s, pyproject says %s" % (top.name, values, version)


def test_first_party_pins_agree_with_the_version() -> None:
    version = Version(_project(CORE)["version"])
    names = {_project(p)["name"] for p in PACKAGES}
    for extra, reqs in _project(CORE).get("optional-dependencies", {}).items():
        for req in map(Requirement, reqs):
            if req.name in names:
                assert str(req.specifier) == "==%s" % version, "extra [%s] pins %s" % (extra, req)
    for pkg in PACKAGES:
        if pkg == CORE:
            continue
        (core,) = [r for r in map(Requirement, _project(pkg)["dependencies"]) if r.name == "metaflow-sandbox"]
        assert version in core.specifier, "%s requires %s" % (pkg.name, core)
        nxt = Version("%d.%d" % (version.major, version.minor + 1))
        assert nxt not in core.specifier, "%s must stay within core %d.%d.*" % (pkg.name, version.major, version.minor)


@pytest.mark.parametrize("path", _sources([CORE] + BACKEND_DIRS), ids=lambda p: str(p.relative_to(REPO)))
def test_core_and_backends_never_import_metaflow(path: Path) -> None:
    bad = [(line, mod) for line, mod in _imports(path) if mod == "metaflow" or mod.startswith("metaflow.")]
    assert not bad, "%s imports Metaflow (only src/metaflow_extensions may): %s" % (path.relative_to(REPO), bad)


@pytest.mark.parametrize("path", _sources(BACKEND_DIRS), ids=lambda p: str(p.relative_to(REPO)))
def test_backends_import_only_the_public_api(path: Path) -> None:
    # Public subpackages: the kit, and the emulator toolkit (docs/adding-a-backend.md, "Emulating your provider").
    public = r"metaflow_sandbox\.(testing|emulation)(\.|$)"
    bad = [(line, mod) for line, mod in _imports(path) if re.match(r"metaflow_sandbox\.", mod) and not re.match(public, mod)]
    assert not bad, "%s reaches into core internals: %s; import from `metaflow_sandbox` (or its testing, emulation) only" % (
        path.relative_to(REPO),
        bad,
    )


def test_import_scanner_sees_violations(tmp_path: Path) -> None:
    """The AST scanner itself catches every import form (so the rules above can fail)."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import metaflow\nfrom metaflow.plugins import x\nimport metaflow_sandbox.plugins as p\n"
        "from metaflow_sandbox.session import Backend\nfrom metaflow_sandbox import hookimpl\n"
        "def f():\n    import metaflow.cli\n"
    )
    mods = [m for _, m in _imports(sample)]
    assert mods == [
        "metaflow",
        "metaflow.plugins",
        "metaflow_sandbox.plugins",
        "metaflow_sandbox.session",
        "metaflow_sandbox",
        "metaflow.cli",
    ]
