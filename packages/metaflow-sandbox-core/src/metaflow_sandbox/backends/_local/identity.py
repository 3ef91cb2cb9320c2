"""Who a sandbox's processes are on the host when the launcher is root.

A user namespace alone maps the sandbox's user to the launcher's: for a root launcher that is uid 0,
the owner of /etc/shadow and of every root 0600 file. So a root launcher starts bwrap as a fresh
unprivileged uid per sandbox (random, in a range no account uses); bwrap then maps it to 65534 inside.
The sandbox's own directories belong to that uid; its binds (owned by root on disk) are ID-MAPPED
mounts that show root's files as the sandbox uid's and store its writes as root's, so the task still
writes the launcher's datastore while root-only files elsewhere stay unreadable. Those mounts exist only
in a private mount namespace that bwrap enters, never on the host. Whether all this works here is
probed once per bwrap; where it cannot, the caller says so loudly.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import random
import stat
import struct
import subprocess
import threading

from metaflow_sandbox import SandboxError

log = logging.getLogger("metaflow_sandbox.local")

STAGE_PREFIX = "/tmp/metaflow-sandbox-stage-"
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
_unreaped: list[int] = []  # helper children told to exit, reaped without waiting for them
_unreaped_lock = threading.Lock()


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
        _reap_later(pid)


def _reap_later(pid: int) -> None:
    """A helper child exits once told to; waiting for it (a ~1 ms exit of a copy of this process) would
    only delay the sandbox's create. Helpers that have exited by now, this one included later, are reaped."""
    with _unreaped_lock:
        _unreaped.append(pid)
        for child in list(_unreaped):
            try:
                done = os.waitpid(child, os.WNOHANG)[0]
            except ChildProcessError:  # not ours (inherited through a fork), or already reaped
                done = child
            if done:
                _unreaped.remove(child)


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


def attach(tree: int, target: str) -> None:
    """Attach a detached tree at ``target`` on the host (only read-only ones: an rm -rf there cannot delete through it)."""
    _syscall("move_mount", tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH)


def private_mount_ns(trees: list[tuple[int, str]], drop: list[str]) -> int:
    """An fd of a new mount namespace (a private copy of ours) in which each detached tree is attached at its
    target. Only bwrap enters it (``enter_mount_ns`` before exec): the binds exist nowhere on the host, so
    nothing there can walk into them (an ``rm -rf`` of the sandbox root cannot reach the launcher's data),
    and they vanish with the namespace when the last fd and process are gone, even after a SIGKILL."""
    encoded_drop = [os.fsencode(p) for p in drop]
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
                for path in encoded_drop:  # other sandboxes' mounts: this namespace must not pin them
                    _libc.umount2(path, 2)
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
        _reap_later(pid)


def enter_mount_ns(fd: int | None, drop: list[bytes]) -> None:
    """In the forked child, before exec (still root): join the sandbox's private mount namespace (if any), then
    a throwaway copy without ``drop`` (other sandboxes' mounts): bwrap's namespace would otherwise keep them,
    pinning their tmpfs memory after they end and showing their names in its /proc/self/mountinfo."""
    if fd is not None and _libc.setns(fd, _CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    if not drop:
        return
    if _libc.unshare(_CLONE_NEWNS) != 0 or _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return  # hygiene, not isolation: the sandbox root stays hidden from the command either way
    for path in drop:
        _libc.umount2(path, 2)  # MNT_DETACH; already gone is fine


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
            os.close(private_mount_ns([(tree, dst)], []))
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


_no_own_uid: dict[str, str | None] = {}  # bwrap path -> None when a sandbox can get its own uid, else why not
_probe_lock = threading.Lock()


def why_no_own_uid(bwrap: str) -> str | None:
    """None when sandboxes of this root launcher can run as their own uid with ``bwrap`` (probed once)."""
    with _probe_lock:
        if bwrap not in _no_own_uid:
            _no_own_uid[bwrap] = supported() or _probe_bwrap_as(bwrap, new_uid())
        return _no_own_uid[bwrap]


def _probe_bwrap_as(bwrap: str, uid: int) -> str | None:
    argv = [bwrap, "--ro-bind", "/", "/", "--unshare-user", "--uid", str(INSIDE_ID), "--gid", str(INSIDE_ID)]
    argv += ["--unshare-pid", "--cap-drop", "ALL", "--die-with-parent", "true"]
    try:
        p = subprocess.run(argv, capture_output=True, timeout=20, preexec_fn=lambda: drop_to(uid), cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if p.returncode == 0 else "bwrap as an unprivileged user: %s" % p.stderr.decode(errors="replace").strip()


def world_reachable(path: str, read: bool = True) -> bool:
    """Whether any user can reach ``path`` (every ancestor searchable by others) and, with ``read``, read it."""
    parts = os.path.normpath(path).split("/")
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat("/".join(parts[:i]) or "/").st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return not read or bool(os.stat(path).st_mode & 0o004)


def stage_dir(root_setting: str) -> str:
    """A launcher-owned 0711 directory under /tmp for sandboxes whose root their uid cannot reach."""
    stage = STAGE_PREFIX + str(os.getuid())
    try:
        os.mkdir(stage, 0o711)
    except FileExistsError:
        pass
    st = os.lstat(stage)
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        raise SandboxError(
            "%s is not a directory owned by you" % stage,
            hint="remove it (someone else created it), or point %s at a world-searchable directory" % root_setting,
            backend="local",
        )
    if st.st_mode & 0o777 != 0o711:
        os.chmod(stage, 0o711)
    return stage
