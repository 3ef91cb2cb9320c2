"""``metaflow-sandbox``: inspect backends, run a command in a sandbox, find and remove leftover sandboxes and prepared environments.

Stdlib argparse only: the core stays free of Metaflow (and of its vendored click).
Exit codes: the command's own for ``exec``; 2 for any sandbox/backend error (message + Fix line);
``doctor`` exits 1 when the local backend would run without isolation.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any, NoReturn, Sequence

from . import parse
from .cli_environments import add_parsers as add_environment_parsers
from .errors import SandboxError
from .model import MARKER_LABEL, Bind, Resources, SandboxSpec
from .plugins import available_backends, describe_backends
from .session import Backend
from .signals import Terminated, sigterm_raises

#: Longest --timeout / --ttl accepted: 30 days (a backend's own cap may be lower).
MAX_SECONDS = 30 * 86400.0


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    return dict(parse.key_value(item, what) for item in values or ())


def _options(values: Sequence[str] | None) -> dict[str, str]:
    """--option KEY=VALUE: keys as the METAFLOW_SANDBOX_<BACKEND>_<KEY> settings spell them (lower case)."""
    out = {}
    for key, value in _pairs(values, "--option").items():
        out[parse.env_name(key, "--option key").lower()] = value
    return out


def backend_options(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Options from METAFLOW_SANDBOX_<NAME>_<KEY> env vars (as the Metaflow layer gathers them), then --option."""
    prefix = "METAFLOW_SANDBOX_%s_" % name.upper().replace("-", "_")
    opts = {k[len(prefix) :].lower(): v for k, v in os.environ.items() if k.startswith(prefix)}
    opts.update(extra or {})
    return opts


def _bind(text: str) -> Bind:
    """SRC[:DST][:ro]: SRC must exist on this machine, DST is an absolute path inside the sandbox."""
    parts = text.split(":")
    read_only = len(parts) > 1 and parts[-1] in ("ro", "rw") and parts.pop() == "ro"
    fix = "write it as --bind SRC[:DST][:ro] with an existing SRC and an absolute DST, e.g. --bind ./data:/data:ro"
    if not parts[0] or len(parts) > 2:
        raise parse.InvalidInputError("--bind", text, "SRC[:DST][:ro]", fix)
    source = os.path.abspath(parts[0])
    if not os.path.exists(source):
        raise parse.InvalidInputError("--bind", text, "a directory or file that exists (%s does not)" % source, fix)
    dest = parts[1] if len(parts) > 1 else None
    if dest is not None and (not dest.startswith("/") or ".." in dest.split("/")):
        raise parse.InvalidInputError("--bind", text, "an absolute destination without '..'", fix)
    return Bind(source, dest, read_only)


def cmd_backends(args: argparse.Namespace) -> int:
    infos = describe_backends({name: backend_options(name) for name in available_backends()})
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    rows = [("NAME", "DISTRIBUTION", "VERSION", "HOOKS", "LOADS", "CONFIGURED", "ERROR")]
    for i in infos:
        hooks = ",".join(h.replace("sandbox_", "") for h in i.hooks) or "-"
        configured = "unknown" if i.configured is None else ("yes" if i.configured else "no")
        rows.append((i.name, i.distribution, i.version, hooks, "yes" if i.loads else "no", configured, i.error or ""))
    _table(rows)
    return 0


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[c].splitlines()[0] if r[c] else "") for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        first, *rest = (r[-1] or "").splitlines() or [""]
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + first)
        for line in rest:
            print(" " * (sum(widths) + 2 * len(widths)) + line)


