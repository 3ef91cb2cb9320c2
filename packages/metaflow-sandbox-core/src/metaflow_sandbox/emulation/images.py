"""What an emulator builds images from and starts sandboxes on: real pip installs, and a bare base Python.

An emulated *image* is a directory made by really running ``pip install --target`` (PyPI is reachable
where the emulators run) with the emulator's interpreter: its packages go on the sandbox's PYTHONPATH
and its scripts on PATH, bound read-only. A provider's emulator maps its own notion (a Daytona snapshot,
an E2B template) onto :class:`ImageStore`; the build log streams line by line to a callback, as the
provider streams it, and stays on the image for later reads.

The *bare base* is what a provider's default image really offers a task: a Python with nothing but
the stdlib (a ``venv --without-pip``, first on PATH), where ``pip`` and ``python -m pip`` are shims that
record the attempt and fail. A test started with it proves that a package came from a prepared image
and that no task ran pip (``BareBase.pip_attempts``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional, Sequence

#: The states an image goes through; a provider's emulator translates them to its own words.
PENDING, BUILDING, ACTIVE, ERROR = "pending", "building", "active", "error"
#: A PATH with nothing of the launcher's on it (the bare base's bin dir goes first).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,200}$")


def state_dir(prefix: str) -> str:
    """A directory for an emulator's images, readable by sandboxes (they run under their own uid)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path


