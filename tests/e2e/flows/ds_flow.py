"""One sandboxed step on a cloud datastore: artifacts, logs, a card, and which credentials arrived."""

import os
import sys

from metaflow import FlowSpec, card, current, sandbox, step


class DatastoreFlow(FlowSpec):
    @step
    def start(self):
        self.x = 21
        self.next(self.work)

    @card
    @sandbox
    @step
    def work(self):
        self.y = self.x * 2
        self.in_sandbox = os.environ.get("METAFLOW_SANDBOX_WORKLOAD")
        key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        self.gcp_key_path = key_file
        self.gcp_key = open(key_file).read() if key_file and os.path.exists(key_file) else None
        self.azure_connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        current.card.append(__import__("metaflow").cards.Markdown("# stored in %s" % os.environ.get("METAFLOW_DEFAULT_DATASTORE")))
        for i in range(3):
            print("ds-out-%d" % i)
            print("ds-err-%d" % i, file=sys.stderr)
        self.next(self.end)

    @step
    def end(self):
        print("y =", self.y)


if __name__ == "__main__":
    DatastoreFlow()
