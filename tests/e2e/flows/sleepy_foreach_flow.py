"""A 4-task foreach whose sandboxed tasks sleep: the lifeline tests kill its launcher mid-run."""

import os
import time

from metaflow import FlowSpec, sandbox, step


class SleepyForeachFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(int(os.environ.get("SLEEPY_TASKS", "4"))))
        self.next(self.nap, foreach="items")

    @sandbox
    @step
    def nap(self):
        print("napping", self.input, flush=True)
        time.sleep(60)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SleepyForeachFlow()
