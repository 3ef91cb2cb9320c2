"""One sandboxed step that runs long enough for E2B to vanish under it."""

import time

from metaflow import FlowSpec, sandbox, step


class FaultsE2BVanishFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.wait)

    @sandbox
    @step
    def wait(self):
        print("waiting for the provider to vanish", flush=True)
        time.sleep(60)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FaultsE2BVanishFlow()
