"""The emulator toolkit itself (metaflow_sandbox.emulation): the fault schedule's rules, and a toy emulator
built on it run for real (a child process, its handshake, its admin API, leases, local sandboxes, and
its exit when the launcher dies)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from metaflow_sandbox.emulation import FaultSchedule, launch


@dataclasses.dataclass
class ToyFaults(FaultSchedule):
    ENDPOINTS = ("ping", "create", "run")

    error_endpoints: tuple[str, ...] = ("ping",)


# -- the fault schedule -----------------------------------------------------------------------------
def test_unknown_switch_and_endpoint_are_refused_naming_the_known_ones() -> None:
    faults = ToyFaults()
    with pytest.raises(ValueError, match=r"unknown fault switch\(es\) \['latency'\]; known: .*'latency_ms'"):
        faults.set(latency=5)
    with pytest.raises(ValueError, match=r"unknown endpoint\(s\) \['pong'\] in error_endpoints; known: \['create', 'ping', 'run'\]"):
        faults.set(error_rate=1.0, error_endpoints=["ping", "pong"])
    with pytest.raises(ValueError, match="lost_reply_endpoints"):
        ToyFaults(lost_reply_endpoints=("nope",))
    with pytest.raises(ValueError, match="time_scale must be > 0"):
        faults.set(time_scale=0)
    assert faults.error_rate == 0 and faults.error_endpoints == ("ping",)  # a refused call changed nothing


def test_set_merges_and_clear_resets_everything() -> None:
    faults = ToyFaults()
    faults.set(error_next=2, seed=4, outage=False)
    faults.set(latency_ms=7, error_endpoints="create")  # merges: the countdown and the seed stay
    assert (faults.error_next, faults.seed, faults.latency_ms, faults.error_endpoints) == (2, 4, 7, ("create",))
    assert faults.error_for("create") == 503 and faults.error_next == 1
    faults.set(error_rate=0.5, error_next=0)
    first = [faults.error_for("create") for _ in range(10)]
    faults.clear()
    assert faults.as_dict() == ToyFaults().as_dict()
    assert faults.error_for("ping") is None
    faults.set(seed=4, error_rate=0.5, error_endpoints=["create"])
    assert [faults.error_for("create") for _ in range(10)] == first  # the seeded streams start over


def test_the_nth_request_to_an_endpoint_meets_the_same_fate_however_others_interleave() -> None:
    def fates(order: str) -> dict[str, list[Any]]:
        faults = ToyFaults().set(seed=11, error_rate=0.3, error_status=[429, 503], error_endpoints=["ping", "run"])
        faults.set(lost_reply_rate=0.3, lost_reply_endpoints=["create", "run"])
        seen: dict[str, list[Any]] = {"ping": [], "create": [], "run": []}
        for name in order:
            endpoint = {"p": "ping", "c": "create", "r": "run"}[name]
            seen[endpoint].append((faults.error_for(endpoint), faults.lose_reply(endpoint)))
        return seen

    together = fates("pcr" * 30)
    assert fates("p" * 30 + "c" * 30 + "r" * 30) == together
    assert fates("r" * 30 + "cp" * 30) == together
    assert {status for status, _ in together["ping"]} == {None, 429, 503}  # the switches did bite
    assert any(lost for _, lost in together["run"]) and not any(lost for _, lost in together["ping"])
    other_seed = ToyFaults().set(seed=12, error_rate=0.3, error_status=[429, 503], error_endpoints=["ping"])
    assert [other_seed.error_for("ping") for _ in range(30)] != [status for status, _ in together["ping"]]


def test_countdowns_and_outage() -> None:
    faults = ToyFaults().set(vanish_next_exec=2)
    assert [faults.take("vanish_next_exec") for _ in range(3)] == [True, True, False]
    faults.set(vanish_next_exec=True)
    assert all(faults.take("vanish_next_exec") for _ in range(5))
    faults.set(outage=True)
    assert faults.error_for("create") == 503  # every endpoint, whatever error_endpoints says


# -- a toy emulator, run for real ---------------------------------------------------------------------
TOY = """
import argparse, json, uuid
from aiohttp import web
from metaflow_sandbox.emulation import EmulatedSandbox, FaultSchedule
from metaflow_sandbox.emulation.server import EmulatorServer, common_arguments, run


class Faults(FaultSchedule):
    ENDPOINTS = ("ping", "create", "run")


