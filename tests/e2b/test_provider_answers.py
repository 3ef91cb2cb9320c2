"""What E2B cannot take is refused before any request, and what E2B answers unexpectedly (nothing, HTML,
a 5xx) becomes a SandboxError naming the URL setting and E2B_API_KEY: never a raw httpx/SDK error, a
413 or a codec error, and never a sandbox left behind. Real SDK against the emulator (or a wrong URL)."""

from __future__ import annotations

import http.server
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest
from metaflow_sandbox import MARKER_LABEL, Backend, SandboxError, SandboxSpec, UnsupportedOptionError
from metaflow_sandbox_e2b import plugin
from metaflow_sandbox_e2b.emulator import EmulatorHandle


@pytest.fixture
def labels() -> dict[str, str]:
    return {MARKER_LABEL: "1", "run": uuid.uuid4().hex[:8]}


@pytest.fixture(scope="module")
def sandbox(emulator: EmulatorHandle) -> Iterator:
    with Backend("e2b").create(SandboxSpec(labels={MARKER_LABEL: "1", "run": "answers"}, ttl_seconds=300)) as sb:
        yield sb


@pytest.fixture(scope="module")
def html_server() -> Iterator[str]:
    """A server that answers every request with 200 and an HTML page (a proxy or portal, not E2B)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = b"<html><body>Welcome</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % s.getsockname()[1]  # nothing listens once closed


def _requests(emulator: EmulatorHandle) -> tuple[int, int]:
    stats = emulator.stats()
    return stats.get("api_requests", 0), stats.get("process_start", 0)


def _no_raw_error(err: BaseException) -> None:
    """A SandboxError of ours with a fix line, whatever the SDK raised underneath."""
    assert isinstance(err, SandboxError)
    assert err.hint, "no fix line: %s" % err
    assert "Traceback" not in str(err)


# -- refused before sending --------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, env, named",
    [
        (["echo", "caf\udce9"], {}, "argument 1 of the command"),  # a Latin-1 byte, surrogate-escaped
        (["echo", "ok"], {"DATA": "caf\udce9"}, "environment variable DATA"),
        (["echo", "ok"], {"BIG": "x" * 200_000}, "BIG is 195 KiB"),
        (["echo", "ok"], {"V%d" % i: "y" * 100_000 for i in range(7)}, "the environment is 683 KiB"),
    ],
    ids=["non-utf8-argv", "non-utf8-env", "env-var-over-128k", "env-over-512k"],
)
def test_exec_input_e2b_cannot_carry_is_refused_before_sending(emulator: EmulatorHandle, sandbox, argv, env, named) -> None:
    before = _requests(emulator)
    with pytest.raises(UnsupportedOptionError) as info:
        sandbox.exec(argv, env=env)
    assert named in str(info.value)
    _no_raw_error(info.value)
    assert _requests(emulator)[1] == before[1]  # no command started
    assert sandbox.run(["echo", "still fine"])[:2] == (0, "still fine\n")


def test_create_with_an_environment_e2b_cannot_carry_is_refused_before_any_request(emulator: EmulatorHandle, labels) -> None:
    """Through the hook itself (the facade's own check stops it earlier): no raw 413, nothing created."""
    before = _requests(emulator)
    spec = SandboxSpec(labels=labels, ttl_seconds=60, env={"V%d" % i: "z" * 120_000 for i in range(10)}, lease_seconds=60)
    with pytest.raises(UnsupportedOptionError) as info:
        plugin.sandbox_create(spec=spec)
    assert "KiB" in str(info.value) and "IncludeFile" in info.value.hint
    assert _requests(emulator)[0] == before[0]
    spec = SandboxSpec(labels={**labels, "note": "caf\udce9"}, ttl_seconds=60, lease_seconds=60)
    with pytest.raises(UnsupportedOptionError, match="label note"):
        plugin.sandbox_create(spec=spec)
    assert [s for s in emulator.live_sandboxes() if s["labels"].get("run") == labels["run"]] == []


# -- wrong URLs and unexpected answers ---------------------------------------------------------
@pytest.mark.parametrize("variable", ["E2B_API_URL", "E2B_SANDBOX_URL"])
@pytest.mark.parametrize("where", ["closed", "html"])
def test_wrong_url_names_the_setting_and_leaves_nothing(
    emulator: EmulatorHandle, labels, monkeypatch: pytest.MonkeyPatch, closed_url: str, html_server: str, variable: str, where: str
) -> None:
    url = closed_url if where == "closed" else html_server
    monkeypatch.setenv(variable, url)
    with pytest.raises(SandboxError) as info:
        Backend("e2b", backoff=0.05).create(SandboxSpec(labels=labels, ttl_seconds=60))
    _no_raw_error(info.value)
    assert url in str(info.value)
    assert variable in info.value.hint and "E2B_API_KEY" in info.value.hint
    monkeypatch.setenv(variable, emulator.env[variable])
    assert [s for s in emulator.live_sandboxes() if s["labels"].get("run") == labels["run"]] == []


@pytest.mark.parametrize("where", ["closed", "html"])
def test_list_and_destroy_against_a_wrong_api_url(
    labels, monkeypatch: pytest.MonkeyPatch, closed_url: str, html_server: str, where: str, sandbox
) -> None:
    url = closed_url if where == "closed" else html_server
    monkeypatch.setenv("E2B_API_URL", url)
    backend = Backend("e2b", backoff=0.05)
    calls = [lambda: backend.list({"run": labels["run"]})]
    if where == "closed":  # (a 200 page to DELETE reads as "killed" to the SDK: E2B answers 204 there)
        calls.append(lambda: plugin.sandbox_destroy(handle=_detached(sandbox)))
    for call in calls:
        with pytest.raises(SandboxError) as info:
            call()
        _no_raw_error(info.value)
        assert url in str(info.value) and "E2B_API_URL" in info.value.hint


def _detached(sandbox):
    """A handle as `list` gives it (no live SDK object), so destroy goes to the REST API."""
    from metaflow_sandbox import SandboxHandle

    return SandboxHandle("e2b", sandbox.id, workdir=sandbox.handle.workdir, labels={}, options={})


def test_wrong_api_key_names_it(emulator: EmulatorHandle, labels, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", "e2b_not-the-key")
    with pytest.raises(SandboxError) as info:
        Backend("e2b").create(SandboxSpec(labels=labels, ttl_seconds=60))
    _no_raw_error(info.value)
    assert "E2B_API_KEY" in info.value.hint and emulator.url in str(info.value)


def test_bad_backend_options_name_the_setting(labels) -> None:
    for key, value in [("lease_seconds", "abc"), ("renew_seconds", "0.01"), ("request_timeout", "inf"), ("max_cpu", "nan")]:
        with pytest.raises(UnsupportedOptionError) as info:
            Backend("e2b", options={key: value}).create(SandboxSpec(labels=labels, ttl_seconds=60))
        assert "METAFLOW_SANDBOX_E2B_%s" % key.upper() in info.value.hint


# -- quotas ------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan, concurrent, per_minute", [("hobby", 20, 60), ("pro", 100, 300)])
def test_capabilities_declare_the_plans_published_quotas(plan: str, concurrent: int, per_minute: int) -> None:
    """E2B's rate-limits page: 20/100 concurrent sandboxes, 1/5 creates per second; the core's limiter keeps to them."""
    caps = Backend("e2b", options={"plan": plan}).capabilities()
    assert (caps.max_concurrent_sandboxes, caps.max_creates_per_minute) == (concurrent, per_minute)
