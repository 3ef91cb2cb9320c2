"""A small foreach for the fast-path tests: one task may crash on its first attempt, tasks may sleep."""

import os
import sys
import time

from metaflow import FlowSpec, current, retry, sandbox, step


def _sibling_running(*words):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % pid) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getppid() and all(w in argv for w in words):
            return True
    return False


class FastPathFlow(FlowSpec):
    @step
    def start(self):
        # The run's sandbox server starts with the run, not at the first sandboxed task: look for it
        # among the launcher's children while this plain step runs.
        self.server_during_start = _sibling_running("sandbox", "serve")
        self.items = list(range(int(os.environ.get("FP_TASKS", "4"))))
        self.next(self.work, foreach="items")

    @retry(times=1, minutes_between_retries=0)
    @sandbox
    @step
    def work(self):
        if self.input == 1 and current.retry_count == 0 and os.environ.get("FP_CRASH") == "1":
            print("crashing on purpose", flush=True)
            os._exit(3)
        time.sleep(float(os.environ.get("FP_SLEEP") or 0))
        print("line-%d" % self.input)
        self.value = self.input * 10
        self.attempt = current.retry_count
        self.in_sandbox = os.environ.get("METAFLOW_SANDBOX_WORKLOAD")
        self.cpus = sorted(os.sched_getaffinity(0))  # @sandbox's default cpu=1 pins the sandbox to one CPU
        # What the launcher already checked is not imported again in every task (pluggy and the core: ~30 ms).
        self.launcher_modules = sorted(m for m in sys.modules if m.split(".")[0] in ("metaflow_sandbox", "pluggy", "importlib_metadata"))
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = sorted(i.value for i in inputs)
        self.attempts = {i.input: i.attempt for i in inputs}
        self.in_sandbox = [i.in_sandbox for i in inputs]
        self.cpus = [i.cpus for i in inputs]
        self.launcher_modules = sorted({m for i in inputs for m in i.launcher_modules})
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FastPathFlow()
