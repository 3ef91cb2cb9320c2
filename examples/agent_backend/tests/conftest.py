"""Give the agent sandboxes a private root for this test session."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def agent_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch_session: pytest.MonkeyPatch) -> str:
    root = str(tmp_path_factory.mktemp("agent-root"))
    monkeypatch_session.setenv("AGENT_ROOT", root)
    return root


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp
