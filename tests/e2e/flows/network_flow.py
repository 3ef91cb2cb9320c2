"""Tries to reach a port on the host (PROBE_PORT); used with `--with sandbox:network=...`."""

import os
import socket

from metaflow import FlowSpec, step


class NetworkFlow(FlowSpec):
    @step
    def start(self):
        try:
            socket.create_connection(("127.0.0.1", int(os.environ["PROBE_PORT"])), timeout=3).close()
            self.reached = True
        except OSError:
            self.reached = False
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    NetworkFlow()
