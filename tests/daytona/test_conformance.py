"""The conformance kit against the Daytona backend, real SDK, emulated Daytona API."""

from metaflow_sandbox.testing import BackendConformance


class TestDaytonaConformance(BackendConformance):
    backend = "daytona"
    required_env = ("DAYTONA_API_KEY",)
