"""The shared conformance kit, run against the E2B backend (real SDK -> emulator -> local sandboxes)."""

from __future__ import annotations

from metaflow_sandbox.testing import BackendConformance


class TestE2BConformance(BackendConformance):
    backend = "e2b"
    required_env = ("E2B_API_KEY",)
