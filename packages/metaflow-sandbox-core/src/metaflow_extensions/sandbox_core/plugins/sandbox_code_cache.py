"""Code packages extracted once per machine, with bytecode, for sandboxes that share its files.

Every Metaflow task otherwise extracts the code package afresh and compiles all of Metaflow
from source on import (about a second of CPU per task). Sandboxes of the `local` backend see
the launcher's files, so the trampoline extracts each package once (content-addressed by its
sha, under a lock), compiles it, and binds the cache read-only into every sandbox.

A package's Metaflow (`.mf_code`: Metaflow and its extensions, nearly all of its files) is the same
from one flow edit to the next, but the package's sha is not: it is kept once per content, compiled,
and linked into every package that carries it, so the first task after an edit extracts and
compiles only the user's files (about 3 s less on this project's 2-core machines).
"""

import compileall
import fcntl
import gzip
import hashlib
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
            ((_, blob),) = list(flow_datastore.load_data([sha]))
            # Decompressed once: reading members out of order from a gzip stream restarts it each time.
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)), mode="r:") as tar:
                members = tar.getmembers()
                shared = _shared_metaflow(tar, members, root)
                if os.path.exists(os.path.join(shared, READY)):
                    members = [m for m in members if not _in_metaflow(m)]
                _extract(tar, members, tmp)
            if not os.path.exists(os.path.join(shared, READY)) and os.path.isdir(os.path.join(tmp, MF_CODE)):
                _keep_shared(os.path.join(tmp, MF_CODE), shared)
            if os.path.exists(os.path.join(shared, READY)):
                # Hard links, not a symlink: Metaflow's extension loader wants a real directory; the
                # bytecode stays valid (same files, same mtimes), so compile_dir skips it.
                shutil.rmtree(os.path.join(tmp, MF_CODE), ignore_errors=True)
                shutil.copytree(shared, os.path.join(tmp, MF_CODE), copy_function=_link_or_copy)
            compileall.compile_dir(tmp, quiet=2, workers=1)  # the user's files; Metaflow's bytecode is already there
            open(os.path.join(tmp, READY), "w").close()
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


MF_CODE = ".mf_code"


def task_template(package_dir, datastore_root):
    """A directory a task's setup copies whole with one `cp` (each process it spawns costs a task
    a few ms): the package's user files (hard links, so building it copies nothing), `.mf_code`
    linking to the compiled Metaflow, and `.metaflow`: a link to the local datastore's root, else
    an empty directory. Built once per package and datastore root, next to the package."""
    key = hashlib.sha256((datastore_root or "").encode()).hexdigest()[:12]
    dest = "%s.task-%s" % (package_dir, key)
    if os.path.isdir(dest):
        return dest
    tmp = tempfile.mkdtemp(dir=os.path.dirname(package_dir), prefix=os.path.basename(dest) + ".tmp-")
    try:
        os.chmod(tmp, 0o755)
        for entry in sorted(os.listdir(package_dir)):
            src = os.path.join(package_dir, entry)
            if entry in (MF_CODE, READY):
                continue
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, os.path.join(tmp, entry), symlinks=True, copy_function=_link_or_copy)
            elif os.path.islink(src):
                os.symlink(os.readlink(src), os.path.join(tmp, entry))
            else:
                _link_or_copy(src, os.path.join(tmp, entry))
        os.symlink(os.path.join(package_dir, MF_CODE), os.path.join(tmp, MF_CODE))
        if datastore_root:
            os.symlink(datastore_root, os.path.join(tmp, ".metaflow"))
        else:
            os.mkdir(os.path.join(tmp, ".metaflow"))
        try:
            os.rename(tmp, dest)
        except OSError:  # another trampoline built it first
            if not os.path.isdir(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _in_metaflow(member):
    return member.name == MF_CODE or member.name.startswith(MF_CODE + "/")


def _shared_metaflow(tar, members, root):
    """Where this package's `.mf_code` is kept by content: a digest of its members' names and bytes."""
    digest = hashlib.sha256()
    for member in sorted((m for m in members if _in_metaflow(m)), key=lambda m: m.name):
        digest.update(member.name.encode() + b"\0" + str(member.type).encode())
        if member.isfile():
            digest.update(tar.extractfile(member).read())
    return os.path.join(root, "mf_code", digest.hexdigest()[:32])


def _link_or_copy(src, dst):
    """A hard link where the filesystem allows one; a copy (mtimes kept, so bytecode stays valid) where not."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _extract(tar, members, dest):
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
    else:
        tar.extractall(dest, members=members)


def _keep_shared(extracted, shared):
    """Compile this package's Metaflow and keep it by content (another trampoline may race us)."""
    os.makedirs(os.path.dirname(shared), exist_ok=True)
    with open(shared + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(shared, READY)):
            return
        shutil.rmtree(shared, ignore_errors=True)
        compileall.compile_dir(extracted, quiet=2, workers=1)
        open(os.path.join(extracted, READY), "w").close()
        os.rename(extracted, shared)
