"""docs/adding-a-backend.md cannot rot: its code blocks are the example's files byte for byte, and it
documents every kit test, capability flag and hook."""

from __future__ import annotations

import re
from pathlib import Path

from metaflow_sandbox.plugins import OPTIONAL_HOOKS, REQUIRED_HOOKS
from metaflow_sandbox.testing import BackendConformance

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "adding-a-backend.md"
EXAMPLE = REPO / "examples" / "third_party_backend"
FENCE = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.S | re.M)


def _blocks() -> dict[str, str]:
    return {path: body for path, body in FENCE.findall(DOC.read_text())}


def test_code_blocks_match_the_example_files_byte_for_byte() -> None:
    blocks = _blocks()
    assert blocks, "no ```lang file=... blocks found"
    for path, body in blocks.items():
        assert body == (REPO / path).read_text(), "%s in the doc differs from the file; run `python %s` to paste the files again" % (
            path,
            Path(__file__).relative_to(REPO),
        )


def test_every_example_source_file_is_shown() -> None:
    wanted = {str(p.relative_to(REPO)) for p in EXAMPLE.rglob("*") if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts}
    assert wanted - set(_blocks()) == set()


def test_every_kit_test_and_flag_is_documented() -> None:
    text = DOC.read_text()
    tests = [name for name in vars(BackendConformance) if name.startswith("test_")]
    flags = [name for name, value in vars(BackendConformance).items() if isinstance(value, property)]
    knobs = ["required_env", "backend_options", "sandbox_spec", "timeout_slack_seconds"]
    missing = [name for name in tests + flags + knobs if not re.search(r"`%s\b" % name, text)]
    assert not missing, "not documented in docs/adding-a-backend.md: %s" % missing


def test_every_hook_is_documented() -> None:
    text = DOC.read_text()
    assert [h for h in REQUIRED_HOOKS + OPTIONAL_HOOKS if "`%s(" % h not in text] == []


def test_every_kit_test_says_how_to_fix_a_failure() -> None:
    """Authors read the failing test's docstring: each one ends with what their hook must do."""
    for name, func in vars(BackendConformance).items():
        if name.startswith("test_"):
            last = " ".join(func.__doc__.split("Troubleshooting:")[-1].split())
            assert "Troubleshooting: if this fails" in " ".join(func.__doc__.split()), name
            assert re.search(r"\byour\b|\byou\b", last), "%s: say what the author must change" % name


if __name__ == "__main__":  # refresh the doc's code blocks from the example files
    DOC.write_text(FENCE.sub(lambda m: m.group(0).replace(m.group(2), (REPO / m.group(1)).read_text(), 1), DOC.read_text()))
