"""Live logs: the trampoline relays a sandbox's output to the runtime and persists it once.

Every line the task prints arrives here while it runs (the backend streams it). Each line is
echoed as an mflog-structured line, which the runtime displays but does not store again
(metaflow-internals 2.6), and kept for the task's own log files (`<attempt>.task_stdout.log`),
which are saved to the datastore periodically and at the end. So `python flow.py logs` and the
UI see the logs while the task runs, nothing is stored twice, and what was streamed before a
sandbox died is kept. No tee, save_logs or sidecar process runs inside the sandbox.
"""

import sys
import threading
import time

from metaflow.mflog import TASK_LOG_SOURCE, update_delay
from metaflow.mflog.mflog import decorate

# Metaflow's runtime reads one line per poll event from a buffered pipe, so lines written in a
# burst can sit in its buffer until the task writes again. Short bursts are paced so each line
# is displayed as it arrives; long ones (bulk output) are not slowed down.
PACE_SECONDS = 0.002
PACE_MAX_LINES = 200
SAVE_BYTES_PER_SECOND = 2 * 1024 * 1024


class LogRelay:
    def __init__(self, task_datastore=None):
        from metaflow_sandbox import line_splitter  # trampoline only: not on Metaflow's import path

        self._datastore = task_datastore
        self._lock = threading.Lock()
        self._splitters = {s: line_splitter(lambda line, s=s: self._emit(s, line.rstrip("\n"))) for s in ("stdout", "stderr")}
        self._lines = {"stdout": [], "stderr": []}
        self._dirty = False
        self._stop = threading.Event()
        self._saver = None
        self._last_write = 0.0
        self._burst = 0
        self._bytes = 0

    def stdout(self, chunk):
        self._feed("stdout", chunk)

    def stderr(self, chunk):
        self._feed("stderr", chunk)

    def _feed(self, stream, chunk):
        with self._lock:
            self._splitters[stream][0](chunk)

    def _emit(self, stream, line):
        structured = decorate(TASK_LOG_SOURCE, line.rstrip("\r"))
        self._lines[stream].append(structured)
        self._bytes += len(structured) + 1
        self._dirty = True
        now = time.monotonic()
        if now - self._last_write < PACE_SECONDS:
            self._burst += 1
            if self._burst <= PACE_MAX_LINES:
                time.sleep(PACE_SECONDS)
        else:
            self._burst = 0
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.buffer.write(structured + b"\n")
        out.flush()
        self._last_write = time.monotonic()

    def start_saving(self):
        """Save the logs to the datastore while the task runs (mflog's sigmoid schedule)."""
        if self._datastore is None:
            return
        started = time.time()

        def loop():
            # Each save rewrites the whole log (as Metaflow's own uploader does), so space saves
            # out as the log grows: at least a second per 2 MB already written.
            while not self._stop.wait(max(update_delay(time.time() - started), self._bytes / SAVE_BYTES_PER_SECOND)):
                self.save()

        self._saver = threading.Thread(target=loop, name="sandbox-log-saver", daemon=True)
        self._saver.start()

    def save(self):
        if self._datastore is None:
            return
        with self._lock:
            if not self._dirty:
                return
            data = {s: b"".join(line + b"\n" for line in lines) for s, lines in self._lines.items()}
            self._dirty = False
        self._datastore.save_logs(TASK_LOG_SOURCE, data)

    def close(self):
        """Emit partial last lines, stop the periodic saver and save a final time."""
        with self._lock:
            for _, flush in self._splitters.values():
                flush()
        self._stop.set()
        if self._saver is not None:
            self._saver.join()
        self.save()

    def system(self, message, err=False):
        """A message from the trampoline itself; the runtime stores it as a runtime log line."""
        out = sys.stderr if err else sys.stdout
        out.write(message + "\n")
        out.flush()
