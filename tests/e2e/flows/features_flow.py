"""One sandboxed step exercising artifacts, @environment, @resources, env, logs and metadata."""

import os
import sys
import time

from metaflow import FlowSpec, card, current, environment, resources, sandbox, step


class FeaturesFlow(FlowSpec):
    @step
    def start(self):
        self.x = 21
        self.next(self.work)

    @card
    @environment(vars={"FROM_ENV_DECO": "env-ok"})
    @resources(cpu=2, memory=1024)
    @sandbox(cpu=1, memory=512, env={"FROM_SANDBOX_ENV": "sandbox-ok"})
    @step
    def work(self):
        self.y = self.x * 2
        self.cpus = len(os.sched_getaffinity(0))
        self.env_deco = os.environ.get("FROM_ENV_DECO")
        self.sandbox_env = os.environ.get("FROM_SANDBOX_ENV")
        self.in_sandbox = os.environ.get("METAFLOW_SANDBOX_WORKLOAD")
        self.backend_keys_seen = sorted(k for k in os.environ if k.startswith(("DAYTONA_", "E2B_")))
        key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        self.gcp_key = open(key_file).read() if key_file and os.path.exists(key_file) else None
        current.card.append(__import__("metaflow").cards.Markdown("# made in a sandbox"))
        for i in range(5):
            print("out-line-%d" % i)
            print("err-line-%d" % i, file=sys.stderr)
        time.sleep(float(os.environ.get("WORK_SLEEP", "0")))
        self.next(self.end)

    @step
    def end(self):
        print("y =", self.y)


if __name__ == "__main__":
    FeaturesFlow()
