"""The recipe graph: build it, order it, find cycles, select ``--only`` subsets, draw it.

This module only houses the graph and what is needed to create, traverse and
render one (networkx DiGraph of node ids; an edge ``a -> b`` means b reads a).
"""

from __future__ import annotations

import networkx as nx

from .recipe import Recipe


def build(recipe: Recipe) -> nx.DiGraph:
    """A DiGraph of node ids with an edge for every link to an existing node."""
    g = nx.DiGraph()
    for i, (nid, spec) in enumerate(recipe.nodes.items()):
        g.add_node(nid, type=spec.type, index=i)
    for nid, spec in recipe.nodes.items():
        for key, links in spec.links().items():
            for link in links:
                if link.node in recipe.nodes:
                    if g.has_edge(link.node, nid):
                        g.edges[link.node, nid]["keys"].append(key)
                    else:
                        g.add_edge(link.node, nid, keys=[key])
    return g


def find_cycle(g: nx.DiGraph) -> list[str] | None:
    """The nodes of one cycle, first node repeated at the end (``a -> b -> a``), or None."""
    try:
        edges = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    return [e[0] for e in edges] + [edges[0][0]]


def order(g: nx.DiGraph) -> list[str]:
    """Topological order; ties broken by the order of tables in the recipe."""
    return list(nx.lexicographical_topological_sort(g, key=lambda n: g.nodes[n].get("index", 0)))


def with_ancestors(g: nx.DiGraph, nodes: list[str]) -> set[str]:
    """The given nodes and everything they (transitively) read."""
    keep = set(nodes)
    for n in nodes:
        keep |= nx.ancestors(g, n)
    return keep


def with_descendants(g: nx.DiGraph, nodes: list[str]) -> set[str]:
    """The given nodes and everything that (transitively) reads them."""
    keep = set(nodes)
    for n in nodes:
        keep |= nx.descendants(g, n)
    return keep


def render_text(g: nx.DiGraph) -> str:
    lines = []
    for n in order(g):
        preds = [f"{k}=@{p}" for p in g.predecessors(n) for k in g.edges[p, n]["keys"]]
        lines.append(f"{n} ({g.nodes[n]['type']})" + (f"  <- {', '.join(sorted(preds))}" if preds else ""))
    return "\n".join(lines)


def _mid(n: str) -> str:
    return "n_" + "".join(c if c.isalnum() or c == "_" else "_" for c in n)


def render_mermaid(g: nx.DiGraph) -> str:
    lines = ["flowchart TD"]
    for n in order(g):
        lines.append(f'    {_mid(n)}["{n}<br/><i>{g.nodes[n]["type"]}</i>"]')
    for a, b, data in sorted(g.edges(data=True)):
        for key in data["keys"]:
            lines.append(f"    {_mid(a)} -->|{key}| {_mid(b)}")
    return "\n".join(lines)


def render_dot(g: nx.DiGraph) -> str:
    lines = ["digraph recipe {", "  rankdir=TB;", "  node [shape=box];"]
    for n in order(g):
        lines.append(f'  "{n}" [label="{n}\\n({g.nodes[n]["type"]})"];')
    for a, b, data in sorted(g.edges(data=True)):
        for key in data["keys"]:
            lines.append(f'  "{a}" -> "{b}" [label="{key}"];')
    lines.append("}")
    return "\n".join(lines)
