"""Documentation of node types, generated from their declarations.

Used by ``fluxkiln nodes`` and to generate the node reference page of the
documentation site, ``docs/nodes.md`` (a test keeps it in sync with the
declarations): ``python -m fluxkiln.engine.docs`` rewrites it.
"""

from __future__ import annotations

from typing import Any

from .nodes import REQUIRED, NodeType, ParamSpec
from .ports import describe_port


def default_text(spec: ParamSpec) -> str:
    if spec.required:
        return "required"
    if spec.default is None:
        return "—"
    return repr(spec.default) if isinstance(spec.default, str) else str(spec.default).lower() \
        if isinstance(spec.default, bool) else str(spec.default)


def node_to_dict(nt: NodeType) -> dict[str, Any]:
    return {
        "type": nt.name, "plugin": nt.plugin, "version": nt.version, "doc": nt.doc, "cache": nt.cache,
        "outputs": nt.outputs,
        "keys": [{"name": s.name, "kind": "input" if s.is_input and not s.accepts_literal else
                  ("input or parameter" if s.is_input else "parameter"),
                  "accepts": s.allowed(), "default": None if s.default is REQUIRED else s.default,
                  "required": s.required, "doc": s.doc, "constraints": dict(s.constraints)}
                 for s in nt.params.values()],
    }


def node_markdown(nt: NodeType, heading: str = "###") -> str:
    """A Markdown section for one node type."""
    lines = [f"{heading} `{nt.name}`", "", nt.doc.strip() or "(no documentation)", ""]
    outs = ", ".join(f"`{k}` ({describe_port(v)})" for k, v in nt.outputs.items()) or "none"
    lines += [f"Outputs: {outs}.", "", "| key | accepts | default | description |", "|---|---|---|---|"]
    for s in nt.params.values():
        cells = [f"`{s.name}`", s.allowed(), default_text(s), s.doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def reference_markdown(node_types: dict[str, NodeType], builtin_only: bool = True) -> str:
    """The node reference: every (built-in) node type, sorted by name."""
    parts = []
    for name in sorted(node_types):
        nt = node_types[name]
        if builtin_only and not nt.plugin.startswith("fluxkiln.plugins"):
            continue
        parts.append(node_markdown(nt))
    return "\n".join(parts)


def node_rich(nt: NodeType) -> Any:
    """A Rich renderable describing one node type (``fluxkiln nodes TYPE``)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", expand=False)
    for col in ("key", "kind", "accepts", "default", "description"):
        table.add_column(col, overflow="fold")
    for d in node_to_dict(nt)["keys"]:
        spec = nt.params[d["name"]]
        table.add_row(d["name"], d["kind"], escape(d["accepts"]), escape(default_text(spec)), escape(d["doc"]))
    outs = ", ".join(f"{k} ({describe_port(v)})" for k, v in nt.outputs.items()) or "none"
    head = Text.assemble((nt.name, "bold cyan"), f"  (plugin {nt.plugin}, version {nt.version})")
    return Group(head, Text(nt.doc.strip() or "(no documentation)"), Text(f"outputs: {outs}"), table)


START, END = "<!-- node-reference:start -->", "<!-- node-reference:end -->"
NODES_PAGE = "docs/nodes.md"


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """``text`` with everything between the ``start`` and ``end`` markers replaced by ``body``."""
    if start not in text or end not in text.partition(start)[2]:
        raise ValueError(f"the markers {start} ... {end} are missing; put them where the generated text belongs")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n\n{body.strip()}\n\n{end}{tail}"


def update_page(path: str, node_types: dict[str, NodeType]) -> bool:
    """Rewrite the generated node reference between the page's markers; True if it changed."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    new = replace_between(text, START, END, reference_markdown(node_types))
    if new != text:
        p.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m fluxkiln.engine.docs [docs/nodes.md]
    import sys

    from .registry import Registry

    page = sys.argv[1] if len(sys.argv) > 1 else NODES_PAGE
    changed = update_page(page, Registry.load(entry_points=False).node_types)
    print("updated" if changed else "up to date")
