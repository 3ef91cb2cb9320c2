"""@retry (fails once, then passes) and @catch (the error becomes an artifact), in sandboxes."""

from metaflow import FlowSpec, catch, current, retry, sandbox, step


class FailuresFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.flaky)

    @retry(times=1, minutes_between_retries=0)
    @sandbox
    @step
    def flaky(self):
        print("flaky attempt %d" % current.retry_count)
        if current.retry_count == 0:
            raise RuntimeError("first attempt fails on purpose")
        self.attempt_ok = current.retry_count
        self.next(self.doomed)

    @catch(var="failure")
    @sandbox
    @step
    def doomed(self):
        raise ValueError("boom from the sandbox")
        self.next(self.end)  # noqa

    @step
    def end(self):
        self.caught = str(self.failure)


if __name__ == "__main__":
    FailuresFlow()
