"""The conformance kit can fail: run it (pytester) against backends that each break one rule.

The backends live in ``broken/kit_broken_backends.py``; a fabricated distribution's
``entry_points.txt`` registers them in ``metaflow_sandbox.backends``, so the kit finds them through
the same discovery as any installed backend. For each one we assert WHICH kit tests fail.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent
ACME_SRC = HERE.parents[1] / "examples" / "third_party_backend" / "src"
ENTRY_POINTS = {
    "kitgood": "kit_broken_backends:GOOD",
    "exec-none": "kit_broken_backends:EXEC_NONE",
    "raises-nonzero": "kit_broken_backends:RAISES_NONZERO",
    "mixes-streams": "kit_broken_backends:MIXES_STREAMS",
    "buffers": "kit_broken_backends:BUFFERS",
    "ignores-timeout": "kit_broken_backends:IGNORES_TIMEOUT",
    "timeout-no-kill": "kit_broken_backends:NO_KILL",
    "kill-noop": "kit_broken_backends:KILL_NOOP",
    "kill-spares-children": "kit_broken_backends:KILL_SPARES_CHILDREN",
    "destroy-twice-true": "kit_broken_backends:DESTROY_TWICE_TRUE",
    "drops-high-bytes": "kit_broken_backends:DROPS_HIGH_BYTES",
    "missing-raises": "kit_broken_backends:MISSING_RAISES",
    "no-credentials-check": "kit_broken_backends:NO_CREDENTIALS_CHECK",
    "network-at-import": "kit_network_at_import:NET",
    "holds-exec": "kit_broken_backends:HOLDS_EXEC",
    "ignores-ttl": "kit_broken_backends:IGNORES_TTL",
    "destroy-needs-native": "kit_broken_backends:DESTROY_NEEDS_NATIVE",
    "leaks-launcher-env": "kit_broken_backends:LEAKS_ENV",
    "claims-limits": "kit_broken_backends:CLAIMS_LIMITS",
    "local-enforcing": "kit_broken_backends:LOCAL_ENFORCING",
    "drops-stderr": "kit_broken_backends:DROPS_STDERR",
}


@pytest.fixture
def kit(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """A pytester dir where the broken backends are an installed distribution; returns a runner.

    Each kit run is a subprocess: an in-process run restores ``sys.modules`` afterwards, which leaves
    this worker with two generations of the modules the run imported first (the ``local`` backend's,
    say), so a later test could raise one generation's exception class where the other is caught.
    """
    dist = pytester.path / "kit_broken_backends-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kit-broken-backends\nVersion: 0.1\n")
    lines = ["[metaflow_sandbox.backends]"] + ["%s = %s" % kv for kv in ENTRY_POINTS.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(map(str, [pytester.path, HERE / "broken", ACME_SRC])))
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session", autouse=True)
        def api_key():
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("KITGOOD_API_KEY", "secret")
                mp.setenv("ACME_ROOT", %r)
                yield
        """
        % str(pytester.path)
    )

    def run(backend: str, *select: str, body: str = "", tier: str = "BackendConformance") -> pytest.RunResult:
        head = textwrap.dedent(
            """
            import pytest
            from metaflow_sandbox.testing import %s

            class TestKit(%s):
                backend = %r
                required_env = ("KITGOOD_API_KEY",)
            """
            % (tier, tier, backend)
        )
        pytester.makepyfile(test_kit=head + textwrap.indent(textwrap.dedent(body), " " * 4))
        args = ["-p", "no:cacheprovider", "-rfEs"] + (["-k", " or ".join(select)] if select else [])
        return pytester.runpytest_subprocess(*args)

    return run


def _failed(result: pytest.RunResult) -> set[str]:
    return {line.split("::")[-1].split(" ")[0] for line in result.outlines if line.startswith(("FAILED ", "ERROR "))}


