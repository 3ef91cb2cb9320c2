"""Benchmark flow: a foreach whose tasks print timestamped lines and sleep, sandboxed or not.

BENCH_WIDTH tasks; each prints BENCH_PRINTS lines "TS <epoch seconds>" BENCH_GAP s apart, then
sleeps BENCH_SLEEP s. BENCH_SANDBOX=1 puts @sandbox on the foreach step (backend from
METAFLOW_SANDBOX_BACKEND).
"""

import os
import time

from metaflow import FlowSpec, sandbox, step


def maybe_sandbox(func):
    return sandbox(func) if os.environ.get("BENCH_SANDBOX") == "1" else func


class BenchTasksFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(int(os.environ.get("BENCH_WIDTH", "4"))))
        self.next(self.work, foreach="items")

    @maybe_sandbox
    @step
    def work(self):
        for _ in range(int(os.environ.get("BENCH_PRINTS") or 0)):
            print("TS %.6f" % time.time(), flush=True)
            time.sleep(float(os.environ.get("BENCH_GAP") or 0.05))
        time.sleep(float(os.environ.get("BENCH_SLEEP") or 0))
        self.done = True
        self.next(self.join)

    @step
    def join(self, inputs):
        self.count = sum(1 for _ in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    BenchTasksFlow()
