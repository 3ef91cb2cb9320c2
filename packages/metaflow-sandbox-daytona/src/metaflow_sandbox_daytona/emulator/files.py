"""Daytona's toolbox files API: multipart bulk upload and bulk download, spooled through temp files."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import TYPE_CHECKING, Any, Optional

from aiohttp import BodyPartReader, web
from metaflow_sandbox import DownloadItem, SandboxError, SandboxFileError, UploadItem

from .protocol import DaytonaSandbox, error

if TYPE_CHECKING:
    from .server import DaytonaServer

BOUNDARY = "DAYTONA-FILE-BOUNDARY"
FILE_CODES = {
    "file_not_found": (404, "FILE_NOT_FOUND", "no such file or directory"),
    "permission_denied": (403, "FILE_ACCESS_DENIED", "permission denied"),
    "is_directory": (400, "INVALID_FILE_PATH", "is a directory"),
    "invalid_path": (400, "INVALID_FILE_PATH", "invalid file path"),
}


def routes(emu: DaytonaServer, spool_dir: str) -> list[web.RouteDef]:
    def spool_path() -> str:
        return os.path.join(spool_dir, uuid.uuid4().hex)

    async def upload(request: web.Request) -> web.Response:
        sb = emu.find(request)
        reader = await request.multipart()
        paths: dict[str, str] = {}
        spooled: dict[str, str] = {}
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                name = part.name or ""
                index = name[name.find("[") + 1 : name.find("]")]
                if name.endswith(".path"):
                    paths[index] = await part.text()
                elif name.endswith(".file"):
                    spool = spool_path()
                    with open(spool, "wb") as f:
                        while chunk := await part.read_chunk(1 << 20):
                            f.write(chunk)
                    spooled[index] = spool
            items = [UploadItem(sb.resolve(paths[i]), source=spooled[i]) for i in spooled]
            assert sb.local is not None
            results = await emu.runner.blocking(sb.local.upload, items)
        except SandboxError as exc:
            return error(500, str(exc), "INTERNAL", "daemon", request.path)
        finally:
            for spool in spooled.values():
                os.unlink(spool)
        errors = [r for r in results if r.error]
        if errors:
            status, code, _ = FILE_CODES[errors[0].error or "invalid_path"]
            messages = ["%s: %s" % (r.path, FILE_CODES[r.error or "invalid_path"][2]) for r in errors]
            body = {"errors": messages, "message": "; ".join(messages), "code": code, "statusCode": status, "source": "daemon"}
            return web.json_response(body, status=status)
        return web.json_response({"files": [{"path": r.path} for r in results]})

    async def download(request: web.Request) -> web.StreamResponse:
        sb = emu.find(request)
        paths = (await request.json()).get("paths") or []
        spools = {p: spool_path() for p in paths}
        items = [DownloadItem(sb.resolve(p), destination=spools[p]) for p in paths]
        try:
            results = await emu.runner.blocking(download_each, sb, items)
        except SandboxError as exc:
            return error(500, str(exc), "INTERNAL", "daemon", request.path)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "multipart/form-data; boundary=" + BOUNDARY})
        await resp.prepare(request)
        try:
            for path, err in zip(paths, results, strict=False):
                await write_part(resp, path, err, spools[path])
            await resp.write(b"--%s--\r\n" % BOUNDARY.encode())
        finally:
            for spool in spools.values():
                if os.path.exists(spool):
                    os.unlink(spool)
        await resp.write_eof()
        return resp

    t = "/toolbox/{id}"
    return [web.post(t + "/files/bulk-upload", upload), web.post(t + "/files/bulk-download", download)]


async def write_part(resp: web.StreamResponse, path: str, err: Optional[str], spool: str) -> None:
    """One part of a bulk download: the file, or its error as JSON."""
    fname = path.replace('"', '\\"')
    if err:
        status, code, text = FILE_CODES[err]
        payload = json.dumps({"message": "%s: %s" % (path, text), "statusCode": status, "code": code, "source": "daemon"}).encode()
        head = 'Content-Disposition: form-data; name="error"; filename="%s"\r\nContent-Type: application/json' % fname
        await resp.write(b"--%s\r\n%s\r\n\r\n%s\r\n" % (BOUNDARY.encode(), head.encode(), payload))
        return
    head = 'Content-Disposition: form-data; name="file"; filename="%s"\r\nContent-Type: application/octet-stream\r\nContent-Length: %d' % (
        fname,
        os.path.getsize(spool),
    )
    await resp.write(b"--%s\r\n%s\r\n\r\n" % (BOUNDARY.encode(), head.encode()))
    with open(spool, "rb") as f:
        while chunk := f.read(1 << 20):
            await resp.write(chunk)
    await resp.write(b"\r\n")


def download_each(sb: DaytonaSandbox, items: list[Any]) -> list[Optional[str]]:
    """Each file's error code, or None (one by one: one missing file must not fail the others)."""
    assert sb.local is not None
    out: list[Optional[str]] = []
    for item in items:
        try:
            (result,) = sb.local.download([item])
            out.append(result.error)
        except SandboxFileError as exc:
            out.append(exc.code)
        except SandboxError as exc:
            if isinstance(exc.__cause__, IsADirectoryError):
                out.append("is_directory")
            elif isinstance(exc.__cause__, PermissionError):
                out.append("permission_denied")
            else:
                raise
    return out


def spool_dir() -> str:
    return tempfile.mkdtemp(prefix="daytona-emulator-spool-")
