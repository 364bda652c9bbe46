"""Planning: decide, before anything runs, which nodes run, which are reused, and why.

Fingerprints are computed for every node from parameters, file contents and
the fingerprints of its inputs, so a node's cache status is known before its
ancestors execute.  Only what a target needs is touched: a model loader whose
dependants are all cached is not loaded at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import devmode
from . import graph as graphmod
from .artifacts import Artifact, RunFiles, plan_restore
from .cache import CacheEntry, DiskCache, MemoryCache, MemoryHit, port_versions
from .errors import RecipeInvalid
from .fingerprint import FileHasher, diff_reasons, digest, identity
from .validate import Checked, ResolvedNode


@dataclass
class NodePlan:
    """What will happen to one node in this run."""

    id: str
    type: str
    fingerprint: str
    identity: dict[str, Any]
    action: str = "run"  # "run" | "cached"
    reason: str = ""
    source: str | None = None  # for cached: "memory" | "disk" | "not needed"
    entry: CacheEntry | None = None
    volatile: bool = False
    artifacts: list[Artifact] = field(default_factory=list)  # for cached: the files it wrote into run folders
    restore: list[tuple[Artifact, Path]] = field(default_factory=list)  # for cached: files to put into this one


@dataclass
class Plan:
    checked: Checked
    run_dir: Path
    nodes: dict[str, NodePlan] = field(default_factory=dict)
    files: RunFiles | None = None  # what fluxkiln wrote into the run folder

    def to_dict(self) -> dict[str, Any]:
        return {n.id: {"type": n.type, "action": n.action, "reason": n.reason, "source": n.source,
                       "fingerprint": n.fingerprint[:16]} for n in self.nodes.values()}


def _literal_identity(rn: ResolvedNode) -> dict[str, Any]:
    return {k: v for k, v in rn.params.items() if k not in rn.files and k not in rn.secrets}


def _disk_ok(rn: ResolvedNode, port_types: dict[str, Any]) -> bool:
    """Results of this node can be kept on disk (a node without outputs keeps the files it wrote)."""
    return rn.type.cache == "disk" and all(port_types[p].disk_cacheable for p in rn.type.outputs.values())


def _memory_source(hit: MemoryHit, disk: DiskCache) -> Callable[[Artifact], Path | None]:
    """Where a memory-cached node's file can be copied from: its disk entry's copy, verified now."""
    def source(art: Artifact) -> Path | None:
        if hit.entry is None or art.stored is None:
            return None
        path = hit.entry / art.stored
        try:
            return path if disk.check(path, art.size, art.sha) else None
        except OSError:
            return None
    return source


def _lookup(np_: NodePlan, rn: ResolvedNode, memory: MemoryCache, disk: DiskCache,
            port_types: dict[str, Any], files: RunFiles) -> None:
    """Mark a node cached (from memory, else disk) unless its result is absent or its files can't be put
    into the run folder as they were (then ``reason`` says why it runs)."""
    hit = memory.hit(np_.fingerprint)
    if hit is not None:
        todo = plan_restore(hit.artifacts, files, _memory_source(hit, disk))
        np_.reason = todo.reason
        if not todo.reason:
            np_.action, np_.source, np_.artifacts, np_.restore = "cached", "memory", hit.artifacts, todo.todo
            return
    if _disk_ok(rn, port_types):
        entry = disk.lookup(np_.fingerprint, dict(rn.type.outputs), port_versions(rn.type.outputs, port_types))
        if entry is not None:
            todo = plan_restore(entry.artifacts, files,
                                lambda a: entry.path / a.stored if a.stored is not None else None)
            np_.reason = todo.reason
            if not todo.reason:
                np_.action, np_.source, np_.entry = "cached", "disk", entry
                np_.artifacts, np_.restore = entry.artifacts, todo.todo


def _hash_files(checked: Checked, nid: str, hasher: FileHasher) -> dict[str, str]:
    """Content hashes of a node's input files; a file that became unreadable is a recipe problem."""
    out = {}
    for key, path in checked.nodes[nid].files.items():
        try:
            out[key] = hasher.path(path)
        except OSError as exc:
            raise RecipeInvalid([checked.recipe.problem(f"cannot read {path}: {exc.strerror or exc}", node=nid,
                                                        key=key, hint="point it at a regular file or folder")])
    return out


