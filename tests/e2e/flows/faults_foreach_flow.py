"""A 16-way foreach with @retry(times=2) whose sandboxed body leaves one S3 marker per run of the body.

The markers let a test count how often each task's body ran in each attempt, whatever the provider
did in between (429/503 answers, lost answers, dropped output streams). ``--nap`` keeps each body
running long enough for a stream dropped after a delay to cut it.
"""

import time
import uuid

from metaflow import S3, FlowSpec, Parameter, current, retry, sandbox, step


class FaultsForeachFlow(FlowSpec):
    nap = Parameter("nap", type=float, default=0.0, help="seconds each body sleeps after its first output")

    @step
    def start(self):
        self.items = list(range(16))
        self.next(self.work, foreach="items")

    @retry(times=2)
    @sandbox
    @step
    def work(self):
        with S3(run=self) as s3:
            s3.put("marker-%s-%s-%s" % (self.input, current.retry_count, uuid.uuid4().hex[:8]), "ran")
        print("body of item %s ran" % self.input, flush=True)
        time.sleep(self.nap)
        self.doubled = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.doubled = sorted(i.doubled for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FaultsForeachFlow()
