"""Per-file errors come from the SDK's error type and HTTP status, not from words in a message."""

from __future__ import annotations

import e2b
import pytest
from metaflow_sandbox import Backend, DownloadItem, FileResult, SandboxError, UploadItem
from metaflow_sandbox_e2b.plugin import _file_code


@pytest.fixture(scope="module")
def sandbox():
    with Backend("e2b").create() as sb:
        yield sb


def test_envd_answers_become_file_errors(sandbox) -> None:
    """403 (a read-only system path), 404, 400 for a directory: through the real SDK and the emulator."""
    home = sandbox.handle.workdir
    (ro,) = sandbox.upload([UploadItem("/usr/kit-read-only.txt", content=b"x")])
    assert ro == FileResult("/usr/kit-read-only.txt", error="permission_denied")
    missing, directory = sandbox.download([DownloadItem(home + "/403-no-such-file.txt"), DownloadItem(home)])
    assert (missing.error, directory.error) == ("file_not_found", "is_directory")


def test_invalid_paths_are_answered_by_the_facade(sandbox) -> None:
    """A NUL byte, a relative path, `..`: invalid_path for E2B as for every backend, without a request."""
    bad = ["relative.txt", sandbox.handle.workdir + "/a\0b", sandbox.handle.workdir + "/../etc/passwd"]
    assert [r.error for r in sandbox.upload([UploadItem(p, content=b"x") for p in bad])] == ["invalid_path"] * 3
    assert [r.error for r in sandbox.download([DownloadItem(p) for p in bad])] == ["invalid_path"] * 3


@pytest.mark.parametrize(
    "exc, code",
    [
        (e2b.SandboxException("403: permission denied: '/usr/x'"), "permission_denied"),
        (e2b.SandboxException("500: disk failed while writing /home/user/run-403.log"), None),
        (e2b.SandboxException("409: file /home/user/403 changed"), None),
        (e2b.InvalidArgumentException("path '/home/user/403' is a directory"), "is_directory"),
        (e2b.FileNotFoundException("path '/home/user/x' does not exist"), "file_not_found"),
    ],
)
def test_a_403_in_a_message_is_not_a_permission_error(exc: Exception, code: str | None) -> None:
    assert _file_code(exc) == code


def test_an_unmapped_failure_raises_instead_of_a_file_error(sandbox) -> None:
    """A failure that is no per-file answer (here a destroyed sandbox) raises, it never becomes a FileResult."""
    with Backend("e2b").create() as other:
        other.destroy()
        with pytest.raises(SandboxError):
            other.download([DownloadItem(other.handle.workdir + "/x")])
