"""E2B: a step longer than the SDK's 60 s command default, printing 20 MiB, succeeds whole."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("target", ["e2b-s3"], indirect=True)
def test_step_past_60s_printing_20_mib(target):
    run = target.flow("long_flow.py", env={"METAFLOW_SANDBOX_FORWARD_ENV": "LONG_LINES,LONG_SECONDS"}, timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    data = target.client(
        """
        t = Run('LongFlow/%s')['long'].task
        out = t.stdout
        numbered = [ln for ln in out.splitlines() if ln[:8].isdigit()]
        emit({'elapsed': t.data.elapsed, 'size': len(out), 'lines': len(numbered),
              'first': numbered[0], 'last': numbered[-1], 'in_order': all(int(ln[:8]) == i for i, ln in enumerate(numbered))})
        """ % run.run_id(),
        run,
    )
    assert data["elapsed"] > 60
    assert data["first"].startswith("00000000 ")
    assert data["last"].startswith("00209715 ")
    assert data["lines"] == 209716 and data["in_order"]
    assert data["size"] >= 20 * 1024 * 1024