class Toy(EmulatorServer):
    NAME = "toy"
    FAULTS = Faults

    def apps(self):
        async def ping(request):
            return web.json_response({"pong": True})

        async def create(request):
            body = await request.json()
            local = await self.runner.create({}, {"toy": "1"})
            sb = EmulatedSandbox(uuid.uuid4().hex[:8], labels=body.get("labels", {}), request=body, local=local,
                                 workdir=local.handle.workdir, lease_seconds=body.get("lease"))
            self.sandboxes[sb.id] = sb
            return web.json_response({"id": sb.id})

        async def run_command(request):
            sb = self.sandboxes[request.match_info["id"]]
            out = []
            sb.running.add("cmd")
            try:
                result = await self.runner.start(sb.local, ["sh", "-c", (await request.json())["cmd"]],
                                                 lambda kind, text: out.append(text), exec_id="cmd")
                code = result.exit_code
            except Exception as exc:
                code = type(exc).__name__
            finally:
                sb.running.discard("cmd")
            return web.json_response({"code": code, "out": "".join(out)})

        names = {"/ping": "ping", "/sandboxes": "create"}
        app = web.Application(middlewares=[self.middleware("api", lambda r: names.get(r.path, "run"))])
        app.add_routes([web.get("/ping", ping), web.post("/sandboxes", create), web.post("/sandboxes/{id}/run", run_command)])
        return [("api", app, 0)]

    def env(self):
        return {"TOY_URL": self.urls["api"]}


args = common_arguments(argparse.ArgumentParser(), "toy-key").parse_args()
run(Toy(args.api_key, json.loads(args.faults)), args)
"""


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("toy")
    (path / "toy_emulator.py").write_text(TOY)
    return str(path)


@pytest.fixture(scope="module")
def toy(toy_path: str):
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = toy_path + (os.pathsep + old if old else "")
    try:
        handle = launch("toy_emulator", faults={"latency_ms": 1})
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    yield handle
    handle.stop()
    assert handle.proc.returncode == 0


@pytest.fixture(autouse=True)
def _clear(request: pytest.FixtureRequest) -> None:
    if "toy" in request.fixturenames:
        request.getfixturevalue("toy").clear_faults()


def _call(url: str, body: Any = None) -> tuple[int, Any, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, data=data, method="POST" if data else "GET"), timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)


def test_handshake_gives_env_endpoints_and_the_faults_it_was_started_with(toy) -> None:
    assert toy.env["TOY_URL"].startswith("http://127.0.0.1:")
    assert sorted(toy.endpoints) == ["create", "ping", "run"]
    toy.set_faults(error_next=1)
    assert toy.faults()["latency_ms"] == 0  # cleared by the autouse fixture, like every switch...
    assert toy.faults()["error_next"] == 1  # ...and set() merges


def test_injected_errors_lost_replies_and_the_request_log(toy) -> None:
    url = toy.env["TOY_URL"]
    toy.clear_requests()
    toy.set_faults(error_next=1, error_status=429, retry_after=1.5, error_endpoints=["ping"])
    status, _, headers = _call(url + "/ping")
    assert (status, headers.get("Retry-After")) == (429, "2")  # whole seconds, rounded up
    assert _call(url + "/ping")[0] == 200
    toy.set_faults(lost_reply_next=1, lost_reply_endpoints=["create"])
    status, _, _ = _call(url + "/sandboxes", {"labels": {"lost": "1"}})
    assert status == 504
    (made,) = [r for r in toy.live_sandboxes() if r["labels"] == {"lost": "1"}]  # carried out all the same
    log = toy.requests()
    assert [(r["endpoint"], r["status"], bool(r.get("lost_reply"))) for r in log] == [
        ("ping", 429, False),
        ("ping", 200, False),
        ("create", 504, True),
    ]
    assert toy.stats()["injected_429"] == 1 and toy.stats()["lost_reply"] >= 1
    with pytest.raises(ValueError, match="unknown endpoint"):
        toy.set_faults(error_endpoints=["pong"])


def test_leases_end_sandboxes_in_provider_time_and_stop_their_commands(toy) -> None:
    url = toy.env["TOY_URL"]
    toy.set_time_scale(0.1)  # 20 provider seconds last 2 s
    status, body, _ = _call(url + "/sandboxes", {"lease": 20, "labels": {"t": "lease"}})
    assert status == 200
    start = time.monotonic()
    status, ran, _ = _call(url + "/sandboxes/%s/run" % body["id"], {"cmd": "echo hi; sleep 30"})
    assert ran == {"code": "SandboxCancelledError", "out": "hi\n"}  # the lease's end stopped the command
    assert 1.0 < time.monotonic() - start < 10
    (record,) = [r for r in toy.records() if r["id"] == body["id"]]
    assert record["reason"] == "expired" and record["ended"]
    assert body["id"] not in [r["id"] for r in toy.live_sandboxes()]


@pytest.mark.parametrize("where", ["main-thread", "worker-thread"])
def test_the_emulator_exits_when_its_launcher_is_sigkilled(toy_path: str, tmp_path, where: str) -> None:
    """From the main thread (PR_SET_PDEATHSIG and stdin EOF) or a worker thread that has ended (stdin EOF only:
    the death signal follows the launching thread, so it must not be set there)."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, threading, time
            from metaflow_sandbox.emulation import launch
            handles = []
            if sys.argv[1] == "main-thread":
                handles.append(launch("toy_emulator"))
            else:
                t = threading.Thread(target=lambda: handles.append(launch("toy_emulator")))
                t.start(); t.join()
            print(handles[0].proc.pid, flush=True)
            time.sleep(60)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=toy_path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parent = subprocess.Popen([sys.executable, str(script), where], stdout=subprocess.PIPE, text=True, env=env)
    pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    time.sleep(0.5)
    assert _alive(pid), "the emulator died with its launching thread"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while _alive(pid):
        assert time.monotonic() < deadline, "the emulator outlived its SIGKILLed launcher"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- images, the bare base and enforced resources (emulation.images, LocalRunner) --------------------
