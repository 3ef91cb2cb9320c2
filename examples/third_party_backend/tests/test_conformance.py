"""Run the metaflow-sandbox conformance kit against the installed "acme" backend."""

from metaflow_sandbox.testing import BackendConformance


class TestAcme(BackendConformance):
    backend = "acme"
