"""Real flows, real sandboxes, once per backend x datastore target (see conftest.TARGETS).

Each test asserts on artifacts, exit codes, logs and metadata; the `target` fixture also
asserts that no sandbox is left alive afterwards.
"""

from __future__ import annotations

import time


def _ok(run):
    assert run.returncode == 0, run.output[-6000:]


def test_features_artifacts_env_resources_logs_metadata(target):
    key_file = target.tmp / "gcp-key.json"
    key_file.write_text('{"type": "service_account", "marker": "%s"}' % target.tmp.name)
    run = target.flow("features_flow.py", env={"GOOGLE_APPLICATION_CREDENTIALS": str(key_file)})
    _ok(run)
    rid = run.run_id()
    data = target.client(
        """
        t = Run('FeaturesFlow/%s')['work'].task
        import base64, re
        from metaflow.cards import get_cards
        def card_text(html):  # the default card embeds its data as base64 JSON
            return ' '.join(base64.b64decode(b).decode('utf-8', 'replace') for b in re.findall(r'__MF_DATA__.[^]]+. = "([^"]+)"', html))
        emit({k: getattr(t.data, k) for k in ('y', 'cpus', 'env_deco', 'sandbox_env', 'in_sandbox', 'backend_keys_seen', 'gcp_key')}
             | {'meta': t.metadata_dict, 'stdout': t.stdout, 'stderr': t.stderr,
                'cards': [card_text(c.get()) for c in get_cards(t)]})
        """
        % rid,
        run,
    )
    assert data["y"] == 42
    assert data["env_deco"] == "env-ok" and data["sandbox_env"] == "sandbox-ok"
    assert data["in_sandbox"] == "1"
    assert data["backend_keys_seen"] == [], "backend API keys must not reach the sandbox"
    # a key-file credential arrives as a file inside the sandbox, not as a launcher path
    assert data["gcp_key"] == key_file.read_text()
    # @resources(cpu=2) beats @sandbox(cpu=1): the task sees 2 CPUs. On Daytona a sandbox from a snapshot
    # has the snapshot's size (the emulator enforces it: the default one's 1 vCPU), and a warning says so.
    if target.backend == "daytona":
        assert data["cpus"] == 1 and "less than the requested {'cpu': 2}" in run.output
    else:
        assert data["cpus"] == 2
    assert data["meta"]["sandbox-backend"] == target.backend
    assert data["meta"]["sandbox-id"]
    # @card made inside the sandbox is found where the client looks
    assert any("made in a sandbox" in html for html in data["cards"])
    # Logs: every line once, in order, stdout and stderr apart.
    out = [ln for ln in data["stdout"].splitlines() if ln.startswith("out-line")]
    err = [ln for ln in data["stderr"].splitlines() if ln.startswith("err-line")]
    assert out == ["out-line-%d" % i for i in range(5)]
    assert err == ["err-line-%d" % i for i in range(5)]
    assert "err-line" not in data["stdout"] and "out-line" not in data["stderr"]
    # ... and the same through `python flow.py logs`.
    logs = target.flow("features_flow.py", "logs", "%s/work" % rid)
    assert logs.returncode == 0, logs.output
    assert [ln for ln in logs.stdout.splitlines() if "out-line" in ln] == ["out-line-%d" % i for i in range(5)]
    logs_err = target.flow("features_flow.py", "logs", "--stderr", "%s/work" % rid)
    assert [ln for ln in logs_err.stdout.splitlines() if "err-line" in ln] == ["err-line-%d" % i for i in range(5)]
    # Live echo on the terminal: each line once.
    assert sum("out-line-3" in ln for ln in run.output.splitlines()) == 1


