"""A flow with one sandboxed step, deployed to production schedulers in test_orchestrators.py."""

import os

from metaflow import FlowSpec, sandbox, step


class OrchFlow(FlowSpec):
    @step
    def start(self):
        self.x = 1
        self.next(self.work)

    @sandbox
    @step
    def work(self):
        marker = os.environ.get("ORCH_MARKER")
        if marker:  # proof that the step's code ran, and where
            with open(marker, "w") as f:
                f.write(os.environ.get("METAFLOW_SANDBOX_WORKLOAD") or "unsandboxed")
        self.in_sandbox = os.environ.get("METAFLOW_SANDBOX_WORKLOAD")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    OrchFlow()
