"""``metaflow-sandbox prepare`` and ``metaflow-sandbox environments list | rm``: prepared environments.

``prepare`` runs the flow's own ``python FLOW.py sandbox prepare`` (the Metaflow layer works out each
step's environment, the same code path as a run); ``environments`` asks every backend (or ``--backend``)
for the environments carrying our label and removes them by ref, age or all at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any, Optional

from . import parse
from .errors import SandboxError
from .model import ENVIRONMENT_LABEL, PreparedEnvironment
from .plugins import available_backends
from .session import Backend


def cmd_prepare(args: argparse.Namespace) -> int:
    flow = os.path.abspath(args.flow)
    if not os.path.isfile(flow):
        raise parse.InvalidInputError("FLOW", args.flow, "a flow file", "give the path of the flow's .py file")
    argv = [sys.executable, flow]
    if args.datastore:
        argv.append("--datastore=%s" % args.datastore)
    argv += ["sandbox", "prepare"] + (["--backend", args.backend] if args.backend else [])
    return subprocess.call(argv, cwd=os.path.dirname(flow))


def _backends(names: Optional[list[str]]) -> list[Backend]:
    """The named backends (which must work), else every installed one that prepares environments."""
    from .cli import backend_options

    out = []
    for name in names or list(available_backends()):
        try:
            backend = Backend(name, options=backend_options(name))
            if not backend.implements("sandbox_environment_list"):
                if names:
                    backend.environments()  # raises, naming the fix
                continue
            backend.check_config()
            out.append(backend)
        except SandboxError as err:
            if names:
                raise
            print("metaflow-sandbox: skipping backend '%s': %s" % (name, str(err).splitlines()[0]), file=sys.stderr)
    return out


def _ours(backend: Backend) -> list[PreparedEnvironment]:
    return [e for e in backend.environments() if e.labels.get(ENVIRONMENT_LABEL, e.key) == e.key]


def _when(epoch: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if epoch else "-"


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return "%d %s" % (n, unit) if unit == "B" else "%.1f %s" % (n, unit)
        n = n / 1024  # type: ignore[assignment]
    return "-"


def cmd_env_list(args: argparse.Namespace) -> int:
    from .cli import _table

    rows = [("BACKEND", "REF", "KEY", "STATE", "CREATED", "LAST USED", "SIZE")]
    for backend in _backends(args.backend):
        for e in _ours(backend):
            rows.append((backend.name, e.ref, e.key, e.state, _when(e.created_at), _when(e.last_used_at), _size(e.size_bytes)))
    if len(rows) == 1:
        print("no prepared environments")
    else:
        _table(rows)
    return 0


def cmd_env_rm(args: argparse.Namespace) -> int:
    if bool(args.refs) + bool(args.older_than) + bool(args.all) != 1:
        raise parse.InvalidInputError(
            "environments rm", " ".join(args.refs) or "(nothing)", "REF..., --older-than AGE or --all (one of them)", "e.g. --older-than 7d"
        )
    min_age = parse.seconds(args.older_than, "--older-than", hint="e.g. --older-than 7d") if args.older_than else None
    removed = 0
    for backend in _backends(args.backend):
        found = _ours(backend)
        if args.refs:
            chosen = [e for e in found if e.ref in args.refs or e.key in args.refs]
        elif min_age is not None:
            cutoff = time.time() - min_age
            chosen = [e for e in found if (e.last_used_at or e.created_at or 0) < cutoff]
        else:
            chosen = found
        for e in chosen:
            if args.dry_run:
                print("would remove %s environment %s" % (backend.name, e.ref))
                continue
            gone = backend.remove_environment(e.ref)
            removed += gone
            print("%s %s environment %s" % ("removed" if gone else "already gone:", backend.name, e.ref))
    if args.refs and not removed and not args.dry_run:
        print("no prepared environment matches %s" % " ".join(args.refs), file=sys.stderr)
        return 1
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("prepare", help="build (or find) the prepared environment of every sandboxed step of a flow")
    p.add_argument("flow", metavar="FLOW.py")
    p.add_argument("--backend", help="backend for steps that do not name one (default: METAFLOW_SANDBOX_BACKEND or local)")
    p.add_argument("--datastore", help="the flow's datastore (s3, azure, gs, local), as `python FLOW.py --datastore=...`")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("environments", help="list or remove prepared environments (those carrying our label)")
    envs = p.add_subparsers(dest="env_cmd", required=True, parser_class=p.__class__)
    q = envs.add_parser("list", help="list prepared environments: backend, ref, key, state, created, last used, size")
    q.add_argument("--backend", action="append")
    q.set_defaults(func=cmd_env_list)
    q = envs.add_parser("rm", help="remove prepared environments by REF (or key), by age, or all")
    q.add_argument("refs", nargs="*", metavar="REF")
    q.add_argument("--older-than", metavar="AGE", help="not used for this long (e.g. 7d, 12h)")
    q.add_argument("--all", action="store_true")
    q.add_argument("--backend", action="append")
    q.add_argument("--dry-run", action="store_true")
    q.set_defaults(func=cmd_env_rm)
