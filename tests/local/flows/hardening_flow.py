"""Steps that probe the local sandbox's walls: run with `--with sandbox` on the `local` backend."""

import os
import subprocess

from metaflow import FlowSpec, Parameter, step


class HardeningFlow(FlowSpec):
    fork = Parameter("fork", default=0, type=int, help="processes to start at once (past the pids limit: the step fails)")

    @step
    def start(self):
        try:
            with open("/etc/shadow") as f:
                self.shadow = f.read()[:20]
        except OSError as exc:
            self.shadow = "refused: %s" % exc.strerror
        self.uid = os.getuid()
        if self.fork:
            subprocess.run(["sh", "-c", "for i in $(seq %d); do sleep 20 & done; wait" % self.fork], check=True)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    HardeningFlow()