def test_branches_join_and_wide_foreach(target):
    # 16 wide on local; Daytona and E2B run their 16-wide foreach under faults (test_faults.py), 6 wide here
    width = 16 if target.backend == "local" else 6
    run = target.flow("fanout_flow.py", env={"FOREACH_N": str(width)})
    _ok(run)
    data = target.client(
        """
        r = Run('FanoutFlow/%s')
        emit({'total': r['meet'].task.data.total, 'squares': r['gather'].task.data.squares,
              'ids': sorted({t.metadata_dict.get('sandbox-id') for t in r['square']}),
              'left': r['left'].task.metadata_dict.get('sandbox-id'), 'right': r['right'].task.metadata_dict.get('sandbox-id')})
        """
        % run.run_id(),
        run,
    )
    assert data["total"] == 23
    assert data["squares"] == sorted(i * i + 23 for i in range(width))
    assert len(data["ids"]) == width and None not in data["ids"], "each foreach task runs in its own sandbox"
    assert data["left"] and data["right"] is None


def test_retry_then_catch(target):
    run = target.flow("failures_flow.py")
    _ok(run)
    data = target.client(
        """
        r = Run('FailuresFlow/%s')
        emit({'attempt_ok': r['flaky'].task.data.attempt_ok, 'caught': r['end'].task.data.caught})
        """
        % run.run_id(),
        run,
    )
    assert data["attempt_ok"] == 1
    assert "boom from the sandbox" in data["caught"]
    assert "first attempt fails on purpose" in run.output


def test_timeout_fails_the_step_with_a_timeout_message(target):
    """@timeout's alarm ends the step inside its sandbox. A step that ignores the alarm is stopped by the
    facade's deadline (limit + METAFLOW_SANDBOX_TIMEOUT_GRACE, counted from the command's start): a timeout
    message, never an exit code, and no sandbox left (the target fixture checks)."""
    run = target.flow("timeout_flow.py", timeout=240)
    assert run.returncode != 0
    assert "going to sleep" in run.output
    assert "timed out" in run.output.lower()
    assert "ran past its time limit" not in run.output, "the alarm, not the sandbox deadline, ends this one"
    started = time.monotonic()
    stubborn = target.flow("timeout_flow.py", "run", "--stubborn", "true", env={"METAFLOW_SANDBOX_TIMEOUT_GRACE": "2"}, timeout=240)
    assert stubborn.returncode != 0
    assert "Step *slow* ran past its time limit of 3s (@timeout) and its sandbox was stopped." in stubborn.output, stubborn.output[-4000:]
    assert time.monotonic() - started < 120, "the stubborn step was not stopped at its deadline (3 s + 2 s grace)"


def test_resume_clones_and_reruns_in_a_sandbox(target):
    # FAIL_B reaches the sandbox only because METAFLOW_SANDBOX_FORWARD_ENV names it.
    failed = target.flow("resume_flow.py", env={"FAIL_B": "1", "METAFLOW_SANDBOX_FORWARD_ENV": "FAIL_B"})
    assert failed.returncode != 0 and "b fails on purpose" in failed.output
    resumed = target.flow("resume_flow.py", "resume")
    _ok(resumed)
    assert "Cloning" in resumed.output or "cloned" in resumed.output.lower()
    data = target.client(
        """
        r = Flow('ResumeFlow').latest_run
        emit({'b': r['b'].task.data.b_value, 'b_sandbox': r['b'].task.metadata_dict.get('sandbox-id'),
              'origin': r.data.__class__.__name__})
        """,
        resumed,
    )
    assert data["b"] == "from-a+b"
    assert data["b_sandbox"]


def test_with_sandbox_runs_every_step_in_a_sandbox(target):
    # dict attributes round-trip too (the runtime re-serializes --with for trampoline and task)
    run = target.flow("plain_flow.py", "run", "--with", 'sandbox:cpu=1,memory=1024,env={"WITH_VAR": "with-ok"}')
    _ok(run)
    data = target.client(
        """
        r = Run('PlainFlow/%s')
        emit({'where': r['end'].task.data.where, 'ids': [s.task.metadata_dict.get('sandbox-id') for s in r]})
        """
        % run.run_id(),
        run,
    )
    assert data["where"] == ["1", "1"]
    assert all(data["ids"])
