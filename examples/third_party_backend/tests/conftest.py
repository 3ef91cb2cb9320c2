"""Give the acme sandboxes a private root for this test session (an emulator would start here)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def acme_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch_session: pytest.MonkeyPatch) -> str:
    root = str(tmp_path_factory.mktemp("acme-root"))
    monkeypatch_session.setenv("ACME_ROOT", root)
    return root


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp
