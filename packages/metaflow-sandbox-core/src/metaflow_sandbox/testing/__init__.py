"""The conformance kit: a pytest suite any sandbox backend runs against itself.

Install with ``pip install 'metaflow-sandbox[testing]'`` and subclass one class::

    from metaflow_sandbox.testing import BackendConformance

    class TestAcme(BackendConformance):
        backend = "acme"                      # your entry-point name, resolved through real discovery
        required_env = ("ACME_API_KEY",)      # live tests skip loudly without it

See docs/adding-a-backend.md for the capability flags and what each test checks. The optional flow
tier, ``FlowConformance``, runs a small real Metaflow flow through the backend (it needs Metaflow).
"""

from __future__ import annotations

import pytest

# Rich assert diffs for authors whose tests subclass the suite.
pytest.register_assert_rewrite("metaflow_sandbox.testing.suite", "metaflow_sandbox.testing.flow_suite")

from .flow_suite import FlowConformance  # noqa: E402
from .suite import BackendConformance  # noqa: E402

__all__ = ["BackendConformance", "FlowConformance"]
