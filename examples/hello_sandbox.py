"""A first sandboxed flow: fan out over sandboxed tasks, pass artifacts through, join.

    python examples/hello_sandbox.py run

Runs on the embedded `local` backend (bubblewrap on this machine) with the local datastore:
no cloud account needed. Switch backends with METAFLOW_SANDBOX_BACKEND=daytona (or e2b).
"""

from metaflow import FlowSpec, sandbox, step


class HelloSandboxFlow(FlowSpec):
    @step
    def start(self):
        self.words = ["isolated", "fast", "reproducible"]
        self.next(self.shout, foreach="words")

    @sandbox(cpu=1)
    @step
    def shout(self):
        import os
        import socket

        self.loud = self.input.upper()
        self.where = "%s (pid %d)" % (socket.gethostname(), os.getpid())
        print("shouting %s inside %s" % (self.loud, self.where))
        self.next(self.join)

    @step
    def join(self, inputs):
        self.results = sorted(i.loud for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        print("results:", self.results)


if __name__ == "__main__":
    HelloSandboxFlow()