def cmd_doctor(args: argparse.Namespace) -> int:
    """What the local backend can do on this machine, then the backends table. Exit 1 if isolation is off."""
    from .backends._local import isolation, limits

    status = isolation.status(backend_options("local"))
    cgroup = limits.memory_cgroup_parent()
    report = {
        "local": {
            "isolation": "bubblewrap" if status["works"] and status["requested"] != "none" else "NONE",
            **status,
            "memory_limit": "cgroup v%d under %s" % cgroup if cgroup else "RLIMIT_AS (no writable memory cgroup)",
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        }
    }
    if args.json:
        report["backends"] = [i.as_dict() for i in describe_backends()]  # type: ignore[assignment]
        print(json.dumps(report, indent=2))
    else:
        for key, value in report["local"].items():
            print("local.%-12s %s" % (key, value))
        if not status["works"]:
            print("  Fix: %s" % isolation.FIX)
        print()
        cmd_backends(argparse.Namespace(json=False))
    return 0 if report["local"]["isolation"] == "bubblewrap" else 1


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SandboxError("exec needs a command to run", hint="put it after --, e.g. metaflow-sandbox exec --backend local -- echo hi")
    spec = _exec_spec(args)  # every option parsed before anything is created
    name = parse.text(args.backend, "--backend", "--backend local")
    backend = Backend(name, options=backend_options(name, _options(args.option)))
    backend.check_config()  # credentials and the backend's own settings, before anything is created

    def out(stream: Any) -> Any:
        def write(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write

    sandbox = None
    with sigterm_raises():
        try:
            sandbox = backend.create(spec)
            if args.cwd:
                _check_cwd(sandbox, args.cwd)
            result = sandbox.exec(command, cwd=args.cwd, timeout=spec_timeout(args), on_stdout=out(sys.stdout), on_stderr=out(sys.stderr))
            return result.exit_code
        except KeyboardInterrupt:
            print("\nmetaflow-sandbox: interrupted; destroying the sandbox", file=sys.stderr)
            return 130
        except Terminated:
            print("metaflow-sandbox: terminated; destroying the sandbox", file=sys.stderr)
            return 143
        finally:
            if sandbox is not None:
                sandbox.destroy()


def spec_timeout(args: argparse.Namespace) -> float | None:
    return parse.seconds(args.timeout, "--timeout", maximum=MAX_SECONDS) if args.timeout is not None else None


def _exec_spec(args: argparse.Namespace) -> SandboxSpec:
    """The sandbox `exec` asks for, from strictly parsed options (an error names the option and its fix)."""
    timeout = spec_timeout(args)
    ttl = parse.seconds(args.ttl, "--ttl", maximum=MAX_SECONDS) if args.ttl is not None else None
    if ttl is not None and timeout is not None and ttl < timeout:
        raise parse.InvalidInputError(
            "--ttl", args.ttl, "at least --timeout (%gs): the sandbox would end first" % timeout, "raise --ttl or lower --timeout"
        )
    cpu = memory = None
    if args.cpu is not None:
        cpu = parse.positive_number(args.cpu, "--cpu", hint="give a number of CPUs, e.g. --cpu 2")
    if args.memory is not None:
        memory = parse.positive_number(args.memory, "--memory", integer=True, hint="give megabytes, e.g. --memory 2048")
    env = {parse.env_name(k, "--env name"): v for k, v in _pairs(args.env, "--env").items()}
    labels = {MARKER_LABEL: "1", "metaflow-sandbox.source": "cli", "metaflow.user": _user()}
    labels.update(parse.labels(args.label or (), "--label"))
    return SandboxSpec(
        resources=Resources(cpu=cpu, memory_mb=int(memory) if memory is not None else None),
        env=parse.environment(env, "--env"),
        labels=labels,
        ttl_seconds=ttl if ttl else (timeout + 60 if timeout else None),
        network=not args.no_network,
        binds=tuple(_bind(b) for b in args.bind or ()),
        image=parse.text(args.image, "--image", "--image python:3.12") if args.image is not None else None,
    )


def _check_cwd(sandbox: Any, cwd: str) -> None:
    """A missing --cwd is the caller's mistake: say so, instead of the backend's own chdir error."""
    code, _, _ = sandbox.run(["sh", "-c", 'test -d "$1"', "sh", cwd])
    if code != 0:
        raise parse.InvalidInputError(
            "--cwd",
            cwd,
            "a directory that exists in the sandbox (relative paths start at its work dir %s)" % sandbox.handle.workdir,
            "create it first (e.g. -- sh -c 'mkdir -p DIR && cd DIR && ...') or drop --cwd",
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid())


def _listed(args: argparse.Namespace) -> list[tuple[Backend, Any]]:
    """Sandboxes carrying the marker label (and --label ones). Named backends must work; when
    sweeping all backends, one that is not installed right or not configured is skipped, said on stderr."""
    labels = {MARKER_LABEL: "1", **_pairs(args.label, "--label")}
    found = []
    for name in args.backend or list(available_backends()):
        try:
            backend = Backend(name, options=backend_options(name))
            if not backend.implements("sandbox_list") and not args.backend:
                continue
            backend.check_config()
            found += [(backend, sb) for sb in backend.list(labels)]  # list() names the fix if unsupported
        except SandboxError as err:
            if args.backend:
                raise
            print("metaflow-sandbox: skipping backend '%s': %s" % (name, str(err).splitlines()[0]), file=sys.stderr)
    return found


def cmd_list(args: argparse.Namespace) -> int:
    found = _listed(args)
    if args.json:
        print(json.dumps([{"backend": b.name, "id": s.id, "labels": dict(s.handle.labels)} for b, s in found], indent=2))
        return 0
    rows = [("BACKEND", "ID", "LABELS")]
    rows += [(b.name, s.id, ",".join("%s=%s" % kv for kv in sorted(s.handle.labels.items()))) for b, s in found]
    _table(rows)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    found = _listed(args)
    for backend, sandbox in found:
        if args.dry_run:
            print("would destroy %s sandbox %s" % (backend.name, sandbox.id))
        else:
            gone = sandbox.destroy()
            print("%s %s sandbox %s" % ("destroyed" if gone else "already gone:", backend.name, sandbox.id))
    if not found:
        print("no sandboxes carry the %s label%s" % (MARKER_LABEL, " and the given labels" if args.label else ""))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a Fix line under every usage error (exit code 2, no traceback)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, "%s: error: %s\n  Fix: see `%s --help` for the options\n" % (self.prog, message, self.prog))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metaflow-sandbox", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("backends", help="list installed backends, whether they load and are configured")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("doctor", help="check the local backend's isolation and limits, and every backend")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("exec", help="run a command in a new sandbox, streaming its output; exits with its code")
    p.add_argument("--backend", required=True)
    p.add_argument("--cpu", metavar="N")
    p.add_argument("--memory", metavar="MB")
    p.add_argument("--no-network", action="store_true")
    p.add_argument("--timeout", metavar="SECONDS", help="e.g. 90, 15m, 2h")
    p.add_argument("--ttl", metavar="SECONDS", help="sandbox lifetime (default: timeout + 60s)")
    p.add_argument("--env", action="append", metavar="K=V")
    p.add_argument("--label", action="append", metavar="K=V")
    p.add_argument("--option", action="append", metavar="K=V", help="backend option (api_key, template, ...)")
    p.add_argument("--bind", action="append", metavar="SRC[:DST][:ro]")
    p.add_argument("--cwd")
    p.add_argument("--image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)

    for name, func, helptext in (
        ("list", cmd_list, "list sandboxes we created (marker label), optionally filtered by labels"),
        ("kill", cmd_kill, "destroy sandboxes we created that match the labels"),
        ("gc", cmd_kill, "destroy every sandbox we created (all backends that can list, unless --backend)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--backend", action="append", required=name == "kill")
        p.add_argument("--label", action="append", metavar="K=V")
        if name == "list":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--dry-run", action="store_true")
        p.set_defaults(func=func)
    add_environment_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SandboxError as err:
        print("metaflow-sandbox: %s" % err, file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
