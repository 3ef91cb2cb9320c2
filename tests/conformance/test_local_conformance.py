"""The conformance kit run against the embedded ``local`` backend (the kit's reference run)."""

from __future__ import annotations

from metaflow_sandbox.testing import BackendConformance


class TestLocalConformance(BackendConformance):
    backend = "local"
