"""The sandbox's filesystem: the bwrap arguments that build it, and inside->host path translation.

The host is visible read-only (one recursive bind of ``/``, or its entries one by one when a bind
needs a new top-level directory); homes and /run are hidden (except the Python installation and the
DNS config, re-exposed read-only); /tmp and the work dir are private and writable; binds are added.
"""

from __future__ import annotations

import functools
import os
import pwd
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

from metaflow_sandbox import Bind

RW, RO, HIDDEN = "rw", "ro", "hidden"
MAX_EXPAND = 256  # entries of a read-only dir we re-create to add a mount point in it


class PathError(Exception):
    """A file operation failed; ``code`` is one of the contract's FILE_ERROR_CODES."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Mount:
    inside: str
    host: str | None  # None for hidden paths
    kind: str


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _outermost(paths: Iterable[str]) -> list[str]:
    """Drop paths nested in another one of the list."""
    result: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(_under(p, q) for q in result):
            result.append(p)
    return result


@functools.lru_cache(maxsize=1)
def hidden_dirs() -> tuple[str, ...]:
    """Home directories and /run (daemon sockets such as docker.sock stay connectable on a read-only
    mount): invisible inside the sandbox unless a bind covers part of them."""
    candidates = ["/home", "/root", "/run", os.environ.get("HOME", "")]
    try:
        candidates.append(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        pass
    real = [os.path.realpath(c) for c in candidates if c and os.path.isabs(c) and os.path.isdir(c)]
    # A home under /tmp is already hidden by the sandbox's private /tmp (and a tmpfs there would
    # be shadowed by it, so bwrap could not remount it read-only).
    return tuple(_outermost(p for p in real if p != "/" and not _under(p, "/tmp")))


@functools.lru_cache(maxsize=1)
def reexposed() -> tuple[str, ...]:
    """Paths re-exposed read-only inside hidden dirs or the private /tmp: the running Python's prefixes
    and import paths, and the DNS configuration (often a link into /run)."""
    covered = hidden_dirs() + ("/tmp",)
    found = []
    resolv = os.path.realpath("/etc/resolv.conf")
    if os.path.isfile(resolv) and any(_under(resolv, c) for c in covered):
        found.append(resolv)
    # sys.path[0] is the launcher's script dir (or cwd): user files, not part of the installation.
    imports = sys.path if getattr(sys.flags, "safe_path", False) else sys.path[1:]
    for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *imports]:
        if not p or not os.path.isabs(p) or not os.path.isdir(p) or not os.access(p, os.R_OK | os.X_OK):
            continue
        for q in {os.path.normpath(p), os.path.realpath(p)}:
            if any(_under(q, c) and q != c for c in covered):
                found.append(q)
    return tuple(_outermost(found))


@functools.lru_cache(maxsize=1)
def top_level() -> tuple[tuple[str, str | None], ...]:
    """Entries of ``/`` as (path, symlink target or None), for binding them one by one."""
    entries = []
    for name in sorted(os.listdir("/")):
        path = "/" + name
        if path in ("/proc", "/dev", "/tmp") or path in hidden_dirs():
            continue
        entries.append((path, os.readlink(path) if os.path.islink(path) else None))
    return tuple(entries)


def _entries_args(directory: str) -> list[str]:
    args = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        args += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    return args


def default_workdir() -> str:
    """Where commands start inside the sandbox (also their HOME), like a cloud sandbox's /home/user."""
    for parent in ("/home", "/root"):
        if os.path.isdir(parent) and os.path.realpath(parent) in hidden_dirs():
            return os.path.join(os.path.realpath(parent), "sandbox")
    return "/tmp/sandbox"


