"""File transfer in and out of a local sandbox, through the sandbox's own view of its mounts.

Large files are streamed; a FIFO or device planted by the sandbox never blocks the launcher.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat

from metaflow_sandbox import DownloadItem, FileResult, UploadItem

from .mounts import RW, Layout, PathError

CHUNK = 1 << 20


def upload_one(layout: Layout, item: UploadItem) -> str | None:
    """Write one item; None on success, else its error code."""
    try:
        _, host, kind = layout.resolve(item.path)
        if host is None or kind != RW:
            return "permission_denied"
        if os.path.isdir(host):
            return "is_directory"
        # In the sandbox's own space, files belong to its uid (a root launcher's sandbox has its own).
        owner = layout.owner if host.startswith(layout.root + "/") else None
        with open(item.source, "rb") if item.source is not None else contextlib.nullcontext() as src:
            _makedirs(os.path.dirname(host), owner)
            fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted by the sandbox
                os.close(fd)
                return "permission_denied"
            if owner is not None:
                os.fchown(fd, owner, owner)
            os.ftruncate(fd, 0)
            with open(fd, "wb") as out:
                if src is not None:
                    shutil.copyfileobj(src, out, CHUNK)
                else:
                    out.write(item.content or b"")
        return None
    except PathError as exc:
        return exc.code
    except OSError as exc:
        return file_error(exc)


def _makedirs(path: str, owner: int | None) -> None:
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d)
        if owner is not None:
            os.lchown(d, owner, owner)


def download_one(layout: Layout, item: DownloadItem) -> FileResult:
    try:
        _, host, _ = layout.resolve(item.path)
        if host is None or not os.path.lexists(host):
            return FileResult(item.path, error="file_not_found")
        if os.path.isdir(host):
            return FileResult(item.path, error="is_directory")
        with open(os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):  # never block on a FIFO planted by the sandbox
                return FileResult(item.path, error="permission_denied")
            if item.destination is None:
                return FileResult(item.path, content=src.read())
            with open(item.destination, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        return FileResult(item.path)
    except PathError as exc:
        return FileResult(item.path, error=exc.code)  # type: ignore[arg-type]
    except OSError as exc:
        return FileResult(item.path, error=file_error(exc))  # type: ignore[arg-type]


def file_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file_not_found"
    if isinstance(exc, IsADirectoryError):
        return "is_directory"
    if isinstance(exc, NotADirectoryError):
        return "invalid_path"
    return "permission_denied"
