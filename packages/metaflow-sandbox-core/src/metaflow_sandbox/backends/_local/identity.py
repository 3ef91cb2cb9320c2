"""Who a sandbox's processes are on the host when the launcher is root.

A user namespace alone maps the sandbox's user to the launcher's: for a root launcher that is uid 0,
the owner of /etc/shadow and of every root 0600 file. So a root launcher starts bwrap as a fresh
unprivileged uid per sandbox (random, in a range no account uses); bwrap then maps it to 65534 inside.
The sandbox's own directories belong to that uid; its binds (owned by root on disk) are ID-MAPPED
mounts that show root's files as the sandbox uid's and store its writes as root's, so the task still
writes the launcher's datastore while root-only files elsewhere stay unreadable.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import random
import struct

log = logging.getLogger("metaflow_sandbox.local")

INSIDE_ID = 65534  # the sandbox's uid/gid as its processes see it ("nobody")
UID_BASE, UID_SPAN = 0x40000000, 0x3FFF0000  # far above any account or subordinate-id range

_CLONE_NEWUSER, _CLONE_NEWNS = 0x10000000, 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_AT_FDCWD = -100
_SYS = {"open_tree": 428, "move_mount": 429, "mount_setattr": 442}  # the same on x86_64 and aarch64
_OPEN_TREE_CLONE, _AT_RECURSIVE, _AT_EMPTY_PATH = 1, 0x8000, 0x1000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_IDMAP = 0x1, 0x00100000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4

_libc = ctypes.CDLL(None, use_errno=True)


class IdmapError(OSError):
    pass


def new_uid() -> int:
    return UID_BASE + random.randrange(UID_SPAN)


def is_root() -> bool:
    return os.geteuid() == 0


def userns_fd(uid: int) -> int:
    """An fd of a new user namespace mapping inside uid/gid 0 to ``uid`` (only a root launcher may write such
    a map). The namespace outlives its short-lived process through the fd."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe calls until _exit
        try:
            os.close(ready_r)
            os.close(go_w)
            ok = _libc.unshare(_CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise IdmapError("cannot create a user namespace")
        for name in ("uid_map", "gid_map"):
            with open("/proc/%d/%s" % (pid, name), "w") as f:
                f.write("0 %d 1\n" % uid)
        return os.open("/proc/%d/ns/user" % pid, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def _syscall(name: str, *args: object) -> int:
    result = _libc.syscall(_SYS[name], *args)
    if result < 0:
        err = ctypes.get_errno()
        raise IdmapError(err, "%s: %s" % (name, os.strerror(err)))
    return int(result)


def detached_bind(source: str, ns_fd: int | None, read_only: bool) -> int:
    """An fd of a detached recursive bind of ``source`` seen through ``ns_fd`` (None: a plain bind, for
    read-only paths the sandbox's uid may read but not reach). Attached nowhere yet."""
    tree = _syscall("open_tree", _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE)
    try:
        flags = (_MOUNT_ATTR_IDMAP if ns_fd is not None else 0) | (_MOUNT_ATTR_RDONLY if read_only else 0)
        if flags:
            attr = ctypes.create_string_buffer(struct.pack("QQQQ", flags, 0, 0, ns_fd if ns_fd is not None else 0))
            _syscall("mount_setattr", tree, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, attr, ctypes.sizeof(attr) - 1)
        return tree
    except BaseException:
        os.close(tree)
        raise


def private_mount_ns(trees: list[tuple[int, str]]) -> int:
    """An fd of a new mount namespace (a private copy of ours) in which each detached tree is attached at its
    target. Only bwrap enters it (``enter_mount_ns`` before exec): the binds exist nowhere on the host, so
    nothing there can walk into them (an ``rm -rf`` of the sandbox root cannot reach the launcher's data),
    and they vanish with the namespace when the last fd and process are gone, even after a SIGKILL."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only plain syscalls until _exit
        code = b"0"
        try:
            os.close(ready_r)
            os.close(go_w)
            if _libc.unshare(_CLONE_NEWNS) == 0 and _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0:
                code = b"1"
                for tree, target in trees:
                    if _libc.syscall(_SYS["move_mount"], tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH) != 0:
                        code = b"0"
                        break
            os.write(ready_w, code)
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise IdmapError("cannot set up the sandbox's private mount namespace")
        return os.open("/proc/%d/ns/mnt" % pid, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def enter_mount_ns(fd: int) -> None:
    """In the forked child, before exec (still root): join the sandbox's private mount namespace."""
    if _libc.setns(fd, _CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@functools.lru_cache(maxsize=1)
def supported() -> str | None:
    """None when a root launcher can give sandboxes their own uid here, else why not (probed once)."""
    if not is_root():
        return "the launcher is not root"
    import tempfile

    d = tempfile.mkdtemp(prefix="mfsb-idmap-probe-")
    src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
    fd = -1
    try:
        os.mkdir(src)
        os.mkdir(dst)
        fd = userns_fd(new_uid())
        tree = detached_bind(src, fd, read_only=True)
        try:
            os.close(private_mount_ns([(tree, dst)]))
        finally:
            os.close(tree)
        return None
    except OSError as exc:
        return "ID-mapped mounts do not work here (%s)" % exc
    finally:
        if fd >= 0:
            os.close(fd)
        for p in (dst, src, d):
            try:
                os.rmdir(p)
            except OSError:
                pass


def drop_to(uid: int) -> None:
    """In the forked child, before exec: become ``uid`` with no supplementary groups (after any root-only setup)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
