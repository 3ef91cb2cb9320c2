"""One @sandbox step whose attributes come from SANDBOX_ATTRS (a Python expression): the bad-input table's flow."""

import os

from metaflow import FlowSpec, sandbox, step

ATTRS = eval(os.environ.get("SANDBOX_ATTRS") or "{}")  # test-only: lets a table row pass nan, dicts, non-strings


class AttrsFlow(FlowSpec):
    @sandbox(**ATTRS)
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    AttrsFlow()
