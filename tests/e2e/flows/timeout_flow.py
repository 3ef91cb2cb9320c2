"""A sandboxed step that sleeps past its @timeout. Metaflow's alarm ends it inside the sandbox; with
--stubborn it ignores the alarm, so only the sandbox's own deadline (the facade's, the step's limit plus
METAFLOW_SANDBOX_TIMEOUT_GRACE) stops it."""

import signal
import time

from metaflow import FlowSpec, Parameter, sandbox, step, timeout


class TimeoutFlow(FlowSpec):
    stubborn = Parameter("stubborn", default=False, type=bool, help="ignore @timeout's alarm")

    @step
    def start(self):
        self.next(self.slow)

    @timeout(seconds=3)
    @sandbox
    @step
    def slow(self):
        if self.stubborn:
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
        print("going to sleep")
        time.sleep(120)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TimeoutFlow()