class Layout:
    """One sandbox's mounts. ``isolated=False`` means paths are host paths (fallback mode)."""

    def __init__(self, root: str, binds: Sequence[Bind], isolated: bool, hide: Sequence[str] = ()):
        self.root = root
        self.isolated = isolated
        self.hide = tuple(h for h in hide if not any(_under(h, c) for c in hidden_dirs() + ("/tmp",)))
        self.owner: int | None = None  # the sandbox's own uid, when it has one (a root launcher)
        #: host path -> where bwrap binds it from instead (an ID-mapped copy of the mount, for a root launcher)
        self.sources: dict[str, str] = {}
        self.host_work = os.path.join(root, "work")
        self.host_tmp = os.path.join(root, "tmp")
        self.workdir = default_workdir() if isolated else self.host_work
        self.tmpdir = "/tmp" if isolated else self.host_tmp
        self.binds = tuple(binds)
        self.expanded, self.expand_root = self._expansions()
        mounts = [Mount("/", "/", RO), Mount("/proc", None, HIDDEN), Mount("/dev", None, HIDDEN)]
        mounts += [Mount(d, None, HIDDEN) for d in hidden_dirs() + self.hide]
        mounts += [Mount(d, d, RO) for d in reexposed()]
        mounts += [Mount("/tmp", self.host_tmp, RW), Mount(self.workdir, self.host_work, RW)]
        mounts += [Mount(b.dest, b.source, RO if b.read_only else RW) for b in self.binds]
        # Later mounts shadow earlier ones at the same path, as in bwrap.
        self.mounts = {m.inside: m for m in mounts}

    def bwrap_args(self) -> list[str]:
        args = ["--ro-bind", "/", "/"]  # one recursive bind: the fastest way to show the host read-only
        if self.expand_root:
            args = []
            for path, link in top_level():
                args += ["--symlink", link, path] if link is not None else ["--ro-bind", path, path]
        args += ["--dev", "/dev", "--proc", "/proc"]
        for d in hidden_dirs() + self.hide:  # homes, /run, and the directory holding every sandbox
            args += ["--tmpfs", d]
        for d in self.expanded:
            args += ["--tmpfs", d]
            args += _entries_args(d)
        args += ["--bind", self.host_tmp, "/tmp"]
        for d in reexposed():
            args += ["--ro-bind", self.sources.get(d, d), d]
        args += ["--bind", self.host_work, self.workdir]
        for b in self.binds:
            args += ["--ro-bind" if b.read_only else "--bind", self.sources.get(b.source, b.source), b.dest]
        for d in hidden_dirs() + self.hide + self.expanded:
            args += ["--remount-ro", d]
        return args + (["--remount-ro", "/"] if self.expand_root else [])

    def _expansions(self) -> tuple[tuple[str, ...], bool]:
        """Read-only host dirs in which a bind needs a new mount point: each becomes a tmpfs holding
        binds of the original entries. For ``/`` (a bind at a new top-level path), the entries are
        bound one by one on bwrap's own root tmpfs instead of binding ``/`` whole."""
        writable = hidden_dirs() + ("/tmp", self.workdir) + tuple(b.dest for b in self.binds if not b.read_only)
        found, expand_root = [], False
        for b in self.binds:
            parent = os.path.normpath(b.dest)
            while not os.path.lexists(parent):
                parent = os.path.dirname(parent)
            parent = os.path.realpath(parent)
            if parent == "/" and parent != os.path.normpath(b.dest):
                expand_root = True
                continue
            if parent == os.path.normpath(b.dest) or any(_under(parent, w) for w in writable):
                continue
            if len(os.listdir(parent)) > MAX_EXPAND:
                raise PathError("invalid_path")
            found.append(parent)
        return tuple(_outermost(found)), expand_root

    def _mount_for(self, path: str) -> Mount:
        best = self.mounts["/"]
        for m in self.mounts.values():
            if _under(path, m.inside) and len(m.inside) > len(best.inside):
                best = m
        return best

    def _host(self, path: str) -> tuple[str | None, Mount]:
        m = self._mount_for(path)
        if m.host is None:
            return None, m
        rest = path[len(m.inside) :].lstrip("/") if m.inside != "/" else path.lstrip("/")
        return (os.path.join(m.host, rest) if rest else m.host), m

    def resolve(self, path: str) -> tuple[str, str | None, str]:
        """Inside path -> (resolved inside path, host path or None, mount kind), following symlinks
        the way the sandbox sees them, so a link in the work dir can never reach outside its mounts."""
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise PathError("invalid_path")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PathError("invalid_path")
        if not self.isolated:
            plain = os.path.normpath(path)
            return plain, plain, RW
        resolved, hops = "/", 0
        while parts:
            name = parts.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                resolved = os.path.dirname(resolved)
                continue
            candidate = os.path.join(resolved, name)
            host, _ = self._host(candidate)
            if host is not None and os.path.islink(host):
                hops += 1
                if hops > 40:
                    raise PathError("invalid_path")
                target = os.readlink(host)
                if target.startswith("/"):
                    resolved = "/"
                parts = target.split("/") + parts
            else:
                resolved = candidate
        host, mount = self._host(resolved)
        return resolved, host, mount.kind
