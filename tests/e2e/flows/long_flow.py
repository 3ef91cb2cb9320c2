"""A sandboxed step that prints 20 MB and runs past 60 s (E2B's SDK default command timeout)."""

import os
import sys
import time

from metaflow import FlowSpec, sandbox, step


class LongFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.long)

    @sandbox
    @step
    def long(self):
        began = time.time()
        line = "x" * 99
        out = sys.stdout
        for i in range(int(os.environ.get("LONG_LINES", "209716"))):  # 209716 * 100 bytes = 20 MiB
            out.write("%08d %s\n" % (i, line[:90]))
        out.flush()
        print("printed everything")
        time.sleep(max(0.0, float(os.environ.get("LONG_SECONDS", "62")) - (time.time() - began)))
        self.elapsed = time.time() - began
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    LongFlow()