@dataclasses.dataclass(eq=False)
class Image:
    """One emulated image: its directory, state, build log and why it failed."""

    name: str
    path: str
    requirements: tuple[str, ...] = ()
    state: str = PENDING
    log: list[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    created: float = dataclasses.field(default_factory=time.time)
    built: Optional[float] = None
    size_bytes: int = 0
    #: Set once the build ends, either way.
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def site(self) -> str:
        """Where its packages are (a sandbox from it has this on PYTHONPATH)."""
        return os.path.join(self.path, "site")

    @property
    def bin(self) -> str:
        """Its packages' scripts (a sandbox from it has this first on PATH)."""
        return os.path.join(self.site, "bin")

    def env(self, path: str) -> dict[str, str]:
        """The environment a sandbox from this image starts with, given the PATH it would have had."""
        return {"PYTHONPATH": self.site, "PATH": self.bin + os.pathsep + path}


class ImageStore:
    """Images by name, built with real pip installs into directories under ``root``; kept until removed."""

    def __init__(self, root: str, python: str = sys.executable, pip_args: Sequence[str] = ()):
        self.root = root
        self.python = python
        self.pip_args = tuple(pip_args)
        self.images: dict[str, Image] = {}
        self.builds = 0  # how many builds ran (a test's "the second run built nothing")
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()  # pip processes, killed by close()

    def get(self, name: str) -> Optional[Image]:
        return self.images.get(name)

    def add(self, name: str, requirements: Sequence[str]) -> Image:
        """Register a pending image (ValueError if the name is taken or unsafe); ``build`` it next."""
        if not _SAFE_NAME.match(name):
            raise ValueError("invalid image name %r" % name)
        with self._lock:
            if name in self.images:
                raise ValueError("image %s already exists" % name)
            image = Image(name, os.path.join(self.root, name.replace(":", "_")), tuple(requirements))
            self.images[name] = image
        return image

    def build(self, image: Image, on_log: Optional[Callable[[str], None]] = None, extra_log: Sequence[str] = ()) -> Image:
        """Blocking: pip-install its requirements into its directory, streaming lines to ``on_log``.

        Ends ``active`` or ``error`` (``error`` holds the last lines of pip's output). Run it in a
        worker thread (``LocalRunner.blocking``).
        """

        def say(line: str) -> None:
            image.log.append(line)
            if on_log is not None:
                on_log(line)

        self.builds += 1
        image.state = BUILDING
        for line in extra_log:
            say(line)
        staging = image.path + ".building"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(os.path.join(staging, "site"), 0o755)
        code = 0
        if image.requirements:
            cmd = [self.python, "-m", "pip", "install", "--target", os.path.join(staging, "site"), "--no-input"]
            cmd += ["--disable-pip-version-check", "--no-warn-script-location", "--progress-bar", "off", *self.pip_args]
            say("$ pip install %s" % " ".join(image.requirements))
            try:
                proc = subprocess.Popen(
                    cmd + list(image.requirements),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    errors="replace",
                    env=dict(os.environ, PIP_NO_INPUT="1", PYTHONNOUSERSITE="1"),
                )
            except OSError as exc:
                say("could not run pip: %s" % exc)
                code = 127
            else:
                self._running.add(proc)
                try:
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        say(line.rstrip("\n"))
                    code = proc.wait()
                finally:
                    self._running.discard(proc)
        if code != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = [line for line in image.log if line.strip()][-12:]
            image.error = "pip install exited with code %d: %s" % (code, "\n".join(tail))
            image.state = ERROR
        else:
            _readable(staging)
            shutil.rmtree(image.path, ignore_errors=True)
            os.rename(staging, image.path)
            image.size_bytes = _size(image.path)
            image.built = time.time()
            image.state = ACTIVE
            say("built %s (%d bytes)" % (image.name, image.size_bytes))
        image.done.set()
        return image

    def remove(self, name: str) -> bool:
        with self._lock:
            image = self.images.pop(name, None)
        if image is None:
            return False
        shutil.rmtree(image.path, ignore_errors=True)
        return True

    def close(self) -> None:
        """Stop running builds and remove every image (the emulator is stopping)."""
        for proc in list(self._running):
            proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class BareBase:
    """A stdlib-only Python first on PATH, with pip shims that record every attempt and fail."""

    SHIM_MESSAGE = "pip is not available in this emulated base image"

    def __init__(self, root: str, python: Optional[str] = None):
        self.root = root
        self.venv = os.path.join(root, "bare-python")
        self.attempts_dir = os.path.join(root, "pip-attempts")
        self.attempts_log = os.path.join(self.attempts_dir, "attempts.log")
        base_python = python or getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base_python, "-m", "venv", "--without-pip", self.venv], check=True, capture_output=True)
        os.makedirs(self.attempts_dir, exist_ok=True)
        os.chmod(self.attempts_dir, 0o1777)  # sandboxes run under their own uid and append here
        self._write_shims()
        _readable(self.venv)

    @property
    def bin(self) -> str:
        return os.path.join(self.venv, "bin")

    @property
    def path(self) -> str:
        """The PATH a sandbox on the bare base starts with."""
        return self.bin + os.pathsep + SYSTEM_PATH

    def env(self) -> dict[str, str]:
        return {"PATH": self.path, "PYTHONNOUSERSITE": "1"}

    def pip_attempts(self) -> list[str]:
        """Every pip command a sandbox tried (its arguments), oldest first."""
        try:
            with open(self.attempts_log, errors="replace") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def _write_shims(self) -> None:
        script = '#!/bin/sh\necho "pip $*" >> %s 2>/dev/null\necho "%s (pip $*)" >&2\nexit 127\n' % (self.attempts_log, self.SHIM_MESSAGE)
        version = "%d.%d" % sys.version_info[:2]
        for name in ("pip", "pip3", "pip" + version):
            path = os.path.join(self.bin, name)
            with open(path, "w") as f:
                f.write(script)
            os.chmod(path, 0o755)
        site = _venv_site(self.venv)
        module = os.path.join(site, "pip")
        os.makedirs(module, exist_ok=True)
        with open(os.path.join(module, "__init__.py"), "w") as f:
            f.write('"""A shim of the emulated bare base: pip is not installed here."""\n')
        with open(os.path.join(module, "__main__.py"), "w") as f:
            f.write(
                "import sys\n"
                "try:\n"
                "    with open(%r, 'a') as f:\n"
                "        f.write('python -m pip ' + ' '.join(sys.argv[1:]) + '\\n')\n"
                "except OSError:\n"
                "    pass\n"
                "sys.exit('%s (python -m pip ' + ' '.join(sys.argv[1:]) + ')')\n" % (self.attempts_log, self.SHIM_MESSAGE)
            )


def _venv_site(venv: str) -> str:
    return os.path.join(venv, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")


def _readable(top: str) -> None:
    """World-readable (and searchable): sandboxes run under their own uid."""
    os.chmod(top, os.stat(top).st_mode | 0o755)
    for root, dirs, files in os.walk(top):
        for name, bits in [(d, 0o755) for d in dirs] + [(f, 0o444) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | bits)


def _size(top: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(top):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