def test_correct_backend_passes_everything(kit) -> None:
    """Control: the same backend without a bug passes the whole kit (no false alarms)."""
    result = kit("kitgood")
    result.assert_outcomes(passed=36, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*enforces_limits=False*advisory*"])


STOPPING = ("exec_timeout", "exec_cancel", "exec_kill")
EXEC_BASICS = "exec and not timeout and not streams and not limits and not cancel and not kill"
# backend -> (kit tests selected with -k, kit tests that must fail, how many selected tests pass (, skip))
CASES = {
    "exec-none": (
        ("exec_exit", "exec_stdout", "exec_env", "lifecycle"),
        {"test_exec_exit_codes_are_results", "test_exec_stdout_stderr_separate", "test_exec_env_visible", "test_lifecycle_ttl_honoured"},
        6,
    ),
    "raises-nonzero": ((EXEC_BASICS,), {"test_exec_exit_codes_are_results"}, 10),
    "mixes-streams": (
        (EXEC_BASICS,),
        {"test_exec_stdout_stderr_separate", "test_exec_unicode_round_trip"},
        9,
    ),
    "buffers": (("exec_streams", "exec_exit"), {"test_exec_streams_before_exit"}, 1),
    # The facade keeps every deadline; what a backend can still get wrong is how it stops a command.
    "timeout-no-kill": (STOPPING, {"test_exec_timeout_raises_and_kills"}, (1, 1)),
    "kill-noop": (STOPPING, {"test_exec_kill_keeps_sandbox_usable"}, 2),
    "kill-spares-children": (STOPPING, {"test_exec_timeout_raises_and_kills", "test_exec_cancel_stops_command"}, 1),
    "destroy-twice-true": (
        ("lifecycle",),
        {"test_lifecycle_destroy_is_idempotent", "test_lifecycle_destroy_from_bare_handle_in_another_process"},
        5,
    ),
    "drops-high-bytes": (("files",), {"test_files_all_byte_values_round_trip"}, 8),
    "missing-raises": (
        ("files",),
        {"test_files_missing_download_is_file_not_found", "test_files_batch_results_in_order"},
        7,
    ),
    "no-credentials-check": (("offline",), {"test_offline_missing_credentials_named"}, 5),
    "network-at-import": (("offline",), {"test_offline_import_makes_no_network_call"}, 5),
    "holds-exec": (("exec_leftover", "exec_exit"), {"test_exec_leftover_processes_do_not_hold_exec"}, 1),
    "ignores-ttl": (("lifecycle",), {"test_lifecycle_ttl_honoured"}, 6),
    "destroy-needs-native": (("lifecycle_destroy",), {"test_lifecycle_destroy_from_bare_handle_in_another_process"}, 1),
    "leaks-launcher-env": (("exec_task_env", "exec_env"), {"test_exec_task_environment"}, 1),
    "claims-limits": (("exec_limits", "exec_exit"), {"test_exec_limits_enforced_when_declared"}, 1),
}


@pytest.mark.parametrize("backend", sorted(CASES))
def test_kit_catches_the_bug(kit, backend: str) -> None:
    """Each broken backend fails exactly the kit tests written for the rule it breaks."""
    select, must_fail, passing = CASES[backend]
    passed, skipped = passing if isinstance(passing, tuple) else (passing, 0)
    result = kit(backend, *select)
    assert _failed(result) == must_fail, "\n".join(result.outlines[-40:])
    result.assert_outcomes(failed=len(must_fail), passed=passed, skipped=skipped)
    for name in sorted(must_fail):  # one call each: the summary lists them in run order
        result.stdout.fnmatch_lines(["FAILED test_kit.py::TestKit::%s*" % name])  # " - reason" only when it fits


# The flow tier runs its flow in subprocesses: they find the fabricated distribution through PYTHONPATH.
FLOW_TIER_BODY = """
def flow_env(self):
    import os
    return {"PYTHONPATH": os.pathsep.join([%r, %r, %r])}
"""


@pytest.mark.slow
def test_flow_tier_catches_the_bug(kit, pytester: pytest.Pytester) -> None:
    """A backend that drops stderr (otherwise correct, sharing the host's files) fails only the flow tier's logs test.

    The other six flow tests passing in the same run are the control: the harness itself runs a flow.
    """
    body = FLOW_TIER_BODY % (str(pytester.path), str(HERE / "broken"), str(ACME_SRC))
    result = kit("drops-stderr", body=body, tier="FlowConformance")
    assert _failed(result) == {"test_flow_logs_persisted"}, "\n".join(result.outlines[-60:])
    result.assert_outcomes(failed=1, passed=6)
    result.stdout.fnmatch_lines(["*kit-log start stderr*"])


def test_facade_stops_a_backend_that_ignores_timeouts(kit) -> None:
    """An older backend with no kill hook that ignores ``timeout`` still passes the timeout and cancel rules:
    the facade destroys its sandbox to stop the command (and the kill-hook test is a named skip)."""
    result = kit("ignores-timeout", *STOPPING)
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*does not implement the optional sandbox_exec_kill*"])


def test_enforced_limits_pass_on_a_backend_that_enforces_them(kit) -> None:
    """Control for ``claims-limits``: ``local`` (CPU affinity, memory cgroup) declaring enforces_limits passes."""
    result = kit("local-enforcing", "exec_limits", body="required_env = ()")
    result.assert_outcomes(passed=1)


def test_base_class_alone_collects_nothing(pytester: pytest.Pytester) -> None:
    """Importing the kit does not run it: only an author's ``Test*`` subclass is collected."""
    pytester.makepyfile(test_import="from metaflow_sandbox.testing import BackendConformance  # noqa: F401\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes()
    assert "no tests ran" in result.stdout.str()


def test_silent_override_is_caught(kit) -> None:
    """Replacing a kit test without saying so fails the guard; the same override with xfail(reason) passes."""
    override = """
    def test_exec_env_visible(self):
        pass
    """
    result = kit("kitgood", "offline_no_silent", body=override)
    assert _failed(result) == {"test_offline_no_silent_overrides"}
    result.stdout.fnmatch_lines(["*overridden without @pytest.mark.xfail*test_exec_env_visible*"])
    declared = """
    @pytest.mark.xfail(reason="our provider drops env on exec", strict=True)
    def test_exec_env_visible(self):
        assert False
    """
    result = kit("kitgood", "offline_no_silent", "exec_env", body=declared)
    result.assert_outcomes(passed=1, xfailed=1)


def test_missing_required_env_skips_live_tests_by_name(kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without credentials the live tests skip, naming the variable; the offline tier still runs."""
    result = kit("kitgood", "lifecycle_create", "offline_entry", body='required_env = ("KIT_NEVER_SET_TOKEN",)')
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*KIT_NEVER_SET_TOKEN not set*"])


def test_capability_flag_turns_into_a_named_skip(kit) -> None:
    """A capability turned off is an explicit skip with the reason, not a silent pass."""
    result = kit("buffers", "exec_streams", body="streams_output = False")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*streams_output = False*"])
