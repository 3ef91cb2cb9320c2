"""Binds, and file transfer through the sandbox's own view of its mounts (no escape via symlinks)."""

from __future__ import annotations

import os
import uuid

from metaflow_sandbox import Bind, DownloadItem, UploadItem


def test_rw_bind_at_same_path(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sb = make(binds=(Bind(str(tmp_path)),))
    assert sb.run(["sh", "-c", "echo inside > %s/out.txt" % tmp_path])[0] == 0
    assert (tmp_path / "out.txt").read_text() == "inside\n"


def test_ro_bind_at_other_path(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "data.txt").write_text("from host")
    sb = make(binds=(Bind(str(tmp_path), "/data", read_only=True),))
    code, out, _ = sb.run(["cat", "/data/data.txt"])
    assert (code, out) == (0, "from host")
    code, _, err = sb.run(["sh", "-c", "echo x > /data/new.txt"])
    assert code != 0 and "Read-only" in err
    code, _, err = sb.run(["sh", "-c", "echo x > /new-top-level-file"])  # / is rebuilt for /data, still read-only
    assert code != 0 and "Read-only" in err
    assert not (tmp_path / "new.txt").exists()
    (res,) = sb.upload([UploadItem("/data/up.txt", content=b"x")])
    assert res.error == "permission_denied"
    assert sb.read_file("/data/data.txt") == b"from host"


def test_upload_lands_where_the_sandbox_sees_it(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sb = make(binds=(Bind(str(tmp_path), "/mnt/host"),))
    sb.write_file("/mnt/host/a/b.bin", b"\x00\x01")
    sb.write_file("/tmp/t.txt", b"tmp")
    sb.write_file(sb.handle.workdir + "/w.txt", b"work")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    code, out, _ = sb.run(["sh", "-c", "cat /tmp/t.txt w.txt"])
    assert (code, out) == (0, "tmpwork")


def test_writes_outside_writable_mounts_are_refused(sandbox) -> None:  # type: ignore[no-untyped-def]
    res = sandbox.upload([UploadItem("/etc/mfsb.txt", content=b"x"), UploadItem("/usr/x", content=b"x")])
    assert [r.error for r in res] == ["permission_denied", "permission_denied"]
    assert not os.path.exists("/etc/mfsb.txt")


def test_symlinks_are_followed_inside_the_sandbox_view(sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    home = os.path.realpath(os.path.expanduser("~"))
    secret = os.path.join(home, ".mfsb-secret-%s" % uuid.uuid4().hex)
    with open(secret, "w") as f:
        f.write("secret")
    try:
        code, _, _ = sandbox.run(["sh", "-c", "ln -s %s steal && ln -s /tmp tmplink && ln -s /etc/hostname hn" % secret])
        assert code == 0
        work = sandbox.handle.workdir
        steal, hn = sandbox.download([DownloadItem(work + "/steal"), DownloadItem(work + "/hn")])
        assert steal.error == "file_not_found"  # the host home is hidden inside, so it is hidden here too
        assert hn.content == open("/etc/hostname", "rb").read()
        (up,) = sandbox.upload([UploadItem(sandbox.handle.workdir + "/steal", content=b"overwritten")])
        assert up.error == "permission_denied"
        assert open(secret).read() == "secret"
        sandbox.write_file(sandbox.handle.workdir + "/tmplink/via-link", b"ok")  # a link to a private dir is fine
        assert sandbox.run(["cat", "/tmp/via-link"])[1] == "ok"
    finally:
        os.unlink(secret)


def test_large_file_streams_both_ways(sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for i in range(40):
            f.write(bytes([i]) * (1 << 20))
    sandbox.write_file("/tmp/big.bin", source=src)
    dest = tmp_path / "back.bin"
    assert sandbox.read_file("/tmp/big.bin", destination=dest) is None
    assert dest.stat().st_size == 40 << 20 and dest.read_bytes() == src.read_bytes()


def test_a_fifo_planted_in_the_sandbox_never_blocks_the_launcher(sandbox) -> None:  # type: ignore[no-untyped-def]
    assert sandbox.run(["mkfifo", "pipe"])[0] == 0
    path = sandbox.handle.workdir + "/pipe"
    assert sandbox.download([DownloadItem(path)])[0].error == "permission_denied"
    assert sandbox.upload([UploadItem(path, content=b"x")])[0].error == "permission_denied"


def test_relative_cwd_is_under_the_workdir(sandbox) -> None:  # type: ignore[no-untyped-def]
    sandbox.write_file(sandbox.handle.workdir + "/sub/f.txt", b"in sub")
    assert sandbox.run(["cat", "f.txt"], cwd="sub")[:2] == (0, "in sub")


def test_upload_from_a_missing_source_creates_nothing(sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = sandbox.handle.workdir + "/new/out.bin"
    (res,) = sandbox.upload([UploadItem(target, source=str(tmp_path / "missing.bin"))])
    assert res.error == "file_not_found"
    assert sandbox.run(["test", "-e", "new"])[0] != 0


def test_bind_inside_the_hidden_home(make) -> None:  # type: ignore[no-untyped-def]
    # The Metaflow case: a local datastore under the user's project dir in $HOME, bound at the same path.
    import shutil

    home = os.path.realpath(os.path.expanduser("~"))
    project = os.path.join(home, ".mfsb-project-%s" % uuid.uuid4().hex)
    datastore = os.path.join(project, ".metaflow")
    os.makedirs(datastore)
    with open(os.path.join(project, "secret.txt"), "w") as f:
        f.write("not for the sandbox")
    try:
        sb = make(binds=(Bind(datastore),))
        code, out, err = sb.run(["sh", "-c", "echo artifact > %s/a.txt; cat %s/secret.txt" % (datastore, project)])
        assert code != 0 and "No such file" in err  # the rest of the home stays hidden
        assert open(os.path.join(datastore, "a.txt")).read() == "artifact\n"
    finally:
        shutil.rmtree(project)
