"""The less common CLI commands: watch, cache, inspect, new-plugin."""

from __future__ import annotations

import argparse
import json
import re
import sys

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise ValueError(f"bad age {text!r}: use e.g. 30m, 12h, 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def cmd_cache(args: argparse.Namespace) -> int:
    from . import cacheadmin as admin
    from . import paths
    from .cache import DiskCache

    cache = DiskCache(paths.cache_root())
    if args.action == "path":
        print(cache.root)
        return 0
    if args.action == "prune":
        return _prune(cache, args)
    entries = admin.scan(cache)
    summary = admin.summary(entries)
    budget, _warning = admin.budget_from_env()
    others = admin.other_folders(cache)
    if args.json:
        print(json.dumps({"root": str(cache.root), "budget": budget, **summary,
                          "entries": [e.to_json() for e in entries], "other_folders": others}, indent=1))
        return 0
    limit = admin.human(budget) if budget is not None else "none"
    print(f"cache {cache.root}: {len(entries)} entries, {admin.human(summary['total'])} "
          f"(budget {limit}, set with {admin.BUDGET_ENV})")
    for title, key in (("by node type", "by_type"), ("by recipe", "by_recipe")):
        rows = sorted(summary[key].items(), key=lambda kv: -kv[1]["bytes"])
        if rows:
            print(f"{title}:")
        for name, row in rows:
            print(f"  {name:<24} {row['entries']:>5} entr{'y' if row['entries'] == 1 else 'ies'} "
                  f"{admin.human(row['bytes']):>10}")
    if entries:
        print("entries, most recently used first (bytes shared between entries count once):")
    for e in sorted(entries, key=lambda e: -e.used):
        print(f"  {e.fingerprint[:16]}  {e.type:<14} {e.recipe}/{e.node:<16} {admin.human(e.own):>9}")
    if others:
        print("other folders (compiled code, training state, built-in models; not in the budget, never pruned: "
              "delete one to reclaim its space):")
    for name, size in others.items():
        print(f"  {name + '/':<24} {admin.human(size):>10}")
    return 0


def _prune(cache, args: argparse.Namespace) -> int:
    from . import cacheadmin as admin

    if not args.older_than and not args.max_size:
        print("fluxkiln cache prune: give --older-than AGE and/or --max-size SIZE", file=sys.stderr)
        return 2
    try:
        age = parse_age(args.older_than) if args.older_than else None
        size = admin.parse_size(args.max_size) if args.max_size else None
    except ValueError as exc:
        print(f"fluxkiln cache prune: {exc}", file=sys.stderr)
        return 2
    removed = admin.prune(cache, older_than=age, max_size=size)
    freed = sum(e.own for e in removed)
    print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, freed {admin.human(freed)}")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "cache":
        return cmd_cache(args)
    if cmd == "watch":
        from .watch import watch_main

        return watch_main(args)
    if cmd == "inspect":
        from .inspect_cmd import main as inspect_main

        return inspect_main(args.args)
    if cmd == "new-plugin":
        from .scaffold import new_plugin_main

        return new_plugin_main(args.name, args.dir)
    print(f"fluxkiln: unknown command {cmd}", file=sys.stderr)
    return 2


