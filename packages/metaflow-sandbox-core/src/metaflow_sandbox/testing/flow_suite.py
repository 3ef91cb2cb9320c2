"""``FlowConformance``: the optional tier that runs a small real Metaflow flow through a backend.

The kit's unit tier proves each hook keeps the contract; this tier proves a flow runs: a foreach,
``@retry`` after a failed first attempt, ``@catch``, logs and artifacts, every step in a sandbox of
the backend under test, on the datastore the author chooses. The flow (``flows/kitflow.py.txt``) runs
as ``python kitflow.py --datastore=<datastore> run --with sandbox`` in a subprocess, once per class;
the tests then read the run back with the Metaflow client, also in a subprocess (the core package
never imports Metaflow).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import pytest

from metaflow_sandbox import MARKER_LABEL, Backend

FLOW_CLASS = "KitFlow"

# Reads the run back with the Metaflow client; argv: run id, backend name. Prints one JSON line.
_READ_BACK = textwrap.dedent(
    """
    import hashlib, json, sys
    from metaflow import Flow, namespace
    namespace(None)
    run = Flow(%r)[sys.argv[1]]
    tasks = {step.id: list(step) for step in run}
    facts = {
        "successful": run.successful,
        "steps": sorted(tasks),
        "values": run["join"].task.data.values,
        "attempts": run["join"].task.data.attempts,
        "caught": str(run["caught"].task.data.caught_error),
        "payload_sha": hashlib.sha256(run["end"].task.data.payload).hexdigest(),
        "task_backends": {s: sorted({t.metadata_dict.get("sandbox-backend", "") for t in ts}) for s, ts in tasks.items()},
        "env_backends": sorted({t.data.backend_seen for t in list(tasks["start"]) + list(tasks["square"])}),
        "square_tasks": [t.pathspec for t in tasks["square"]],
    }
    print("KIT-FACTS " + json.dumps(facts))
    """
    % FLOW_CLASS
)
PAYLOAD = b"\x00\xff" * 1000 + "h\u00e9llo".encode()


@dataclass
class FlowRun:
    """One ``python kitflow.py ... run`` of the kit flow, with what it takes to look at it again."""

    returncode: int
    output: str
    cwd: Path
    env: dict[str, str]
    run_id: Optional[str]

    def flow_cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(self.cwd / "kitflow.py"), "--no-pylint", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


class FlowConformance:
    """Subclass as ``class TestMyBackendFlow(FlowConformance): backend = "name"``.

    Set ``datastore = "s3"`` and return the S3 settings from ``flow_env()`` to run on S3 (a backend
    whose sandboxes do not see the launcher's files needs a remote datastore).
    """

    #: Entry-point name in the ``metaflow_sandbox.backends`` group.
    backend: str = ""
    #: ``local`` (only for a backend with ``Capabilities.shares_host_filesystem``), ``s3``, ``azure`` or ``gs``.
    datastore: str = "local"
    #: Seconds the whole flow may take.
    flow_timeout_seconds: float = 600.0

    def flow_env(self) -> dict[str, str]:
        """Extra environment for the flow: datastore settings (``METAFLOW_DATASTORE_SYSROOT_S3``, ...), credentials."""
        return {}

    def backend_options(self) -> dict[str, Any]:
        """Backend options, passed to the flow as ``METAFLOW_SANDBOX_<BACKEND>_<KEY>``."""
        return {}

    # ----- fixtures --------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def kit_flow(cls, tmp_path_factory: pytest.TempPathFactory) -> FlowRun:
        """The kit flow, run once for the class."""
        pytest.importorskip("metaflow", reason="the flow tier needs Metaflow: pip install metaflow")
        assert cls.backend, 'set `backend = "<entry-point name>"` on %s' % cls.__name__
        author = cls()
        cwd = tmp_path_factory.mktemp("kit-flow")
        (cwd / "kitflow.py").write_text(resources.files("metaflow_sandbox.testing").joinpath("flows/kitflow.py.txt").read_text())
        prefix = "METAFLOW_SANDBOX_%s_" % cls.backend.upper().replace("-", "_")
        env = dict(os.environ)
        if not any(env.get(v) not in (None, "", "root") for v in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
            env["METAFLOW_USER"] = "kit"  # Metaflow refuses to run without a user name, and "root" is none
        env.update({prefix + key.upper(): str(value) for key, value in author.backend_options().items()})
        env.update(author.flow_env())
        env["METAFLOW_SANDBOX_BACKEND"] = cls.backend
        args = ["--datastore=%s" % cls.datastore, "--metadata=local", "run", "--with", "sandbox"]
        proc = subprocess.run(
            [sys.executable, str(cwd / "kitflow.py"), "--no-pylint", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=cls.flow_timeout_seconds,
            check=False,
        )
        output = proc.stdout + proc.stderr
        run_id = next(
            (line.split("run-id ")[1].split(")")[0] for line in output.splitlines() if "Workflow starting (run-id " in line), None
        )
        return FlowRun(proc.returncode, output, cwd, env, run_id)

    @pytest.fixture(scope="class")
    @classmethod
    def kit_facts(cls, kit_flow: FlowRun) -> dict[str, Any]:
        """What the Metaflow client reads back from the run."""
        if kit_flow.returncode != 0 or kit_flow.run_id is None:
            pytest.fail("the kit flow failed (exit %s):\n%s" % (kit_flow.returncode, kit_flow.output[-6000:]))
        proc = subprocess.run(
            [sys.executable, "-c", _READ_BACK, kit_flow.run_id],
            cwd=kit_flow.cwd,
            env=kit_flow.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("KIT-FACTS ")]
        assert lines, "reading the run back failed:\n%s" % proc.stderr[-4000:]
        return json.loads(lines[-1][len("KIT-FACTS ") :])

    # ----- tests -----------------------------------------------------------------------------

    def test_flow_runs_to_completion(self, kit_flow: FlowRun) -> None:
        """``python kitflow.py run --with sandbox`` exits 0 with every step in a sandbox of this backend.

        Troubleshooting: if this fails, read the flow's output in the message: a task that cannot start
        usually means your sandbox lacks something from "What a Metaflow task needs inside your sandbox"
        (docs/adding-a-backend.md), or your ``sandbox_exec`` waits for processes the task left behind.
        """
        assert kit_flow.returncode == 0, kit_flow.output[-6000:]
        assert "Done!" in kit_flow.output

    def test_flow_foreach_and_artifacts(self, kit_facts: dict[str, Any]) -> None:
        """Artifacts cross steps and a foreach: the join sees 1, 4, 9, and binary data round-trips.

        Troubleshooting: if this fails, your sandboxes must reach the datastore (credentials and
        endpoint arrive in ``spec.env``; your ``sandbox_exec`` must pass them to the command).
        """
        assert kit_facts["successful"] is True
        assert kit_facts["steps"] == ["caught", "end", "join", "square", "start"]
        assert kit_facts["values"] == [1, 4, 9]
        assert kit_facts["payload_sha"] == _sha(PAYLOAD)

    def test_flow_retry_reruns_the_failed_attempt(self, kit_facts: dict[str, Any]) -> None:
        """The foreach item whose first attempt raises is retried once and succeeds; the others run once.

        Troubleshooting: if this fails, your ``sandbox_exec`` must return the command's real exit code
        (non-zero for the failed attempt) and each attempt must get a fresh sandbox from your ``sandbox_create``.
        """
        assert kit_facts["attempts"] == {"1": 0, "2": 1, "3": 0}

    def test_flow_catch_keeps_the_exception(self, kit_facts: dict[str, Any]) -> None:
        """A step under ``@catch`` raises; the run goes on and the exception is an artifact.

        Troubleshooting: if this fails, your ``sandbox_exec`` must return exit 0 for the task that
        caught its exception (the task, not your backend, decides), and not raise for it.
        """
        assert "caught on purpose" in kit_facts["caught"]

    def test_flow_logs_persisted(self, kit_flow: FlowRun, kit_facts: dict[str, Any]) -> None:
        """``python kitflow.py logs`` shows each task's stdout and stderr after the run.

        Troubleshooting: if this fails, your ``sandbox_exec`` must deliver all output to ``on_stdout``
        and ``on_stderr`` (stderr apart) before returning: the trampoline stores what it receives.
        """
        out = kit_flow.flow_cli("--datastore=%s" % self.datastore, "logs", "%s/start" % kit_flow.run_id)
        assert "kit-log start stdout" in out.stdout, out.stdout + out.stderr
        err = kit_flow.flow_cli("--datastore=%s" % self.datastore, "logs", "--stderr", "%s/start" % kit_flow.run_id)
        assert "kit-log start stderr" in err.stdout + err.stderr, err.stdout + err.stderr
        retried = kit_flow.flow_cli("--datastore=%s" % self.datastore, "logs", "%s/square" % kit_flow.run_id)
        assert retried.returncode == 0
        assert "kit-log square" in kit_flow.output

    def test_flow_every_task_ran_in_the_backend(self, kit_facts: dict[str, Any]) -> None:
        """Each task's metadata says ``sandbox-backend: <backend>`` and the task saw it in its environment.

        Troubleshooting: if this fails, your ``sandbox_exec`` must run the command with ``spec.env``
        (it carries ``METAFLOW_SANDBOX_BACKEND_NAME`` and the rest of the task's settings).
        """
        assert kit_facts["task_backends"] == {step: [self.backend] for step in kit_facts["steps"]}
        assert kit_facts["env_backends"] == [self.backend]

    def test_flow_leaves_no_sandbox(self, kit_flow: FlowRun, kit_facts: dict[str, Any]) -> None:
        """After the run no sandbox of it is alive (found by its labels through ``sandbox_list``).

        Troubleshooting: if this fails, your ``sandbox_destroy`` must really delete the sandbox, and
        your ``sandbox_list`` must not return destroyed ones.
        """
        backend = Backend(self.backend, options=self.backend_options())
        if not backend.implements("sandbox_list"):
            pytest.skip("backend does not implement the optional sandbox_list hook")
        assert backend.list({MARKER_LABEL: "1", "metaflow.run": str(kit_flow.run_id)}) == []


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["FlowConformance", "FlowRun"]
