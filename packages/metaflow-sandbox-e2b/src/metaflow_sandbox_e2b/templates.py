"""E2B sizes sandboxes per template, so a step's cpu/memory picks a pre-built template.

Names are deterministic: ``metaflow-sandbox-<base>-c<cpu>-m<memory MB>`` over a fixed ladder capped
by the plan. Build them once per account with::

    python -m metaflow_sandbox_e2b.templates build [--base IMAGE] [--plan pro] [--dry-run]

A step with neither resources nor image uses E2B's stock ``base`` template (nothing to build).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from typing import Any, Mapping

from metaflow_sandbox import Resources, UnsupportedOptionError

from .settings import NAME, PLANS, Plan, Settings, settings

CPU_LADDER = (1, 2, 4, 8)
MEMORY_LADDER_MB = (1024, 2048, 4096, 8192, 16384)
PREFIX = "metaflow-sandbox"
DEFAULT_BASE = "base"


def base_slug(image: str | None) -> str:
    """``python:3.11-slim`` -> ``python-3-11-slim`` (template names allow [a-z0-9-])."""
    if not image:
        return DEFAULT_BASE
    slug = re.sub(r"[^a-z0-9]+", "-", image.lower().rsplit("/", 1)[-1]).strip("-")
    return slug[:40].strip("-") or DEFAULT_BASE


def template_name(image: str | None, cpu: int, memory_mb: int) -> str:
    return "%s-%s-c%d-m%d" % (PREFIX, base_slug(image), cpu, memory_mb)


def ladder(plan: Plan) -> list[tuple[int, int]]:
    """Every (cpu, memory_mb) class the plan allows, smallest first."""
    return [(c, m) for c in CPU_LADDER if c <= plan.max_cpu for m in MEMORY_LADDER_MB if m <= plan.max_memory_mb]


def largest(plan: Plan) -> tuple[int, int]:
    classes = ladder(plan)
    return max(c for c, _ in classes), max(m for _, m in classes)


def pick_template(resources: Resources, image: str | None, options: Mapping[str, Any]) -> str:
    """The smallest template of the ladder that fits; option ``template`` overrides the mapping."""
    s = settings(options)
    if s.template:
        return s.template
    if resources.cpu is None and resources.memory_mb is None and not image:
        return "base"
    return template_name(image, *fit(resources, s))


def fit(resources: Resources, s: Settings) -> tuple[int, int]:
    """The ladder's smallest (cpu, memory MB) class that holds ``resources``; past the plan, the fix."""
    cpu = resources.cpu or 0
    mem = resources.memory_mb or 0
    for c, m in ladder(s.plan):
        if c >= cpu and m >= mem:
            return c, m
    max_cpu, max_mem = largest(s.plan)
    raise UnsupportedOptionError(
        "backend 'e2b' offers at most %d CPUs and %d MB on the '%s' plan, but cpu=%s memory=%s was requested"
        % (max_cpu, max_mem, s.plan_name, resources.cpu, resources.memory_mb),
        hint="lower @resources(cpu=..., memory=...), set METAFLOW_SANDBOX_E2B_PLAN=pro if your account has it, "
        "or name a custom template with METAFLOW_SANDBOX_E2B_TEMPLATE",
        backend=NAME,
        op="sandbox_create",
    )


#: E2B's default sandbox size (its stock ``base`` template): the class of an environment whose step asks for none.
DEFAULT_CLASS = (2, 512)


def resource_class(resources: Resources, s: Settings) -> tuple[int, int]:
    """(cpu, memory MB) a prepared environment's template is built with: the ladder's smallest class that fits."""
    if resources.cpu is None and resources.memory_mb is None:
        return DEFAULT_CLASS
    return fit(resources, s)


def environment_template_name(env_name: str, cpu: int, memory_mb: int, base_template: str | None = None) -> str:
    """``mfsb-env-<key>[-t<hash of a custom base template>]-c<cpu>-m<memory MB>``: one template per resource class."""
    base = "-t%s" % hashlib.sha256(base_template.encode()).hexdigest()[:8] if base_template else ""
    return "%s%s-c%d-m%d" % (env_name, base, cpu, memory_mb)


def build_plan(image: str | None, plan: Plan) -> list[dict[str, Any]]:
    return [{"name": template_name(image, c, m), "image": image, "cpu_count": c, "memory_mb": m} for c, m in ladder(plan)]


def build(entry: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
    """Build one template in the user's E2B account (needs the cloud and E2B_API_KEY)."""
    from e2b import Template

    from ._client import translated

    s = settings(options)
    tpl = Template().from_image(entry["image"]) if entry["image"] else Template().from_base_image()
    with translated("template build"):
        return Template.build(
            tpl,
            name=entry["name"],
            cpu_count=entry["cpu_count"],
            memory_mb=entry["memory_mb"],
            on_build_logs=lambda log: print("  %s" % log, file=sys.stderr),
            **s.api_params(),
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metaflow_sandbox_e2b.templates", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the template ladder for one base image in your E2B account")
    b.add_argument("--base", default=None, help="base image (default: E2B's base template image)")
    b.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default=None,
        help="cap the ladder (default: METAFLOW_SANDBOX_E2B_PLAN or hobby)",
    )
    b.add_argument("--only", action="append", default=[], metavar="cCPU-mMEM", help="build only these classes, e.g. c4-m8192")
    b.add_argument("--dry-run", action="store_true", help="print the plan; build nothing")
    args = p.parse_args(argv)
    options: dict[str, Any] = {"plan": args.plan} if args.plan else {}
    s = settings(options)
    entries = build_plan(args.base, s.plan)
    if args.only:
        entries = [e for e in entries if "c%d-m%d" % (e["cpu_count"], e["memory_mb"]) in args.only]
    for e in entries:
        print("%s\tcpu=%d\tmemory_mb=%d\tbase=%s" % (e["name"], e["cpu_count"], e["memory_mb"], e["image"] or "e2b base"))
    if args.dry_run:
        print("dry run: %d template(s) for plan '%s'; nothing built" % (len(entries), s.plan_name))
        return 0
    from .settings import require_key

    require_key(s)
    for e in entries:
        info = build(e, options)
        print("built %s (template id %s)" % (e["name"], getattr(info, "template_id", "?")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
