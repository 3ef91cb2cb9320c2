"""Discovery through real entry points: fabricated distributions (``*.dist-info`` with an
``entry_points.txt``) on a temporary sys.path entry are found exactly like pip-installed ones."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
from metaflow_sandbox import (
    AmbiguousBackendError,
    Backend,
    BackendLoadError,
    UnknownBackendError,
    available_backends,
    describe_backends,
    get_plugin_manager,
)

GOOD_HOOKS = """
from metaflow_sandbox import ExecResult, FileResult, SandboxHandle, hookimpl

@hookimpl
def sandbox_create(spec):
    return SandboxHandle("{name}", "sb-1")

@hookimpl
def sandbox_exec(handle, command, env, cwd, timeout, on_stdout, on_stderr):
    return ExecResult(0)

@hookimpl
def sandbox_upload(handle, files):
    return [FileResult(f.path) for f in files]

@hookimpl
def sandbox_download(handle, files):
    return [FileResult(f.path, error="file_not_found") for f in files]

@hookimpl
def sandbox_destroy(handle):
    return True
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Returns ``install(dist, backends={name: source})``: writes the modules and a dist-info on sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(dist: str, backends: dict[str, str], version: str = "1.0", where: Path = tmp_path) -> dict[str, str]:
        where.mkdir(exist_ok=True)
        modules = {}
        for name, source in backends.items():
            module = "mod_%s_%s" % (name.replace("-", "_"), uuid.uuid4().hex[:8])  # fresh: no sys.modules reuse
            (where / (module + ".py")).write_text(textwrap.dedent(source).format(name=name))
            modules[name] = module
        info = where / ("%s-%s.dist-info" % (dist.replace("-", "_"), version))
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (dist, version))
        eps = "".join("%s = %s\n" % kv for kv in modules.items())
        (info / "entry_points.txt").write_text("[metaflow_sandbox.backends]\n" + eps)
        return modules

    return install


def test_local_is_discovered_through_the_entry_point_group() -> None:
    """The embedded backend is registered like any third-party one (dogfooding the contract)."""
    (ep,) = available_backends()["local"]
    assert ep.dist.name == "metaflow-sandbox"
    assert ep.group == "metaflow_sandbox.backends"


def test_fabricated_distribution_is_selectable(site) -> None:
    site("acme-fake", {"acme-fake": GOOD_HOOKS})
    assert Backend("acme-fake").create().exec(["true"]).exit_code == 0


def test_unknown_backend_lists_installed_ones(site) -> None:
    site("acme-fake", {"acme-fake": GOOD_HOOKS})
    with pytest.raises(UnknownBackendError) as info:
        get_plugin_manager("no-such-backend")
    assert "local" in info.value.installed and "acme-fake" in info.value.installed
    text = str(info.value)
    assert "No sandbox backend named 'no-such-backend'" in text
    assert "local" in text and "acme-fake" in text
    assert "metaflow_sandbox.backends" in text  # how to provide it


@pytest.mark.parametrize("name", ["daytona", "e2b"])
def test_unknown_first_party_backend_names_the_pip_extra(name: str) -> None:
    """First-party names get the exact install command (daytona/e2b may be installed here, so build the error)."""
    err = UnknownBackendError(name, ["local"])
    assert "pip install 'metaflow-sandbox[%s]'" % name in str(err)
    assert "Installed backends: local" in str(err)


def test_name_claimed_by_two_distributions_names_both(site, tmp_path: Path) -> None:
    site("acme-one", {"twin": GOOD_HOOKS})
    site("acme-two", {"twin": GOOD_HOOKS})
    with pytest.raises(AmbiguousBackendError) as info:
        get_plugin_manager("twin")
    assert info.value.dists == ["acme-one", "acme-two"]
    assert "acme-one" in str(info.value) and "acme-two" in str(info.value)
    assert "pip uninstall" in str(info.value)


def test_same_distribution_twice_on_path_is_not_ambiguous(site, tmp_path: Path, monkeypatch) -> None:
    """A distribution visible from two sys.path entries (e.g. editable + PYTHONPATH) is one claim."""
    site("acme-same", {"same": GOOD_HOOKS})
    other = tmp_path / "second"
    monkeypatch.syspath_prepend(str(other))
    site("acme-same", {"same": GOOD_HOOKS}, where=other)
    assert get_plugin_manager("same") is not None


def test_plugin_that_fails_to_import_names_the_distribution(site) -> None:
    site("acme-broken", {"broken": "import acme_sdk_that_is_not_installed\n"})
    with pytest.raises(BackendLoadError) as info:
        get_plugin_manager("broken")
    assert info.value.dist == "acme-broken"
    text = str(info.value)
    assert "acme-broken" in text and "acme_sdk_that_is_not_installed" in text
    assert "pip install -U acme-broken" in text


def test_wrong_hook_signature_names_the_hook(site) -> None:
    extra_arg = GOOD_HOOKS.replace("on_stdout, on_stderr):", "on_stdout, on_stderr, colour):")
    site("acme-sig", {"sig": extra_arg})
    with pytest.raises(BackendLoadError) as info:
        get_plugin_manager("sig")
    assert info.value.hook == "sandbox_exec"
    assert "sandbox_exec" in str(info.value) and "acme-sig" in str(info.value)
    assert "colour" in str(info.value)


def test_missing_required_hook_names_it(site) -> None:
    no_destroy = GOOD_HOOKS.split("@hookimpl\ndef sandbox_destroy")[0]
    site("acme-partial", {"partial": no_destroy})
    with pytest.raises(BackendLoadError) as info:
        get_plugin_manager("partial")
    assert info.value.hook == "sandbox_destroy"
    assert "does not implement sandbox_destroy" in str(info.value)


def test_broken_backend_does_not_stop_local(site) -> None:
    """A broken third-party backend is reported by describe_backends and never blocks another backend."""
    site("acme-broken", {"broken": "raise RuntimeError('boom at import')\n"})
    site("acme-sig", {"sig": GOOD_HOOKS.replace("def sandbox_destroy(handle)", "def sandbox_destroy(handle, x)")})
    infos = {i.name: i for i in describe_backends()}
    assert infos["broken"].loads is False and "boom at import" in infos["broken"].error
    assert infos["broken"].distribution == "acme-broken" and infos["broken"].version == "1.0"
    assert infos["sig"].loads is False and "sandbox_destroy" in infos["sig"].error
    assert infos["local"].loads is True and infos["local"].error is None
    with Backend("local").create() as sb:
        code, out, _ = sb.run(["echo", "still-works"], timeout=30)
    assert (code, out) == (0, "still-works\n")


def test_listing_does_not_import_backends(site) -> None:
    """available_backends() reads metadata only: a backend that fails at import is still listed, unimported."""
    modules = site("acme-lazy", {"lazy": "raise RuntimeError('imported!')\n"})
    import sys

    assert "lazy" in available_backends()
    assert modules["lazy"] not in sys.modules
