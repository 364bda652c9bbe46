"""``fluxkiln inspect IMAGE``: show the provenance embedded in an image and write the recipe that reproduces it.

The metadata comes from a file anyone may have edited, so everything printed is
cleaned of control characters, never interpreted as Rich markup, and cut to a
sane length; the written recipe starts with a reminder to review it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

from .imagemeta import REDACTED, MetadataError, read_raw, parse_payload

MAX_VALUE = 300
MAX_PROMPT = 1000
MAX_PARAMS = 40
MAX_RECIPE_LINES = 200
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``fluxkiln inspect IMAGE [--json] [--recipe] [--write-recipe OUT.toml [--force]]``."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse already printed
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    try:
        text, fmt = read_raw(args.image)
    except FileNotFoundError:
        return _fail(f"no such file: {args.image}", 2)
    except (OSError, SyntaxError, ValueError) as exc:
        return _fail(f"cannot read {args.image} as a png, jpg or webp image: {exc}", 2)
    if text is None:
        return _fail(f"{args.image}: no fluxkiln metadata found (it was not saved by fluxkiln's `save` node, "
                     "or another program removed the metadata)", 1)
    try:
        meta = parse_payload(text)
    except MetadataError as exc:
        return _fail(f"{args.image}: {exc}", 1)
    if args.json:
        print(json.dumps(meta, ensure_ascii=True, indent=2))
    elif not args.write_recipe or args.recipe:
        _print_table(args.image, fmt, meta, show_recipe=args.recipe)
    if args.write_recipe:
        return _write_recipe(args.image, meta, Path(args.write_recipe), args.force, args.full)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fluxkiln inspect",
        description="Show the recipe, node parameters, seed, prompt and model embedded in an image "
                    "saved by fluxkiln, and write the recipe that reproduces it.")
    p.add_argument("image", help="a png, jpg or webp file written by fluxkiln's `save` node")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.add_argument("--recipe", action="store_true", help="also print the embedded recipe text")
    p.add_argument("--write-recipe", metavar="OUT.toml",
                   help="write the recipe that reproduces this image (its seed pinned, one output)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.toml if it exists")
    p.add_argument("--full", action="store_true",
                   help="with --write-recipe: keep every node (default: only what makes and saves this image)")
    return p


def _fail(message: str, code: int) -> int:
    print(f"error: {clean(message, 2000)}", file=sys.stderr)
    return code


# ------------------------------------------------------------------ display
def clean(value: Any, limit: int = MAX_VALUE, *, multiline: bool = False) -> str:
    """Untrusted text made safe to print: control characters shown escaped, length capped."""
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    out = []
    for ch in s[: limit + 1]:
        if ch == "\n" and multiline:
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    text = "".join(out)
    return text if len(s) <= limit else text[:limit] + f"... ({len(s)} characters)"


def _rows(path: str, fmt: str, meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("File", clean(path)), ("Format", clean(fmt)),
            ("fluxkiln", clean(meta.get("fluxkiln_version", "?")))]
    recipe = meta.get("recipe_name")
    if recipe is not None:
        rows.append(("Recipe", clean(recipe) + (f"  ({clean(meta['recipe_file'])})" if meta.get("recipe_file") else "")))
    if meta.get("node") is not None:
        kind = f" ({clean(meta['node_type'])})" if meta.get("node_type") else ""
        rows.append(("Node", clean(meta["node"]) + kind))
    for key, label, limit in (("model", "Model", MAX_VALUE), ("seed", "Seed", 40), ("index", "Index", 40),
                              ("prompt", "Prompt", MAX_PROMPT), ("saved_by", "Saved by", MAX_VALUE)):
        if meta.get(key) is not None:
            rows.append((label, clean(meta[key], limit)))
    params = meta.get("params")
    if isinstance(params, dict) and params:
        items = [f"{clean(k, 60)} = {clean(v)}" for k, v in list(params.items())[:MAX_PARAMS]]
        if len(params) > MAX_PARAMS:
            items.append(f"... ({len(params) - MAX_PARAMS} more)")
        rows.append(("Parameters", "\n".join(items)))
    for key, label in (("flags", "Flags"), ("overrides", "Overrides"), ("meta", "Other"), ("omitted", "Omitted")):
        if meta.get(key):
            rows.append((label, clean(meta[key], MAX_VALUE)))
    text = meta.get("recipe")
    if isinstance(text, str):
        rows.append(("Recipe text", f"{len(text.splitlines())} lines (--recipe prints it, "
                                    "--write-recipe OUT.toml writes a reproducing recipe)"))
    return rows


def _print_table(path: str, fmt: str, meta: dict[str, Any], *, show_recipe: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=False)
    table = Table(title=Text("fluxkiln metadata"), show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in _rows(path, fmt, meta):
        table.add_row(Text(label), Text(value))  # Text(): never parsed as markup
    console.print(table)
    if show_recipe and isinstance(meta.get("recipe"), str):
        lines = meta["recipe"].splitlines()
        body = "\n".join(clean(line, MAX_VALUE) for line in lines[:MAX_RECIPE_LINES])
        if len(lines) > MAX_RECIPE_LINES:
            body += f"\n# ... ({len(lines) - MAX_RECIPE_LINES} more lines; --write-recipe writes all of it)"
        console.print(Text(body))
    console.print(Text("Note: this metadata comes from the file and may have been edited by anyone.", style="dim"))


# ------------------------------------------------------------------ reproducing recipe
def reproduce_recipe(meta: dict[str, Any], image_name: str = "the image", *,
                     full: bool = False) -> tuple[str, list[str]]:
    """The TOML text of a recipe that makes this image again, and notes on what was changed.

    Applies the recorded ``--set`` overrides, pins the producing node's
    ``seed`` to this image's own seed (image *i* of a batch used seed+i) with
    ``num_outputs = 1``, keeps only the nodes that make and save this image
    (all with ``full``), and renames the recipe so its run folder does not
    overwrite the original run's files.
    """
    import tomli_w

    text = meta.get("recipe")
    if not isinstance(text, str) or not text.strip():
        why = " (it was too large to embed)" if "recipe" in (meta.get("omitted") or []) else ""
        raise MetadataError(f"the metadata holds no recipe text{why}; cannot write a recipe")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MetadataError(f"the embedded recipe is not valid TOML: {exc}") from exc
    notes = _drop_redacted(data)
    notes += _apply_overrides(data, meta.get("overrides") or [])
    notes += _pin(data, meta)
    if not full:
        notes += _prune(data, meta)
    head = data.setdefault("recipe", {})
    seed = meta.get("seed")
    if isinstance(head, dict) and isinstance(head.get("name"), str) and RECIPE_NAME.fullmatch(head["name"]):
        suffix = f"-seed{seed}" if _is_int(seed) else "-repro"
        head["name"] = head["name"] + suffix
        notes.append(f"renamed the recipe to '{head['name']}' so its run folder is new")
    for key in ("output_dir", "plugins"):
        if isinstance(head, dict) and key in head:
            notes.append(f"review [recipe] {key} = {clean(head[key], 200)} before running")
    header = (f"# Reproduces {clean(image_name, 200)}: written by `fluxkiln inspect` from the image's metadata.\n"
              "# The text came from an image file: review it before running.\n")
    body = tomli_w.dumps(data)
    return header + body, notes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _drop_redacted(data: dict[str, Any]) -> list[str]:
    """Remove secret keys whose values were redacted: the node then reads its default variable."""
    notes = []
    nodes = data.get("nodes") if isinstance(data.get("nodes"), dict) else {}
    for nid, table in nodes.items():
        if not isinstance(table, dict):
            continue
        for key in [k for k, v in table.items() if v == REDACTED]:
            del table[key]
            notes.append(f"removed redacted secret nodes.{clean(nid, 100)}.{clean(key, 100)}; "
                         'give it as "$ENV_NAME" or set the environment variable the node reads')
    return notes


def _apply_overrides(data: dict[str, Any], overrides: list[Any]) -> list[str]:
    from .recipe import parse_override

    notes = []
    for item in overrides:
        item = str(item)
        try:
            parts, value = parse_override(item)
        except ValueError as exc:
            notes.append(f"skipped override: {clean(exc, 200)}")
            continue
        if value == REDACTED:
            notes.append(f"left out secret override {clean(item.split('=', 1)[0], 200)}; give it with --set")
            continue
        target: Any = data
        for p in parts[:-1]:
            target = target.setdefault(p, {}) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            notes.append(f"skipped override {clean(item, 200)}: not a table")
            continue
        target[parts[-1]] = value
        notes.append(f"applied --set {clean(item, 200)}")
    return notes


def _pin(data: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    nodes = data.get("nodes") if isinstance(data.get("nodes"), dict) else {}
    node_id = meta.get("node") if isinstance(meta.get("node"), str) else None
    table = nodes.get(node_id) if node_id else None
    if meta.get("node_type") == "grid" or (isinstance(table, dict) and table.get("type") == "grid"):
        return ["the image is a grid of several images: the recipe is written unchanged"]
    notes: list[str] = []
    if not isinstance(table, dict):
        node_id, table, notes = _pin_cell(nodes, meta)
    if not isinstance(table, dict):
        samplers = [k for k, v in nodes.items() if isinstance(v, dict) and v.get("type") == "sample"]
        if len(samplers) != 1:
            return ["cannot tell which node made the image: seed not pinned, recipe otherwise unchanged"]
        node_id = samplers[0]
    table = nodes[node_id]
    seed = meta.get("seed")
    if _is_int(seed):
        table["seed"] = seed
        notes.append(f"pinned nodes.{clean(node_id, 100)}.seed = {seed} (this image's own seed)")
    else:
        notes.append("the metadata has no seed: the recipe may make a different image")
    params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    if "num_outputs" in table or "num_outputs" in params or table.get("type") == "sample":
        table["num_outputs"] = 1
        notes.append(f"set nodes.{clean(node_id, 100)}.num_outputs = 1")
    return notes


def _pin_cell(nodes: dict[str, Any], meta: dict[str, Any]) -> tuple[str | None, Any, list[str]]:
    """An image from a sweep cell: the swept node with the cell's values in place of its sweep table."""
    params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    record = params.get("sweep")
    if not isinstance(record, dict) or not isinstance(record.get("set"), dict):
        return None, None, []
    node_id = record.get("node")
    table = nodes.get(node_id) if isinstance(node_id, str) else None
    if not isinstance(table, dict):
        return None, None, []
    table.pop("sweep", None)
    table.update(record["set"])
    cell = ", ".join(f"{clean(k, 60)} = {clean(v, 80)}" for k, v in record["set"].items())
    return node_id, table, [f"replaced the sweep of nodes.{clean(node_id, 100)} by this image's cell: {cell}"]