def make_plan(checked: Checked, *, run_dir: Path, run_id: str, memory: MemoryCache, disk: DiskCache,
              hasher: FileHasher, port_types: dict[str, Any], previous: dict[str, dict[str, Any]],
              only: list[str] | None = None, force: list[str] | None = None, force_all: bool = False) -> Plan:
    """Fingerprint every node and decide run/cached with a reason for each."""
    g = checked.graph
    plan = Plan(checked, run_dir, files=RunFiles(run_dir))
    disk.begin()
    selected = graphmod.with_ancestors(g, only) if only else set(checked.order)
    forced = graphmod.with_descendants(g, force) if force else set()
    for nid in checked.order:
        if nid not in selected:
            continue
        rn = checked.nodes[nid]
        files = _hash_files(checked, nid, hasher)
        if rn.type.extra_fingerprint is not None:
            extra = rn.type.extra_fingerprint(dict(rn.params), run_dir / nid, checked.recipe.base_dir)
            for label, value in (extra if isinstance(extra, dict) else {"edited files": extra}).items():
                if value:
                    files[f"({label})"] = value
        if devmode.enabled():
            files[devmode.LABEL] = devmode.code_digest(rn.type, hasher)
        inputs = {k: f"{plan.nodes[link.node].fingerprint}.{link.port}" for k, link in rn.links.items()}
        ident = identity(rn.type.name, rn.type.version, _literal_identity(rn), inputs, files)
        volatile = rn.type.volatile(dict(rn.params)) if rn.type.volatile else None
        fp = digest({**ident, "volatile": run_id} if volatile else ident)
        np_ = NodePlan(nid, rn.type.name, fp, ident, volatile=bool(volatile))
        plan.nodes[nid] = np_
        file_names = {k: str(checked.recipe.nodes[nid].values.get(k, k)) for k in rn.files}
        if force_all or nid in forced:
            np_.reason = "forced" if (force_all or nid in (force or [])) else "forced (depends on a forced node)"
        elif volatile:
            np_.reason = volatile
        elif rn.type.cache == "never":
            np_.reason = "node type is never cached"
        else:
            _lookup(np_, rn, memory, disk, port_types, plan.files)
        if np_.action == "run" and not np_.reason:
            changes = diff_reasons(previous.get(nid), ident, file_names)
            np_.reason = "; ".join(changes) if changes else "no cached result"
    _mark_unneeded(plan, g, selected, only, port_types)
    try:
        hasher.save()
    except OSError:
        pass  # the file-hash index only saves time; an unwritable cache is reported once by the run
    return plan


def _mark_unneeded(plan: Plan, g: Any, selected: set[str], only: list[str] | None,
                   port_types: dict[str, Any]) -> None:
    """Nodes that nobody running needs are reported cached ('not needed').

    With ``--only`` that is any such ancestor of the target; otherwise only
    nodes whose result cannot be kept on disk (a model loader whose dependants
    are all cached is not loaded at all).
    """
    needed: dict[str, bool] = {}
    for nid in reversed(list(plan.nodes)):
        np_ = plan.nodes[nid]
        succs = [s for s in g.successors(nid) if s in plan.nodes]
        succ_run = any(plan.nodes[s].action == "run" and needed[s] for s in succs)
        is_target = (nid in only) if only else not succs
        needed[nid] = is_target or succ_run
        if np_.action != "run" or needed[nid]:
            continue
        if only or not _disk_ok(plan.checked.nodes[nid], port_types):
            np_.action, np_.source, np_.reason = "cached", "not needed", ""
        else:
            needed[nid] = True
