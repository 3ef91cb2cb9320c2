"""Code packages extracted once per machine, with bytecode, for sandboxes that share its files.

Every Metaflow task otherwise extracts the code package afresh and compiles all of Metaflow
from source on import (about a second of CPU per task). Sandboxes of the `local` backend see
the launcher's files, so the trampoline extracts each package once (content-addressed by its
sha, under a lock), compiles it, and binds the cache read-only into every sandbox.
"""

import compileall
import fcntl
import io
import os
import shutil
import tarfile
import tempfile

READY = ".mfsb_ready"


def prepared_package(flow_datastore, sha, root):
    """Directory holding the extracted, compiled package `sha`; built once, concurrency-safe."""
    dest = os.path.join(root, sha)
    if os.path.exists(os.path.join(dest, READY)):
        return dest
    with open(dest + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(dest, READY)):
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=sha + ".tmp-")
        try:
            (_, blob), = list(flow_datastore.load_data([sha]))
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
                tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
            compileall.compile_dir(tmp, quiet=2, workers=1)
            open(os.path.join(tmp, READY), "w").close()
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
