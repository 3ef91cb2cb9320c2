"""A non-root launcher keeps working with the hardened backend (its own uid inside, per-file disk cap, no
cgroups). The suite runs as root, so the launcher here is dropped to uid 65534 in a private mount namespace
that makes the root-only Python installation reachable for it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"), reason="needs root, unshare and setpriv"
)

LAUNCHER = textwrap.dedent(
    """
    import json, os, sys
    from metaflow_sandbox import Backend, Bind, Resources, SandboxSpec
    work = sys.argv[1]
    os.makedirs(work + "/data", exist_ok=True)
    sb = Backend("local").create(SandboxSpec(resources=Resources(disk_mb=5), binds=(Bind(work + "/data"),)))
    n = sb.handle.native
    out = {"uid": n.uid, "capped": n.disk_capped, "root": n.root}
    out["probe"] = sb.run(["sh", "-c", "id -u; cat /etc/shadow >/dev/null 2>&1 || echo no-shadow; echo x > %s/data/f && echo wrote" % work])
    out["big"] = sb.run(["dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", "count=10"])
    sb.destroy()
    out["left"] = os.listdir(os.path.dirname(n.root))
    print("RESULT " + json.dumps(out))
    """
)

SETUP = """set -e
mkdir -p "$1/pyenv" && mount --bind {prefix} "$1/pyenv"
mount -t tmpfs -o mode=755 tmpfs /root && mkdir -p {prefix} && mount --move "$1/pyenv" {prefix}
cd "$1" && shift
exec setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$PWD" TMPDIR="$PWD" PATH={bindir}:/usr/bin:/bin "$@"
"""


def test_a_non_root_launcher_keeps_working() -> None:
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/root/"):
        pytest.skip("this trick only re-exposes a Python installed under /root")
    work = tempfile.mkdtemp(prefix="mfsb-nonroot-", dir="/tmp")
    os.chmod(work, 0o777)
    try:
        setup = SETUP.format(prefix=prefix, bindir=os.path.dirname(sys.executable))
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", work, sys.executable, "-c", LAUNCHER, work],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, proc.stderr[-3000:]
        out = json.loads(lines[-1][len("RESULT ") :])
        assert out["uid"] is None and out["capped"] is False  # no own uid, no tmpfs: it cannot mount
        code, stdout, _ = out["probe"]
        assert (code, stdout.split()) == (0, ["65534", "no-shadow", "wrote"])  # the launcher's uid could not read it either
        code, _, err = out["big"]
        assert code == 128 + 25 and "writable space (work dir + /tmp) of 5 MB" in err and "Fix:" in err  # per-file cap
        assert out["left"] == []
        assert os.stat(os.path.join(work, "data", "f")).st_uid == 65534
    finally:
        shutil.rmtree(work, ignore_errors=True)