# tabulate is absent from the dev venv (checked below), so an import of it can only come from an image.
@pytest.fixture(scope="module")
def image_kit(tmp_path_factory):
    from metaflow_sandbox.emulation import BareBase, ImageStore

    root = str(tmp_path_factory.mktemp("kit"))
    os.chmod(root, 0o755)
    for parent in [os.path.dirname(root), os.path.dirname(os.path.dirname(root))]:
        os.chmod(parent, os.stat(parent).st_mode | 0o711)
    return BareBase(root), ImageStore(os.path.join(root, "images"))


def _run_in(runner, argv, **create: Any) -> tuple[int, str]:
    import asyncio

    async def go() -> tuple[int, str]:
        out: list[str] = []
        sb = await runner.create({}, {}, **create)
        try:
            res = await runner.blocking(sb.exec, argv, on_stdout=out.append, on_stderr=out.append)
        finally:
            await runner.blocking(sb.destroy)
        return res.exit_code, "".join(out)

    return asyncio.run(go())


def test_an_image_is_a_real_pip_install_that_a_bare_base_sandbox_imports_and_pip_is_recorded(image_kit) -> None:
    from metaflow_sandbox.emulation import LocalRunner

    with pytest.raises(ImportError):
        __import__("tabulate")
    base, store = image_kit
    lines: list[str] = []
    image = store.build(store.add("kit-tabulate", ["tabulate"]), on_log=lines.append)
    assert image.state == "active" and image.size_bytes > 0 and image.done.is_set()
    assert any("Successfully installed tabulate" in line for line in lines) and lines == image.log
    probe = "import tabulate, sys; print('TAB', tabulate.__name__); import boto3"
    runner = LocalRunner(base=base)
    code, out = _run_in(runner, ["bash", "-c", "python -c %r; pip install six; python -m pip install six; exit 0" % probe], image=image)
    assert code == 0 and "TAB tabulate" in out
    assert "No module named 'boto3'" in out  # the launcher's venv has boto3; the bare base does not
    assert base.pip_attempts() == ["pip install six", "python -m pip install six"]
    code, out = _run_in(runner, ["python", "-c", "import tabulate"])  # no image: the base alone
    assert code == 1 and "No module named 'tabulate'" in out


def test_a_failed_build_keeps_pips_output_and_leaves_no_directory(image_kit) -> None:
    _, store = image_kit
    image = store.build(store.add("kit-broken", ["mfsb-no-such-package-xyz==0.0.1"]))
    assert image.state == "error" and "No matching distribution found for mfsb-no-such-package-xyz" in (image.error or "")
    assert not os.path.exists(image.path) and not os.path.exists(image.path + ".building")
    with pytest.raises(ValueError, match="already exists"):
        store.add("kit-broken", [])
    assert store.remove("kit-broken") and not store.remove("kit-broken")


def test_local_runner_enforces_cpu_and_hides_the_launchers_home(tmp_path) -> None:
    from metaflow_sandbox import Resources
    from metaflow_sandbox.emulation import LocalRunner

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell a 1-CPU limit apart")
    home = os.path.expanduser("~")
    secret = os.path.join(home, ".mfsb-emulation-probe-%d" % os.getpid())
    with open(secret, "w") as f:
        f.write("launcher secret")
    try:
        runner = LocalRunner()
        code, out = _run_in(runner, ["bash", "-c", "nproc; cat %s" % secret], resources=Resources(cpu=1, memory_mb=256))
    finally:
        os.unlink(secret)
    assert out.splitlines()[0] == "1"
    assert "launcher secret" not in out and code != 0
