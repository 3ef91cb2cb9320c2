"""The benchmark flow: a 16-task foreach. BENCH_SANDBOX=1 puts @sandbox on the foreach step."""

import os

from metaflow import FlowSpec, sandbox, step


def maybe_sandbox(func):
    return sandbox(func) if os.environ.get("BENCH_SANDBOX") == "1" else func


class Foreach16Flow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(int(os.environ.get("BENCH_WIDTH", "16"))))
        self.next(self.work, foreach="items")

    @maybe_sandbox
    @step
    def work(self):
        self.value = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    Foreach16Flow()
