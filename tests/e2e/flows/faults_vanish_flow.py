"""One sandboxed step that runs long enough for its provider to vanish under it."""

import time

from metaflow import FlowSpec, sandbox, step


class FaultsVanishFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.wait)

    @sandbox
    @step
    def wait(self):
        print("waiting for the provider to vanish", flush=True)
        time.sleep(60)  # the test ends it sooner, by an outage
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FaultsVanishFlow()
