"""A sandboxed step that fans out, deployed to Argo Workflows in test_orchestrators.py: the
foreach's splits must reach Argo from the pod, not stay in the sandbox."""

import os

from metaflow import FlowSpec, sandbox, step


class OrchForeachFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @sandbox
    @step
    def work(self):
        self.items = ["a", "b", "c"]
        self.in_sandbox = os.environ.get("METAFLOW_SANDBOX_WORKLOAD")
        self.next(self.each, foreach="items")

    @step
    def each(self):
        self.item = self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.items = [i.item for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    OrchForeachFlow()
