"""Run the metaflow-sandbox conformance kit against the installed "agent" backend."""

from metaflow_sandbox.testing import BackendConformance


class TestAgent(BackendConformance):
    backend = "agent"
