"""The ``fluxkiln`` command line.

Exit codes: 0 success, 1 a node failed, 2 invalid recipe or usage, 130
interrupted.  ``--help`` and ``validate`` never import torch: heavy modules are
imported by nodes only when they run.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe .toml file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set nodes.images.seed=7 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .launch import add_launch_args

    parser = argparse.ArgumentParser(prog="fluxkiln", description="Run TOML recipes for FLUX.1 image generation "
                                     "and LoRA fine-tuning.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe")
    _add_recipe_args(p)
    p.add_argument("--only", action="append", default=[], metavar="NODE", help="run only NODE and its ancestors")
    p.add_argument("--force", action="append", nargs="?", const="*", metavar="NODE",
                   help="rerun everything, or NODE and its dependants (anywhere on the line; a forced "
                        "train_lora trains from scratch unless it has resume = \"always\")")
    p.add_argument("--json", action="store_true", help="print one JSON object per event on stdout")
    p.add_argument("--output", metavar="DIR", help="run folder (default ./runs/<recipe name>)")
    p.add_argument("--explain", action="store_true", help="print the plan with reasons, run nothing")
    add_launch_args(p)

    p = sub.add_parser("watch", help="run, then rerun what changed on every save")
    _add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per event on stdout")
    p.add_argument("--output", metavar="DIR")
    p.add_argument("--debounce", type=float, default=0.3, metavar="SECONDS", help="quiet time before a rerun")
    add_launch_args(p)

    p = sub.add_parser("validate", help="check a recipe; exit 0 valid, 2 invalid")
    _add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print problems as JSON")

    p = sub.add_parser("graph", help="print the recipe's graph")
    _add_recipe_args(p)
    p.add_argument("--format", choices=("text", "mermaid", "dot"), default="text")

    p = sub.add_parser("nodes", help="list node types, or document one")
    p.add_argument("type", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="Markdown reference of the built-in node types")

    p = sub.add_parser("plugins", help="list plugins, their versions, node types, load time and errors")
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 if any plugin failed to load (for CI)")

    p = sub.add_parser("cache", help="show or prune the result cache")
    p.add_argument("action", nargs="?", choices=("list", "prune", "path"), default="list")
    p.add_argument("--older-than", metavar="AGE", help="prune entries unused for AGE (e.g. 7d, 12h, 30m)")
    p.add_argument("--max-size", metavar="SIZE", help="prune oldest-used entries until under SIZE (e.g. 10G, 500M)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="print the recipe and settings embedded in an image", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("new-plugin", help="write a ready-to-install plugin skeleton")
    p.add_argument("name", help="plugin name, e.g. fluxkiln-upscale")
    p.add_argument("--dir", default=".", help="parent folder (default: current)")

    for name, cmd in sorted(_registry().commands.items()):  # commands added by plugins (the TUI's too)
        suffix = "" if cmd.plugin.startswith("fluxkiln.") else f" [{cmd.plugin}]"
        sub.add_parser(name, help=f"{cmd.help}{suffix}", add_help=False)

    return parser


def _registry() -> Any:
    from .registry import Registry

    return Registry.load()


def _print_problems(problems: list[Any], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps([p.to_dict() for p in problems], indent=1))
        return
    for p in problems:
        print(p.format(), file=sys.stderr)
    print(f"{len(problems)} problem(s) found", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from .errors import RecipeInvalid
    from .validate import check_file

    try:
        checked = check_file(args.recipe, _registry(), args.overrides)
    except RecipeInvalid as exc:
        _print_problems(exc.problems, args.json)
        return EXIT_INVALID
    if args.json:
        print("[]")
    else:
        order = [n for n in checked.order if n in checked.recipe.nodes]
        cells = sum(len(c) for c in checked.sweeps.values())
        swept = f", {len(checked.sweeps)} swept into {cells} cells" if checked.sweeps else ""
        print(f"{args.recipe}: valid ({len(order)} nodes{swept}: {' -> '.join(order)})")
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    from . import graph as graphmod
    from .errors import RecipeInvalid
    from .validate import check_file

    try:
        checked = check_file(args.recipe, _registry(), args.overrides)
    except RecipeInvalid as exc:
        _print_problems(exc.problems)
        return EXIT_INVALID
    render = {"text": graphmod.render_text, "mermaid": graphmod.render_mermaid, "dot": graphmod.render_dot}
    print(render[args.format](checked.graph))
    return EXIT_OK


_VALUED = ("--set", "--only", "--output")  # options of `run` that take a value


def normalize_force(argv: list[str]) -> list[str]:
    """Let ``--force`` and ``--force NODE`` stand anywhere in ``run``'s arguments.

    ``--force`` takes an optional node id, so ``run --force recipe.toml`` would read the recipe as a node.
    A word after ``--force`` is taken as the recipe (and ``--force`` as "everything") when it looks like a
    file (``.toml``, a path separator, an existing file) or when no other word could be the recipe.
    """
    words = [i for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in _VALUED)]
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--force" and nxt is not None and not nxt.startswith("-"):
            others = [w for w in words if w not in (i + 1,)]
            looks_like_file = nxt.endswith(".toml") or "/" in nxt or "\\" in nxt or Path(nxt).is_file()
            if looks_like_file or not others:
                out += ["--force=*", nxt]
            else:
                out.append(f"--force={nxt}")
            i += 2
            continue
        out.append("--force=*" if a == "--force" else a)
        i += 1
    return out


def _force_args(force: list[str] | None) -> tuple[list[str] | None, bool]:
    if not force:
        return None, False
    return [f for f in force if f != "*"] or None, "*" in force


def cmd_run(args: argparse.Namespace) -> int:
    from .cli_output import ConsoleObserver, JsonObserver
    from .errors import RecipeInvalid
    from .launch import make_engine

    engine = make_engine(_registry())
    force, force_all = _force_args(args.force)
    try:
        if args.explain:
            plan = engine.plan(args.recipe, overrides=args.overrides, only=args.only or None, force=force,
                               force_all=force_all, output=args.output)
            _print_plan(plan, args.json)
            return EXIT_OK
        checked = engine.check(args.recipe, args.overrides)
    except RecipeInvalid as exc:
        _print_problems(exc.problems)
        return EXIT_INVALID
    observer = JsonObserver() if args.json else ConsoleObserver()
    from .launch import GATE, SigintGate

    def stop() -> None:
        print("\nfluxkiln: stopping at the next safe point (Ctrl-C again to abort now)", file=sys.stderr)
        engine.cancel()

    # one of several processes: the gate installed at start-up (it kept a Ctrl-C that came before now)
    gate = GATE if signal.getsignal(signal.SIGINT) is GATE else SigintGate()
    old = signal.signal(signal.SIGINT, gate)
    gate.bind(stop)
    try:
        result = engine.run(checked, only=args.only or None, force=force, force_all=force_all, output=args.output,
                            observers=[observer])
    except RecipeInvalid as exc:
        _print_problems(exc.problems)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, old)
    return {"ok": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_INTERRUPTED}[result.status]


def _print_plan(plan: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan.to_dict(), indent=1))
        return
    for nid, np_ in plan.nodes.items():
        what = f"run    ({np_.reason})" if np_.action == "run" else f"cached ({np_.source})"
        print(f"{nid:<20} {np_.type:<16} {what}")


def cmd_nodes(args: argparse.Namespace) -> int:
    from . import docs

    reg = _registry()
    if args.markdown:
        print(docs.reference_markdown(reg.node_types))
        return EXIT_OK
    if args.type:
        nt = reg.node_types.get(args.type)
        if nt is None:
            import difflib

            close = difflib.get_close_matches(args.type, list(reg.node_types), n=3)
            print(f"unknown node type '{args.type}'" + (f"; did you mean {', '.join(close)}?" if close else ""),
                  file=sys.stderr)
            return EXIT_INVALID
        if args.json:
            print(json.dumps(docs.node_to_dict(nt), indent=1, default=str))
        else:
            from rich.console import Console

            Console().print(docs.node_rich(nt))
        return EXIT_OK
    if args.json:
        print(json.dumps([docs.node_to_dict(nt) for nt in reg.node_types.values()], indent=1, default=str))
        return EXIT_OK
    for name in sorted(reg.node_types):
        nt = reg.node_types[name]
        print(f"{name:<18} {nt.summary}  [{nt.plugin}]")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = _registry()
    rows = [{"name": p.name, "source": p.source, "distribution": p.distribution, "version": p.version,
             "load_ms": round(p.load_time * 1000, 1), "node_types": p.node_types, "port_types": p.port_types,
             "commands": p.commands, "error": p.error} for p in reg.plugins.values()]
    failed = [r["name"] for r in rows if r["error"]]
    code = EXIT_FAILED if args.check and failed else EXIT_OK
    if args.json:
        print(json.dumps(rows, indent=1))
        return code
    from .cli_output import plugins_table

    plugins_table(rows)
    if args.check and failed:
        print(f"fluxkiln plugins --check: {len(failed)} plugin(s) failed to load: {', '.join(failed)}",
              file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["inspect"]:  # its own parser: options may come before the image
        from .inspect_cmd import main as inspect_main

        return inspect_main(argv[1:])
    from .commands import BUILTIN_COMMANDS

    if argv and not argv[0].startswith("-") and argv[0] not in BUILTIN_COMMANDS:
        commands = _registry().commands
        if argv[0] in commands:  # a command added by a plugin (register_commands hook), the TUI's too
            return commands[argv[0]](argv[1:])
    if argv[:1] == ["run"]:
        argv = ["run", *normalize_force(argv[1:])]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"fluxkiln {version('fluxkiln')}")
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_INVALID
    handlers = {"run": cmd_run, "validate": cmd_validate, "graph": cmd_graph, "nodes": cmd_nodes,
                "plugins": cmd_plugins}
    from . import cli_extra

    if args.command in ("run", "watch"):  # --gpus N, or one rank of a launched world
        from .launch import route

        return route(args, argv, handlers.get(args.command, cli_extra.dispatch))
    if args.command in handlers:
        return handlers[args.command](args)
    return cli_extra.dispatch(args)


def fast_exit(code: int, argv: Sequence[str]) -> None:
    """After ``fluxkiln run`` in a process that imported torch, end it without the interpreter's teardown, which
    takes seconds once torch, diffusers and a loaded model are in memory (and adds nothing: every file is
    written and closed by then).  Output is flushed and logging shut down first; ``atexit`` handlers do not run.
    Not for several processes (``--gpus``, torchrun's ``RANK``) or with W&B or coverage loaded (they write at exit);
    ``FLUXKILN_FAST_EXIT=0`` turns it off.  Returns when it does not apply."""
    import os

    from .launch import exit_now, writes_at_exit

    if argv[:1] != ["run"] or "torch" not in sys.modules or "--gpus" in argv:
        return
    if writes_at_exit():
        return
    if os.environ.get("FLUXKILN_FAST_EXIT", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return
    exit_now(code)


def entry() -> None:
    """Console-script entry point: exit with main()'s code; a closed pipe (``| head``) is not an error."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    fast_exit(code if isinstance(code, int) else 1, sys.argv[1:])
    sys.exit(code)


if __name__ == "__main__":
    entry()
