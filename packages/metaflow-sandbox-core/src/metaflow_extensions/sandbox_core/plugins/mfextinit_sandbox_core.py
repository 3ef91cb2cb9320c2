"""Registers the decorators and the `sandbox` CLI. Names are static: the code package carries no
entry points, so `from metaflow import daytona` must work in every process (metaflow-internals 1.4)."""

STEP_DECORATORS_DESC = [
    ("sandbox", ".sandbox_decorator.SandboxDecorator"),
    ("daytona", ".sandbox_decorator.DaytonaDecorator"),
    ("e2b", ".sandbox_decorator.E2BDecorator"),
]
CLIS_DESC = [("sandbox", ".sandbox_cli.cli")]
# Marks `python flow.py sandbox ...` as the TRAMPOLINE phase (Metaflow >= 2.19.23; ignored before).
TRAMPOLINE_CLIS_DESC = [("sandbox", ".sandbox_cli.cli")]
