"""Sweeps: a node's ``[nodes.<id>.sweep]`` table runs it over the cartesian product of lists of values.

A sweep table names keys of the node and gives each a list of values
(literals, or links such as ``model = ["@dev", "@schnell"]``).  After
validation, :func:`expand` replaces the node by one *cell* per combination —
an ordinary node with the id ``<id>[key=label,...]`` (first key outermost),
fingerprinted and cached on its own, so widening a sweep by one value runs
only the new cells — and a *join* node under the original id that hands the
cells' outputs on, in order, as one value: port types with a ``join``
(``images``, every ``list[X]``) are concatenated, any other X becomes a
``list[X]``.  Every image of a joined ``images`` value records its cell in
``meta["sweep"]`` (node, cell index, axis labels and values), which ``grid``
uses to lay a sweep out with labelled axes.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from .nodes import NodeType
from .ports import ImageItem, Images, PortType, list_name
from .recipe import Link

MAX_CELLS = 1024
JOIN_TYPE = "sweep"
_PLAIN_LABEL = re.compile(r"^[A-Za-z0-9_.:+-]{1,32}$")


@dataclass
class AxisValue:
    """One value of a swept key, resolved like an ordinary value of that key."""

    label: str  # short, file-name safe: used in cell ids
    value: Any  # what meta and labels show (a link shows its node id)
    raw: Any = None  # as the recipe writes it (``fluxkiln inspect --write-recipe`` pins a cell with it)
    params: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Axis:
    """A swept key and its values, in the order the recipe gives them."""

    key: str
    values: list[AxisValue]


def value_label(value: Any, index: int) -> str:
    """A cell-id label for a value: links by node id, short plain values as written, others by position (#2)."""
    if isinstance(value, Link):
        text = value.node + (f".{value.port}" if value.port else "")
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif value is None:
        text = "none"
    else:
        text = str(value)
    return text if isinstance(value, (Link, bool, int, float)) or _PLAIN_LABEL.match(text) else f"#{index + 1}"


def shown_value(value: Any) -> Any:
    """The value a cell's images record: a link becomes its node id."""
    return value.node if isinstance(value, Link) else value


def recipe_value(value: Any) -> Any:
    """The value as a recipe writes it (a link as ``"@id"``, a string starting with ``@`` escaped)."""
    if isinstance(value, Link):
        return str(value)
    if isinstance(value, str) and value.startswith("@"):
        return "@" + value
    return value


def cell_count(axes: list[Axis]) -> int:
    n = 1
    for axis in axes:
        n *= len(axis.values)
    return n


def cell_id(node: str, combo: tuple[tuple[str, AxisValue], ...]) -> str:
    return f"{node}[" + ",".join(f"{key}={v.label}" for key, v in combo) + "]"


def cell_of(meta: dict[str, Any] | None) -> dict[str, str] | None:
    """The sweep cell an image came from, ``{"node": swept node, "cell": cell id}``, read from the
    ``meta["sweep"]`` record a join gives it (None for an image from no sweep).  A node that scores images
    keeps this beside each score, so the report can put the scores in the sweep's table, cell by cell."""
    record = (meta or {}).get("sweep")
    if not isinstance(record, dict) or not isinstance(record.get("node"), str) \
            or not isinstance(record.get("axes"), dict):
        return None
    axes = record["axes"]
    return {"node": record["node"], "cell": f"{record['node']}[" + ",".join(f"{k}={v}" for k, v in axes.items()) + "]"}


def joined_type(port: str, port_types: dict[str, PortType]) -> str:
    """The port type of a swept node's output ``port``: itself if it can be joined, else ``list[port]``."""
    pt = port_types[port]
    return port if pt.join is not None else list_name(port)


def joined_outputs(nt: NodeType, port_types: dict[str, PortType]) -> dict[str, str]:
    return {port: joined_type(ptype, port_types) for port, ptype in nt.outputs.items()}


# ------------------------------------------------------------------ expansion
def expand(checked: Any, port_types: dict[str, PortType]) -> Any:
    """Replace every swept node of a validated recipe by its cells and a join node (a new Checked)."""
    swept = [nid for nid in checked.order if getattr(checked.nodes[nid], "sweep", None)]
    if not swept:
        return checked
    nodes: dict[str, Any] = {}
    index: dict[str, float] = {}
    cells_of: dict[str, list[str]] = {}
    for i, nid in enumerate(checked.order):
        rn = checked.nodes[nid]
        if not rn.sweep:
            nodes[nid], index[nid] = rn, float(i)
            continue
        cells = _cells(rn)
        total = len(cells) + 1
        for j, cell in enumerate(cells):
            nodes[cell.id], index[cell.id] = cell, i + j / total
        nodes[nid] = _join_node(rn, cells, port_types)
        index[nid] = i + (total - 1) / total
        cells_of[nid] = [c.id for c in cells]
    graph = _graph(nodes, index)
    order = list(nx.lexicographical_topological_sort(graph, key=lambda n: (index[n], n)))
    return dataclasses.replace(checked, graph=graph, order=order, nodes=nodes, sweeps=cells_of)


def _cells(rn: Any) -> list[Any]:
    """One resolved node per combination of the axes' values, first axis outermost."""
    swept = {axis.key for axis in rn.sweep}
    params = {k: v for k, v in rn.params.items() if k not in swept}
    links = {k: v for k, v in rn.links.items() if k not in swept}
    files = {k: v for k, v in rn.files.items() if k not in swept}
    out = []
    for combo in itertools.product(*[[(axis.key, v) for v in axis.values] for axis in rn.sweep]):
        cell = dataclasses.replace(
            rn, id=cell_id(rn.id, combo), sweep=[],
            params={**params, **{k: p for _, v in combo for k, p in v.params.items()}},
            links={**links, **{k: lk for _, v in combo for k, lk in v.links.items()}},
            files={**files, **{k: f for _, v in combo for k, f in v.files.items()}},
            cell={"node": rn.id, "axes": {key: v.label for key, v in combo},
                  "values": {key: v.value for key, v in combo}, "set": {key: v.raw for key, v in combo}})
        out.append(cell)
    return out


def _join_node(rn: Any, cells: list[Any], port_types: dict[str, PortType]) -> Any:
    """The node under the swept id: joins its cells' outputs, port by port, in cell order."""
    outputs = joined_outputs(rn.type, port_types)
    links = {f"{port}__{j}": Link(cell.id, port) for port in rn.type.outputs for j, cell in enumerate(cells)}
    join_type = NodeType(
        name=JOIN_TYPE, func=_make_join(rn.type.outputs, port_types, len(cells)), version="1",
        doc=f"Joins the {len(cells)} cells of the sweep of node '{rn.id}' ({rn.type.name}).",
        params={}, outputs=outputs, plugin="fluxkiln.engine", cache="memory", category="engine")
    described = [{**c.cell, "index": j} for j, c in enumerate(cells)]
    return dataclasses.replace(rn, type=join_type, params={"cells": described}, links=links, files={}, secrets={},
                               sweep=[])


def _make_join(ports: dict[str, str], port_types: dict[str, PortType], count: int) -> Any:
    def join(ctx: Any, cells: list[dict[str, Any]], **inputs: Any) -> dict[str, Any]:
        out = {}
        for port, ptype in ports.items():
            values = [inputs[f"{port}__{j}"] for j in range(count)]
            if ptype == "images":
                values = [_tag(v, cells[j]) for j, v in enumerate(values)]
            pt = port_types[ptype]
            out[port] = pt.join(values) if pt.join is not None else list(values)
        return out
    return join


def _tag(images: Images, cell: dict[str, Any]) -> Images:
    """Copies of a cell's images whose meta records the cell (the cached originals stay untouched)."""
    record = {"node": cell["node"], "cell": cell["index"], "axes": dict(cell["axes"]),
              "values": dict(cell["values"]), "set": dict(cell["set"])}
    return Images(dataclasses.replace(item, meta={**item.meta, "sweep": record}) for item in images
                  if isinstance(item, ImageItem))


def _graph(nodes: dict[str, Any], index: dict[str, float]) -> nx.DiGraph:
    g = nx.DiGraph()
    for nid, rn in nodes.items():
        g.add_node(nid, type=rn.type.name, index=index[nid])
    for nid, rn in nodes.items():
        for key, link in rn.links.items():
            if g.has_edge(link.node, nid):
                g.edges[link.node, nid]["keys"].append(key)
            else:
                g.add_edge(link.node, nid, keys=[key])
    return g


def with_cells(checked: Any, names: list[str] | None) -> list[str] | None:
    """Node names with each swept node's cells added (``--force study`` reruns the cells of ``study``)."""
    if not names:
        return names
    sweeps = getattr(checked, "sweeps", {}) or {}
    return list(dict.fromkeys(n for name in names for n in [*sweeps.get(name, []), name]))
