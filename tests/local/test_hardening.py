"""The hardened local backend, as assertions about what a step can and cannot do (real bwrap, real kernel
limits). The launcher here is root, as in containers and CI: the interesting case."""

from __future__ import annotations

import os
import threading
import uuid

import pytest
from metaflow_sandbox import Backend, Bind, Resources, SandboxError, SandboxSpec, UnsupportedOptionError, UploadItem

from .local_helpers import pids_with, wait_until

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the launcher-is-root hardening")


def sh(sb, script: str, **kw):  # type: ignore[no-untyped-def]
    return sb.run(["sh", "-c", script], **kw)


def _background(sb, script: str) -> threading.Thread:  # type: ignore[no-untyped-def]
    """Run ``script`` in a thread; it ends with an error once the test destroys the sandbox."""

    def run() -> None:
        try:
            sh(sb, script)
        except SandboxError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _host_uid(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


@needs_root
def test_step_is_an_unprivileged_user_that_cannot_read_root_only_files(sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = "/var/tmp/mfsb-root-only-%s" % uuid.uuid4().hex  # a root 0600 file, on the read-only host view
    with open(secret, "w") as f:
        f.write("root-secret")
    os.chmod(secret, 0o600)
    try:
        code, out, err = sh(sandbox, "id -u; id -g; cat /etc/shadow; cat %s; echo done" % secret)
        assert out.split()[:2] == ["65534", "65534"] and out.split()[-1] == "done"
        assert "root-secret" not in out and "root:" not in out
        assert err.count("Permission denied") == 2
    finally:
        os.unlink(secret)


@needs_root
def test_on_the_host_the_sandbox_processes_are_not_root(sandbox) -> None:  # type: ignore[no-untyped-def]
    token = "331.%d" % (os.getpid() % 1000)
    t = _background(sandbox, "sleep %s" % token)
    assert wait_until(lambda: bool(pids_with("sleep " + token)), timeout=10)
    uids = {_host_uid(p) for p in pids_with("sleep " + token)}
    sandbox.destroy()
    t.join(10)
    assert len(uids) == 1 and uids.pop() >= 0x40000000


@needs_root
def test_two_sandboxes_get_different_users(make) -> None:  # type: ignore[no-untyped-def]
    a, b = make(), make()
    assert a.handle.native.uid != b.handle.native.uid
    assert os.stat(a.handle.native.layout.host_work).st_uid == a.handle.native.uid


def test_rw_bind_of_a_root_owned_dir_stays_writable_and_files_stay_the_launchers(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "sub").mkdir()
    sb = make(binds=(Bind(str(tmp_path)),))
    assert sh(sb, "echo out > %s/sub/new && mkdir %s/d && echo x > %s/d/f" % ((tmp_path,) * 3))[0] == 0
    assert (tmp_path / "sub" / "new").read_text() == "out\n"
    assert os.stat(tmp_path / "sub" / "new").st_uid == os.getuid() == os.stat(tmp_path / "d" / "f").st_uid


def test_uploaded_files_belong_to_the_sandbox(sandbox) -> None:  # type: ignore[no-untyped-def]
    work = sandbox.handle.workdir
    sandbox.upload([UploadItem(work + "/pkg/deep/code.py", content=b"print(1)\n")])
    code, out, err = sh(sandbox, "echo more >> pkg/deep/code.py && touch pkg/deep/new && rm pkg/deep/code.py && echo ok")
    assert (code, out) == (0, "ok\n"), err


@pytest.fixture
def shared_root() -> str:  # type: ignore[no-untyped-def]
    """A sandbox root under a directory every user can pass through, as a careless configuration would be."""
    import tempfile

    from .conftest import remove_root

    d = tempfile.mkdtemp(prefix="mfsb-shared-", dir="/var/tmp")
    os.chmod(d, 0o755)
    yield d
    remove_root(d)


def test_sandboxes_cannot_read_each_other_even_in_a_shared_root(make, shared_root) -> None:  # type: ignore[no-untyped-def]
    opts = {"root": shared_root}
    a, b = make(options=opts), make(options=opts)
    assert sh(a, "echo top-secret > secret; sleep 30 & echo started")[0] == 0
    a_root = a.handle.native.root
    a_file = os.path.join(a.handle.native.layout.host_work, "secret")
    assert open(a_file).read() == "top-secret\n"  # it is there, on the host
    token = "332.%d" % (os.getpid() % 1000)
    t = _background(a, "sleep %s" % token)
    assert wait_until(lambda: bool(pids_with("sleep " + token)), timeout=10)
    host_pid = pids_with("sleep " + token)[0]
    probes = [
        "cat %s" % a_file,  # path guessing
        "cat %s/disk/work/secret" % a_root,
        "cat /proc/%d/root%s/secret" % (host_pid, a.handle.workdir),  # through /proc (the host pid)
        "cat /proc/*/root%s/secret /proc/*/cwd/secret" % a.handle.workdir,  # any pid this sandbox can see
        "cat /proc/%d/environ" % host_pid,
    ]
    for probe in probes:
        assert sh(b, probe + " 2>/dev/null | grep -q top-secret && echo LEAK")[1] == "", probe
    for listing in (shared_root, a_root):  # the root is hidden: nothing of any sandbox shows
        assert sh(b, "ls -A %s 2>/dev/null" % listing)[1] == "", listing
    a.destroy()
    t.join(10)


@pytest.mark.parametrize("limit", [40])
def test_pids_limit_stops_a_fork_bomb_with_the_setting_named(make, limit) -> None:  # type: ignore[no-untyped-def]
    sb = make(options={"pids_limit": limit})
    err: list[str] = []
    result = sb.exec(["sh", "-c", "for i in $(seq 200); do sleep 30 & done; wait"], on_stderr=err.append, timeout=60)
    text = "".join(err)
    assert result.exit_code != 0
    assert "pids limit of %d" % limit in text and "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT" in text and "Fix:" in text
    assert sh(sb, "echo still usable")[:2] == (0, "still usable\n")  # the limit is per sandbox, and it recovers


def test_default_pids_limit_allows_a_normal_process_tree(sandbox) -> None:  # type: ignore[no-untyped-def]
    code, out, err = sh(sandbox, "for i in $(seq 100); do sleep 1 & done; wait; echo ok")
    assert (code, out) == (0, "ok\n"), err


@needs_root
@pytest.mark.parametrize("where", ["/tmp", "$HOME"])
def test_disk_cap_on_tmp_and_workdir_with_the_setting_named(make, where) -> None:  # type: ignore[no-untyped-def]
    sb = make(resources=Resources(disk_mb=20))
    free_before = os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize
    err: list[str] = []
    result = sb.exec(["sh", "-c", "dd if=/dev/zero of=%s/big bs=1M count=60 2>/dev/null" % where], on_stderr=err.append)
    text = "".join(err)
    assert result.exit_code != 0
    assert "writable space (work dir + /tmp) of 20 MB" in text and "disk=" in text and "Fix:" in text
    assert os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize > free_before - (40 << 20)  # not the host disk
    assert sh(sb, "rm -f %s/big; echo small > %s/ok && cat %s/ok" % (where, where, where))[1] == "small\n"


@needs_root
def test_disk_cap_counts_work_and_tmp_together(make) -> None:  # type: ignore[no-untyped-def]
    sb = make(resources=Resources(disk_mb=30))
    assert sh(sb, "dd if=/dev/zero of=/tmp/a bs=1M count=20 2>/dev/null")[0] == 0
    code, _, err = sh(sb, "dd if=/dev/zero of=$HOME/b bs=1M count=20")
    assert code != 0 and "of 30 MB" in err


@needs_root
def test_default_disk_cap_fits_an_ordinary_task(sandbox) -> None:  # type: ignore[no-untyped-def]
    code, out, err = sh(sandbox, "dd if=/dev/zero of=/tmp/x bs=1M count=64 2>/dev/null && df -m /tmp | tail -1")
    assert code == 0, err
    assert int(out.split()[1]) == 2048  # the default cap, METAFLOW_SANDBOX_LOCAL_DISK_MB


BAD_OPTIONS = [
    ({"pids_limit": "abc"}, "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"),
    ({"pids_limit": "-5"}, "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"),
    ({"pids_limit": "0"}, "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"),
    ({"pids_limit": "inf"}, "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"),
    ({"pids_limit": "nan"}, "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"),
    ({"pids_limit": "1.5"}, "METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT"),
    ({"disk_mb": "lots"}, "METAFLOW_SANDBOX_LOCAL_DISK_MB"),
    ({"disk_mb": "-1"}, "METAFLOW_SANDBOX_LOCAL_DISK_MB"),
    ({"disk_mb": "1e400"}, "METAFLOW_SANDBOX_LOCAL_DISK_MB"),
    ({"memory_limiter": "cgroupz"}, "METAFLOW_SANDBOX_LOCAL_MEMORY_LIMITER"),
    ({"isolation": "maybe"}, "METAFLOW_SANDBOX_LOCAL_ISOLATION"),
]


@pytest.mark.parametrize("options,env_var", BAD_OPTIONS)
def test_bad_options_are_refused_before_anything_exists(options, env_var, sandbox_root) -> None:  # type: ignore[no-untyped-def]
    backend = Backend("local", options={**options, "root": sandbox_root})
    with pytest.raises(UnsupportedOptionError) as launch:
        backend.check_config()  # what the decorator calls when the run starts
    assert env_var in str(launch.value) and "Fix:" in str(launch.value) and repr(list(options.values())[0]) in str(launch.value)
    with pytest.raises(UnsupportedOptionError):
        backend.create(SandboxSpec(resources=Resources(memory_mb=100)))
    assert os.listdir(sandbox_root) == []


@pytest.mark.parametrize("var", ["METAFLOW_SANDBOX_LOCAL_PIDS_LIMIT", "METAFLOW_SANDBOX_LOCAL_DISK_MB"])
def test_bad_environment_settings_are_refused(var, monkeypatch, sandbox_root) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(var, "-100000")
    with pytest.raises(UnsupportedOptionError, match=var):
        Backend("local", options={"root": sandbox_root}).create()
    assert os.listdir(sandbox_root) == []


def test_bad_disk_resource_is_refused(backend, sandbox_root) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SandboxError, match="disk"):
        backend.create(SandboxSpec(resources=Resources(disk_mb=-5), options={"root": sandbox_root}))
    assert os.listdir(sandbox_root) == []


def test_environment_that_exec_would_refuse_is_refused_with_a_fix(sandbox) -> None:  # type: ignore[no-untyped-def]
    # One variable over the kernel's 128 KB per string: a shell would say only "Argument list too long".
    with pytest.raises(SandboxError, match="128 KB|127 KiB") as err:
        sandbox.run(["true"], env={"BIG": "x" * (200 * 1024)})
    assert "Fix:" in str(err.value)
    assert sandbox.run(["sh", "-c", "echo ${#V}"], env={"V": "y" * (100 * 1024)})[1] == "102400\n"  # under it: fine


def test_ttl_expiry_leaves_nothing(make, sandbox_root) -> None:  # type: ignore[no-untyped-def]
    from metaflow_sandbox import SandboxNotFoundError

    sb = make(ttl_seconds=1, resources=Resources(memory_mb=200), options={"root": sandbox_root})
    cgroup = sb.handle.native.cgroup.path if sb.handle.native.cgroup else None
    with pytest.raises(SandboxNotFoundError, match="ttl"):
        sb.run(["sleep", "30"])
    assert os.listdir(sandbox_root) == []
    assert cgroup is None or not os.path.exists(cgroup)
    assert not [m for m in open("/proc/self/mountinfo") if sandbox_root in m]


def test_nothing_left_after_destroy_including_mounts_and_cgroups(make, sandbox_root, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sb = make(binds=(Bind(str(tmp_path)),), resources=Resources(memory_mb=200), options={"root": sandbox_root, "pids_limit": 100})
    native = sb.handle.native
    cgroups = [cg.path for cg in (native.cgroup, native.pids) if cg is not None]
    assert sh(sb, "echo x > /tmp/f")[0] == 0
    sb.destroy()
    assert os.listdir(sandbox_root) == []
    assert not [m for m in open("/proc/self/mountinfo") if sandbox_root in m]
    assert not [c for c in cgroups if os.path.exists(c)]
    assert os.listdir(tmp_path) == []  # the bind's own files were never touched by the cleanup


@needs_root
def test_a_root_the_sandbox_user_cannot_reach_is_staged_and_cleaned(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = tmp_path / "sandboxes"  # pytest's tmp_path sits in a 0700 directory
    sb = make(options={"root": str(base)}, binds=(Bind(str(tmp_path.parent)),))
    data = sb.handle.native.data
    assert data.startswith("/tmp/metaflow-sandbox-stage-") and os.path.isdir(data)
    assert sh(sb, "echo hi > f && cat f && id -u")[1].split() == ["hi", "65534"]
    sb.destroy()
    assert not os.path.exists(data) and os.listdir(base) == []
    assert not [m for m in open("/proc/self/mountinfo") if data in m]


# What the network being ON shares with the host (documented in docs/reliability.md): the host's network
# namespace, so loopback services and abstract unix sockets are reachable; path unix sockets only where the
# sandbox sees the path AND its user may connect.

CONNECT_ABSTRACT = "import socket; s = socket.socket(socket.AF_UNIX); s.connect(%r); print(s.recv(4).decode())"


@pytest.fixture
def abstract_socket():  # type: ignore[no-untyped-def]
    import socket

    name = "\0mfsb-test-%s" % uuid.uuid4().hex
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(name)
    srv.listen(4)
    srv.settimeout(5)

    def serve() -> None:
        try:
            while True:
                conn, _ = srv.accept()
                conn.sendall(b"pong")
                conn.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield name
    srv.close()


def test_network_on_shares_abstract_unix_sockets_off_does_not(make, abstract_socket) -> None:  # type: ignore[no-untyped-def]
    on = make()
    assert on.run(["python", "-c", CONNECT_ABSTRACT % abstract_socket])[:2] == (0, "pong\n")
    off = make(network=False)
    code, out, err = off.run(["python", "-c", CONNECT_ABSTRACT % abstract_socket])
    assert code != 0 and "pong" not in out and "ConnectionRefused" in err


@needs_root
def test_a_root_only_unix_socket_on_a_visible_path_is_not_connectable(make) -> None:  # type: ignore[no-untyped-def]
    import socket

    path = "/var/tmp/mfsb-test-%s.sock" % uuid.uuid4().hex[:8]
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    try:
        script = "import socket; s = socket.socket(socket.AF_UNIX); s.connect(%r); print('connected')" % path
        os.chmod(path, 0o600)
        code, out, err = make().run(["python", "-c", script])
        assert code != 0 and "PermissionError" in err  # visible (read-only host view), but not its user's
        os.chmod(path, 0o777)
        assert make().run(["python", "-c", script])[:2] == (0, "connected\n")  # a world-writable one is: documented
    finally:
        srv.close()
        os.unlink(path)


@needs_root
def test_where_no_own_user_is_possible_it_says_so_loudly(make, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from metaflow_sandbox.backends._local import identity, isolation, sandbox

    bwrap = isolation.find_bwrap({})
    monkeypatch.setitem(identity._no_own_uid, bwrap, "ID-mapped mounts do not work here (simulated)")
    monkeypatch.setattr(sandbox, "_warned", set())
    with caplog.at_level("WARNING", logger="metaflow_sandbox.local"):
        sb = make()
    assert sb.handle.native.uid is None
    assert "CAN READ root-only files" in caplog.text and "simulated" in caplog.text and "Fix:" in caplog.text
    assert sh(sb, "echo still runs")[:2] == (0, "still runs\n")  # degraded, not broken, and honest about it


@needs_root
def test_no_nested_user_namespaces(sandbox) -> None:  # type: ignore[no-untyped-def]
    code, out, err = sh(sandbox, "unshare -U true && echo nested")
    assert code != 0 and "nested" not in out


SERVE = (
    "import socket; s = socket.socket(); s.bind(('127.0.0.1', %d)); s.listen(1); print('listening', flush=True); "
    "c, _ = s.accept(); c.sendall(b'from-sandbox'); c.close()"
)


def test_network_on_a_sandbox_can_listen_on_the_hosts_loopback(sandbox) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result: list = []
    t = threading.Thread(target=lambda: result.append(sandbox.run(["python", "-c", SERVE % port], timeout=20)), daemon=True)
    t.start()

    def connect() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                return c.recv(32)
        except OSError:
            return b""

    got: list[bytes] = []
    assert wait_until(lambda: got.append(connect()) or got[-1] == b"from-sandbox", timeout=10)
    t.join(10)
    assert result and result[0][0] == 0


@needs_root
def test_a_privileged_port_cannot_be_bound(sandbox) -> None:  # type: ignore[no-untyped-def]
    code, _, err = sandbox.run(["python", "-c", "import socket; socket.socket().bind(('127.0.0.1', 81))"])
    assert code != 0 and "PermissionError" in err


@needs_root
def test_binds_exist_only_inside_so_removing_the_sandbox_root_cannot_touch_their_files(make, sandbox_root, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    (tmp_path / "precious").write_text("launcher data")
    sb = make(binds=(Bind(str(tmp_path)),), options={"root": sandbox_root})
    assert sh(sb, "cat %s/precious" % tmp_path)[1] == "launcher data"
    target = sb.handle.native.layout.sources[str(tmp_path)]  # where bwrap finds it, inside its namespace
    assert not [m for m in open("/proc/self/mountinfo") if " %s " % target in m]  # not on the host
    shutil.rmtree(sb.handle.native.data, ignore_errors=True)  # a careless cleanup, while it lives
    assert (tmp_path / "precious").read_text() == "launcher data"


@needs_root
def test_a_create_that_fails_half_way_leaves_nothing(backend, sandbox_root) -> None:  # type: ignore[no-untyped-def]
    from metaflow_sandbox.backends._local import limits

    before = set(limits.stale_cgroups("mfsb-"))
    spec = SandboxSpec(
        binds=(Bind("/sys/kernel", "/data", read_only=True),),  # sysfs cannot be ID-mapped: fails after dir, cgroup, tmpfs
        resources=Resources(memory_mb=100),
        options={"root": sandbox_root},
    )
    with pytest.raises(SandboxError, match="cannot give the sandbox's own user access to /sys/kernel") as err:
        backend.create(spec)
    assert "Fix:" in str(err.value)
    assert os.listdir(sandbox_root) == []
    assert not [m for m in open("/proc/self/mountinfo") if sandbox_root in m]
    assert [c for c in set(limits.stale_cgroups("mfsb-")) - before if "-%d-" % os.getpid() in c] == []


@pytest.mark.parametrize("cwd", ["nope", "/nope", "a/../../x"])
def test_a_missing_cwd_is_named_with_a_fix(sandbox, cwd) -> None:  # type: ignore[no-untyped-def]
    code, out, err = sandbox.run(["pwd"], cwd=cwd)
    assert code == 1 and out == "" and "cwd %r is not a directory in the sandbox" % cwd in err and "Fix:" in err
    assert "bwrap" not in err


def test_existing_cwds_still_work(sandbox) -> None:  # type: ignore[no-untyped-def]
    assert sh(sandbox, "mkdir -p a/b")[0] == 0
    assert sandbox.run(["pwd"], cwd="a/b")[:2] == (0, sandbox.handle.workdir + "/a/b\n")
    assert sandbox.run(["pwd"], cwd="/usr")[:2] == (0, "/usr\n")
    assert sandbox.run(["pwd"], cwd="/tmp")[:2] == (0, "/tmp\n")


@needs_root
@pytest.mark.parametrize("with_bind", [False, True])
def test_a_sandbox_neither_sees_nor_pins_other_sandboxes_mounts(make, tmp_path, with_bind) -> None:  # type: ignore[no-untyped-def]
    other = make()
    assert sh(other, "dd if=/dev/zero of=/tmp/blob bs=1M count=8 2>/dev/null")[0] == 0  # tmpfs memory of its own
    sb = make(binds=(Bind(str(tmp_path)),) if with_bind else ())
    code, out, _ = sb.run(["cat", "/proc/self/mountinfo"])
    assert code == 0 and other.handle.native.name not in out  # another sandbox's tmpfs is not in its namespace
    assert other.handle.native.name in open("/proc/self/mountinfo").read()  # while it is mounted on the host
    assert sh(other, "ls -s /tmp/blob")[1].split()[0] == "8192"  # and the drop did not reach the host's copy
    later = make()  # created after `sb`: its mounts do not reach `sb`'s later commands either
    code, out, _ = sb.run(["cat", "/proc/self/mountinfo"])
    assert code == 0 and later.handle.native.name in open("/proc/self/mountinfo").read()
    assert other.handle.native.name not in out and later.handle.native.name not in out
