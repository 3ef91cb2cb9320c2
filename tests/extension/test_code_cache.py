"""The local backend's code-package cache: a package's Metaflow (`.mf_code`) is extracted and compiled
once per content, and shared (hard links) by every later package that carries the same one."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile

from metaflow_extensions.sandbox_core.plugins.sandbox_code_cache import READY, prepared_package


class Store:
    """The one datastore call the cache makes: the package's bytes by sha."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs
        self.loads: list[str] = []

    def load_data(self, keys):
        self.loads += keys
        return [(k, self.blobs[k]) for k in keys]


def package(files: dict[str, str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


METAFLOW = {".mf_code/fakeflow/__init__.py": "VALUE = 41\n", ".mf_code/fakeflow/more.py": "def f():\n    return 1\n"}


def test_a_second_package_with_the_same_metaflow_shares_its_compiled_copy(tmp_path):
    store = Store({
        "sha1": package({**METAFLOW, "flow.py": "print('one')\n"}),
        "sha2": package({**METAFLOW, "flow.py": "print('two')\n"}),
        "sha3": package({**METAFLOW, ".mf_code/fakeflow/__init__.py": "VALUE = 42\n", "flow.py": "x = 3\n"}),
    })  # fmt: skip
    first = prepared_package(store, "sha1", str(tmp_path))
    second = prepared_package(store, "sha2", str(tmp_path))
    third = prepared_package(store, "sha3", str(tmp_path))
    assert os.path.exists(os.path.join(second, READY))
    one = os.stat(os.path.join(first, ".mf_code/fakeflow/more.py"))
    two = os.stat(os.path.join(second, ".mf_code/fakeflow/more.py"))
    assert one.st_ino == two.st_ino, "the same Metaflow is kept once and linked"
    assert os.path.isdir(os.path.join(second, ".mf_code")) and not os.path.islink(os.path.join(second, ".mf_code"))
    assert os.stat(os.path.join(third, ".mf_code/fakeflow/more.py")).st_ino != one.st_ino, "other content, other copy"
    assert open(os.path.join(second, "flow.py")).read() == "print('two')\n"
    # Bytecode is there and valid for each package (the user's files too), and imports see each one's content.
    for root, value in ((second, 41), (third, 42)):
        caches = os.listdir(os.path.join(root, ".mf_code/fakeflow/__pycache__"))
        assert any(c.startswith("__init__.") for c in caches)
        assert os.listdir(os.path.join(root, "__pycache__"))
        out = subprocess.run(
            [sys.executable, "-B", "-c", "import fakeflow; print(fakeflow.VALUE)"],
            env={"PYTHONPATH": os.path.join(root, ".mf_code"), "PATH": os.environ.get("PATH", "")},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == str(value)
    # A package already prepared is not fetched again.
    assert prepared_package(store, "sha2", str(tmp_path)) == second and store.loads == ["sha1", "sha2", "sha3"]


def _setup(package_dir, datastore_root, workdir):
    """Run the task's setup commands for a `local` sandbox in `workdir`, as its bash would; the exported env."""
    from metaflow_extensions.sandbox_core.plugins.sandbox_task import local_package_commands

    cmds = ["mflog(){ echo $1; }"] + local_package_commands(package_dir, '{"mfcontent_version": 1}', datastore_root) + ["env"]
    out = subprocess.run(["bash", "-c", " && ".join(cmds)], cwd=workdir, capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def test_a_task_gets_its_own_copy_of_the_package_with_one_setup(tmp_path):
    store = Store({"sha1": package({**METAFLOW, "flow.py": "print('one')\n", "lib/util.py": "X = 1\n"})})
    (tmp_path / "cache").mkdir()
    pkg = prepared_package(store, "sha1", str(tmp_path / "cache"))
    datastore = tmp_path / "ds" / ".metaflow"
    datastore.mkdir(parents=True)
    for i, root in enumerate((str(datastore), None)):
        work = tmp_path / ("work%d" % i)
        work.mkdir()
        env = _setup(pkg, root, work)
        task = work / "metaflow"
        assert env["PWD"] == str(task)
        assert (task / "flow.py").read_text() == "print('one')\n" and (task / "lib" / "util.py").read_text() == "X = 1\n"
        assert os.path.realpath(task / ".mf_code") == os.path.realpath(os.path.join(pkg, ".mf_code"))
        if root:
            assert os.path.realpath(task / ".metaflow") == str(datastore)
            assert env["METAFLOW_DATASTORE_SYSROOT_LOCAL"] == str(datastore.parent)
        else:
            assert (task / ".metaflow").is_dir() and not (task / ".metaflow").is_symlink()
        # The copy is the task's own: a task that rewrites its files changes nothing in the cache.
        (task / "flow.py").write_text("changed\n")
        (task / "lib" / "util.py").write_text("changed\n")
        assert open(os.path.join(pkg, "flow.py")).read() == "print('one')\n"
        assert open(os.path.join(pkg, "lib", "util.py")).read() == "X = 1\n"