_VAR = re.compile(r"\$\{([^}]*)\}")


def _links(value: Any, variables: dict[str, Any]) -> list[str]:
    """Node ids a recipe value links to (``"@id"``, ``"@id.port"``, also through ``${var}``)."""
    if isinstance(value, list):
        return [n for v in value for n in _links(v, variables)]
    if isinstance(value, dict):  # a sweep table
        return [n for v in value.values() for n in _links(v, variables)]
    if not isinstance(value, str):
        return []
    value = _VAR.sub(lambda m: str(variables.get(m.group(1), m.group(0))), value)
    if value.startswith("@") and not value.startswith("@@"):
        return [value[1:].split(".", 1)[0]]
    return []


def _prune(data: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Keep only the node that saved the image (or made it) and everything it depends on."""
    nodes = data.get("nodes") if isinstance(data.get("nodes"), dict) else {}
    variables = data.get("vars") if isinstance(data.get("vars"), dict) else {}
    start = next((n for n in (meta.get("saved_by"), meta.get("node")) if isinstance(n, str) and n in nodes), None)
    if start is None:
        return []
    keep, todo = set(), [start]
    while todo:
        nid = todo.pop()
        if nid in keep or not isinstance(nodes.get(nid), dict):
            continue
        keep.add(nid)
        todo.extend(n for v in nodes[nid].values() for n in _links(v, variables))
    dropped = [n for n in nodes if n not in keep]
    for n in dropped:
        del nodes[n]
    if not dropped:
        return []
    return [f"kept the {len(keep)} nodes that make and save this image, left out {len(dropped)} "
            "(--full keeps them)"]


def _write_recipe(image: str, meta: dict[str, Any], out: Path, force: bool, full: bool) -> int:
    if out.exists() and not force:
        return _fail(f"{out} exists; pass --force to overwrite it", 2)
    try:
        text, notes = reproduce_recipe(meta, Path(image).name, full=full)
    except MetadataError as exc:
        return _fail(str(exc), 1)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return _fail(f"cannot write {out}: {exc}", 1)
    for note in notes:
        print(f"  {note}", file=sys.stderr)
    print(f"wrote {out} (paths in it are relative to its folder; run: fluxkiln run {out})", file=sys.stderr)
    return 0
