"""`b` fails while FAIL_B=1; resume re-runs it in a sandbox and clones `a`."""

import os

from metaflow import FlowSpec, sandbox, step


class ResumeFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.a)

    @sandbox
    @step
    def a(self):
        self.a_value = "from-a"
        self.next(self.b)

    @sandbox
    @step
    def b(self):
        if os.environ.get("FAIL_B") == "1":
            raise RuntimeError("b fails on purpose")
        self.b_value = self.a_value + "+b"
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ResumeFlow()
