"""No decorators at all: used with `run --with sandbox:...`."""

import os

from metaflow import FlowSpec, step


class PlainFlow(FlowSpec):
    @step
    def start(self):
        self.where = [os.environ.get("METAFLOW_SANDBOX_WORKLOAD")]
        self.with_var = os.environ.get("WITH_VAR")
        self.next(self.end)

    @step
    def end(self):
        self.where = self.where + [os.environ.get("METAFLOW_SANDBOX_WORKLOAD")]


if __name__ == "__main__":
    PlainFlow()
