"""A sandboxed step that sleeps past its @timeout."""

import time

from metaflow import FlowSpec, sandbox, step, timeout


class TimeoutFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.slow)

    @timeout(seconds=3)
    @sandbox
    @step
    def slow(self):
        print("going to sleep")
        time.sleep(120)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TimeoutFlow()
