"""docs/adding-a-backend.md cannot rot: its code blocks are the example's files byte for byte, it
documents every kit test, capability flag and hook, and it states each rule the kit checks as the hook
docstrings do."""

from __future__ import annotations

import re
from pathlib import Path

from metaflow_sandbox import hookspecs
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


# Each rule the kit checks -> (the hook it binds, a phrase that states it). The phrase must appear in that
# hook's docstring in hookspecs.py AND in this doc, and the kit test must name the hook: the three agree.
RULES = {
    "test_offline_missing_credentials_named": ("sandbox_check_config", "BackendNotConfiguredError"),
    "test_lifecycle_create_returns_handle": ("sandbox_create", "SandboxHandle(backend, sandbox_id, workdir"),
    "test_lifecycle_destroy_is_idempotent": ("sandbox_destroy", "False if it was already gone"),
    "test_lifecycle_exec_after_destroy_raises_not_found": ("sandbox_exec", "SandboxNotFoundError"),
    "test_lifecycle_labels_kept": ("sandbox_create", "spec.labels"),
    "test_lifecycle_list_by_labels": ("sandbox_list", "never destroyed ones"),
    "test_lifecycle_ttl_honoured": ("sandbox_create", "must die by itself after spec.ttl_seconds"),
    "test_lifecycle_destroy_from_bare_handle_in_another_process": ("sandbox_destroy", "native=None"),
    "test_exec_exit_codes_are_results": ("sandbox_exec", "a non-zero exit is"),
    "test_exec_stdout_stderr_separate": ("sandbox_exec", "apart"),
    "test_exec_streams_before_exit": ("sandbox_exec", "while the command runs"),
    "test_exec_unicode_round_trip": ("sandbox_exec", "decoded text"),
    "test_exec_large_output_complete_in_order": ("sandbox_exec", "in order"),
    "test_exec_env_visible": ("sandbox_exec", "on top of"),
    "test_exec_spec_env_visible": ("sandbox_exec", "on top of"),
    "test_exec_task_environment": ("sandbox_create", "never the launcher's os.environ"),
    "test_exec_limits_enforced_when_declared": ("sandbox_create", "enforces_limits"),
    "test_exec_leftover_processes_do_not_hold_exec": ("sandbox_exec", "own process exits"),
    "test_exec_cwd_honoured": ("sandbox_exec", "cwd"),
    "test_exec_default_cwd_is_workdir": ("sandbox_exec", "means handle.workdir"),
    "test_exec_timeout_raises_and_kills": ("sandbox_exec_kill", "whole process group"),
    "test_exec_cancel_stops_command": ("sandbox_exec_kill", "Sandbox.cancel()"),
    "test_exec_kill_keeps_sandbox_usable": ("sandbox_exec_kill", "keep the sandbox"),
    "test_files_all_byte_values_round_trip": ("sandbox_upload", "byte for byte"),
    "test_files_large_file_streams": ("sandbox_upload", "Stream UploadItem.source"),
    "test_files_missing_parent_dirs_created": ("sandbox_upload", "missing parent directories"),
    "test_files_missing_download_is_file_not_found": ("sandbox_download", 'error="file_not_found"'),
    "test_files_batch_results_in_order": ("sandbox_upload", "per item, in order"),
    "test_files_relative_path_is_invalid": ("sandbox_upload", "invalid_path"),
    "test_files_directory_download_is_is_directory": ("sandbox_download", "is_directory"),
    "test_files_upload_visible_to_commands": ("sandbox_upload", "where commands see"),
    "test_files_command_output_downloadable": ("sandbox_download", "streamed to"),
}


def _plain(text: str) -> str:
    """Markdown/rst markup and line breaks removed, so a phrase matches however it is typeset."""
    return " ".join(text.replace("``", "").replace("`", "").replace("**", "").split()).lower()


def test_hook_docs_doc_and_kit_agree_on_every_rule() -> None:
    """Every live kit test has a rule, stated in its hook's docstring and in this doc, and the test names the hook."""
    live = [name for name in vars(BackendConformance) if name.startswith("test_") and not name.startswith("test_offline_")]
    assert [name for name in live if name not in RULES] == [], "add the new kit test to RULES (hook, phrase)"
    doc = _plain(DOC.read_text())
    for test, (hook, phrase) in RULES.items():
        spec_doc = _plain(getattr(hookspecs, hook).__doc__)
        assert _plain(phrase) in spec_doc, "hookspecs.%s does not state the rule %s checks: %r" % (hook, test, phrase)
        assert _plain(phrase) in doc, "docs/adding-a-backend.md does not state the rule %s checks: %r" % (test, phrase)
        assert hook in getattr(BackendConformance, test).__doc__, "%s's docstring does not name %s" % (test, hook)


def test_hookspec_and_doc_give_one_ttl_rule() -> None:
    """The ttl is a "must" everywhere: no "where you can" left in the doc or the hook docs."""
    for text in (DOC.read_text(), hookspecs.__doc__ or "", hookspecs.sandbox_create.__doc__):
        assert "where you can" not in _plain(text)


if __name__ == "__main__":  # refresh the doc's code blocks from the example files
    DOC.write_text(FENCE.sub(lambda m: m.group(0).replace(m.group(2), (REPO / m.group(1)).read_text(), 1), DOC.read_text()))
