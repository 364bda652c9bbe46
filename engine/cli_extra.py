"""The less common CLI commands: watch, cache, inspect, new-plugin."""

from __future__ import annotations

import argparse
import json
import re
import sys

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise ValueError(f"bad age {text!r}: use e.g. 30m, 12h, 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", (text or "").lower())
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 500M, 10G")
    return int(float(m.group(1)) * _SIZES[m.group(2)])


def cmd_cache(args: argparse.Namespace) -> int:
    from . import paths
    from .cache import DiskCache

    cache = DiskCache(paths.cache_root())
    if args.action == "path":
        print(cache.root)
        return 0
    if args.action == "prune":
        if not args.older_than and not args.max_size:
            print("fluxkiln cache prune: give --older-than AGE and/or --max-size SIZE", file=sys.stderr)
            return 2
        try:
            age = parse_age(args.older_than) if args.older_than else None
            size = parse_size(args.max_size) if args.max_size else None
        except ValueError as exc:
            print(f"fluxkiln cache prune: {exc}", file=sys.stderr)
            return 2
        removed = cache.prune(older_than=age, max_size=size)
        freed = sum(e["size"] for e in removed)
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, freed {_human(freed)}")
        return 0
    entries = cache.entries()
    if args.json:
        print(json.dumps({"root": str(cache.root), "entries": entries}, indent=1))
        return 0
    total = sum(e["size"] for e in entries)
    print(f"cache {cache.root}: {len(entries)} entries, {_human(total)}")
    for e in sorted(entries, key=lambda e: -e["used"]):
        print(f"  {e['fingerprint'][:16]}  {e['type']:<14} {e['recipe']}/{e['node']:<16} {_human(e['size']):>9}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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


