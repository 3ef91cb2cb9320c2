"""File transfer through the SDK's bulk endpoints, streaming local files from/to disk.

Bulk upload is all-or-nothing on the wire, so when it fails we retry file by file to learn which
file failed and why; bulk download reports per file already.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Sequence

from metaflow_sandbox import DownloadItem, FileResult, SandboxHandle, UploadItem, valid_sandbox_path

from . import _retry
from ._client import translate


def _retried(handle: SandboxHandle, what: str, fn: Any) -> Any:
    """A transfer is safe to repeat (same bytes to the same paths), so transient failures retry."""
    return _retry.call(fn, what, _retry.Policy.from_options(handle.options))


def _invalid(path: str) -> bool:
    """Defensive: the facade already answers these (``valid_sandbox_path``) before they reach us."""
    return not valid_sandbox_path(path)


def _code(message: str, status: int | None, code: str | None = None) -> str | None:
    """Map a daemon error to the closed vocabulary; None if it is not a per-file problem."""
    text = (message or "").lower()
    code = (code or "").upper()
    if "is a directory" in text or code == "IS_DIRECTORY":
        return "is_directory"
    if code == "FILE_ACCESS_DENIED" or "permission denied" in text or "access denied" in text or status == 403:
        return "permission_denied"
    if code == "FILE_NOT_FOUND" or "not found" in text or "no such file" in text or status == 404:
        return "file_not_found"
    if code == "INVALID_FILE_PATH" or "invalid" in text or status == 400:
        return "invalid_path"
    return None


def upload(handle: SandboxHandle, sandbox: Any, files: Sequence[UploadItem]) -> list[FileResult]:
    from daytona import FileUpload

    results: list[FileResult | None] = [None] * len(files)
    todo: list[tuple[int, Any]] = []
    for i, item in enumerate(files):
        if _invalid(item.path):
            results[i] = FileResult(item.path, error="invalid_path")
            continue
        source: Any = os.fspath(item.source) if item.source is not None else (item.content or b"")
        todo.append((i, FileUpload(source=source, destination=item.path)))
    if todo:
        try:
            _retried(handle, "upload", lambda: sandbox.fs.upload_files([f for _, f in todo]))
            for i, _ in todo:
                results[i] = FileResult(files[i].path)
        except Exception as exc:
            if len(todo) == 1:
                results[todo[0][0]] = _failed(handle, files[todo[0][0]].path, exc)
            else:
                for i, one in todo:
                    try:
                        _retried(handle, "upload", lambda one=one: sandbox.fs.upload_files([one]))
                        results[i] = FileResult(files[i].path)
                    except Exception as exc1:
                        results[i] = _failed(handle, files[i].path, exc1)
    return [r for r in results if r is not None]


def _failed(handle: SandboxHandle, path: str, exc: Exception) -> FileResult:
    code = _code(getattr(exc, "message", str(exc)), getattr(exc, "status_code", None), getattr(exc, "code", None))
    status = getattr(exc, "status_code", None)
    if code is None or status in (None, 401, 429) or (status or 0) >= 500:
        translate(exc, op="sandbox_upload", sandbox_id=handle.sandbox_id)
    return FileResult(path, error=code)  # type: ignore[arg-type]


def download(handle: SandboxHandle, sandbox: Any, files: Sequence[DownloadItem]) -> list[FileResult]:
    from daytona import FileDownloadRequest

    requests: dict[tuple[str, str | None], Any] = {}
    for item in files:
        if _invalid(item.path):
            continue
        dest = os.fspath(item.destination) if item.destination is not None else None
        if dest:
            parent = posixpath.dirname(dest)
            if parent:
                os.makedirs(parent, exist_ok=True)
        requests.setdefault((item.path, dest), FileDownloadRequest(source=item.path, destination=dest))
    answers: dict[tuple[str, str | None], Any] = {}
    # The SDK keys one bulk request by source path, so a path asked twice goes in its own request.
    batches: list[list[tuple[tuple[str, str | None], Any]]] = []
    for key, req in requests.items():
        for batch in batches:
            if all(k[0] != key[0] for k, _ in batch):
                batch.append((key, req))
                break
        else:
            batches.append([(key, req)])
    for batch in batches:
        try:
            responses = _retried(handle, "download", lambda batch=batch: sandbox.fs.download_files([req for _, req in batch]))
        except Exception as exc:
            translate(exc, op="sandbox_download", sandbox_id=handle.sandbox_id)
        for (key, _), resp in zip(batch, responses, strict=False):
            answers[key] = resp
    out = []
    for item in files:
        if _invalid(item.path):
            out.append(FileResult(item.path, error="invalid_path"))
            continue
        dest = os.fspath(item.destination) if item.destination is not None else None
        resp = answers[(item.path, dest)]
        if resp.error:
            details = resp.error_details
            code = _code(resp.error, getattr(details, "status_code", None), getattr(details, "code", None))
            if code is None:
                from daytona.common.errors import DaytonaError

                translate(
                    DaytonaError(resp.error, status_code=getattr(details, "status_code", None)),
                    op="sandbox_download",
                    sandbox_id=handle.sandbox_id,
                )
            out.append(FileResult(item.path, error=code))  # type: ignore[arg-type]
        elif dest is not None:
            out.append(FileResult(item.path))
        else:
            content = resp.result if isinstance(resp.result, (bytes, bytearray)) else b""
            out.append(FileResult(item.path, content=bytes(content)))
    return out
