"""The flow conformance tier run against the embedded ``local`` backend on the local datastore."""

from __future__ import annotations

import pytest
from metaflow_sandbox.testing import FlowConformance

pytestmark = pytest.mark.slow


class TestLocalFlowConformance(FlowConformance):
    backend = "local"
    datastore = "local"
