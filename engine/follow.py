"""Rank 0 leads, the other ranks follow: the owner's engine and the workers' loop.

:class:`OwnerEngine` is an ordinary :class:`~fluxkiln.engine.runner.Engine`
on rank 0 that, before it runs a node marked :func:`~.distributed.parallel`,
broadcasts what that node needs: its type, parameters, fingerprint and input
values, with every live input (a loaded model) described by the node that
makes it.  :class:`Worker` on every other rank runs those nodes with the same
inputs, loading live models itself (and keeping them for the next run, by
fingerprint).  Workers never touch the cache, the run folder, events or the
report: their node outputs are dropped once the node's collectives are done.

The cells of a sweep whose node type allows it (:func:`~.distributed.whole_cells`)
are dealt out whole instead: each rank makes its contiguous share of the
cells alone, at the same time, and rank 0 gathers the outcomes and stores
every cell as if it had made it (:class:`CellDeal`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import distributed as dist
from .context import RunContext
from .errors import Cancelled, NodeError
from .events import Event
from .failures import describe_failure
from .runner import Engine, RunResult


class OwnerEngine(Engine):
    """The engine of rank 0 in a world of several processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cancel = dist.CancelFlag()
        self._cells = CellDeal()

    def run(self, *args: Any, **kwargs: Any) -> RunResult:
        dist.broadcast({"op": "run"})
        try:
            return super().run(*args, **kwargs)
        finally:
            self._cells.collect()  # a run that stopped early still hears the workers' cells out
            self._cells.rank_of = {}
            dist.broadcast({"op": "end"})
            self._cancel.clear()  # after every rank left the run: the next run (watch) starts uncancelled

    def _fresh_cancel(self) -> None:
        """Keep a cancel that came before the run started (a Ctrl-C on any rank while the processes started)."""

    def _run_node(self, plan: Any, np_: Any, result: RunResult, stats: dict[str, dict[str, Any]]) -> str:
        nt = plan.checked.nodes[np_.id].type
        if not dist.is_parallel(nt):
            return super()._run_node(plan, np_, result, stats)
        if np_.id not in self._cells.rank_of:
            group = cell_group(plan, np_.id, result)
            if group:
                self._cells.deal(group, {"op": "cells", "run_id": result.run_id, "run_dir": str(plan.run_dir),
                                         "recipe": plan.checked.recipe,
                                         "cells": [self._payload(plan, c, result) for c in group]}, self._log(result))
        if np_.id in self._cells.rank_of:
            return self._run_cell(plan, np_, result, stats)
        self._cells.collect()  # the workers are done with any cells before they hear of another node
        dist.broadcast({"op": "node", "run_id": result.run_id, "run_dir": str(plan.run_dir),
                        "recipe": plan.checked.recipe, "node": self._payload(plan, np_.id, result)})
        ready = dist.all_gather(None)  # every rank has its inputs (its own live models) or says why not
        bad = [(rank, why) for rank, why in enumerate(ready) if why]
        if not bad:
            return super()._run_node(plan, np_, result, stats)
        rank, why = bad[0]
        exc = RuntimeError(f"rank {rank} of {len(ready)} could not prepare node '{np_.id}': {why}")
        info = describe_failure(np_.id, nt, exc, {})
        self._emit(Event("node_failed", result.run_id, np_.id, nt.name, info))
        return "failed"

    def _log(self, result: RunResult) -> Any:
        def log(node: str, message: str) -> None:
            self._emit(Event("node_log", result.run_id, node, None, {"level": "info", "message": message}))
        return log

    def _run_cell(self, plan: Any, np_: Any, result: RunResult, stats: dict[str, dict[str, Any]]) -> str:
        """A whole sweep cell: made here alone (rank 0's share) or taken from the rank that made it."""
        rank = self._cells.rank_of.pop(np_.id)
        if rank == 0:
            with dist.alone():
                return super()._run_node(plan, np_, result, stats)
        state, value = self._cells.outcome(np_.id)
        rn = plan.checked.nodes[np_.id]

        def made_elsewhere(ctx: RunContext, **_inputs: Any) -> dict[str, Any]:
            if state == "cancelled":
                raise Cancelled(f"node '{np_.id}' cancelled on rank {rank}")
            if state == "failed":
                raise dist.RankFailed(f"rank {rank} of {dist.current().size} failed making this cell: {value}",
                                      hint="fix the cause and run again; the cells that finished stay cached")
            ctx.log(f"made on rank {rank}")
            return value

        plan.checked.nodes[np_.id] = dataclasses.replace(
            rn, type=dataclasses.replace(rn.type, func=made_elsewhere, wants_ctx=True, is_class=False))
        try:
            return super()._run_node(plan, np_, result, stats)
        finally:
            plan.checked.nodes[np_.id] = rn

    def _payload(self, plan: Any, nid: str, result: RunResult) -> dict[str, Any]:
        """What a worker needs to run ``nid``: plain inputs as values, live inputs as the nodes that make them."""
        rn, np_ = plan.checked.nodes[nid], plan.nodes[nid]
        inputs, live = {}, {}
        for key, link in rn.links.items():
            src = plan.checked.nodes[link.node].type
            if dist.is_live(src, self.registry.port_types):
                live[key] = (self._payload(plan, link.node, result), link)
            else:
                inputs[key] = link.take(result.outputs)
        return {"id": nid, "type": rn.type.name, "params": rn.params, "secrets": dict(rn.secrets),
                "fingerprint": np_.fingerprint, "identity": np_.identity, "inputs": inputs, "live": live}


class Worker:
    """A rank other than 0: runs what rank 0 broadcasts until told to exit."""

    def __init__(self, registry: Any, cache_root: Path) -> None:
        from .residency import Residency

        self.registry = registry
        self.cache_root = cache_root
        self.models = Residency()
        self.cancel = dist.CancelFlag()
        self.live: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()

    def serve(self) -> int:
        """The follower loop; exits 0 when rank 0 says so (rank 0's exit code tells how the run went)."""
        while True:
            msg = dist.broadcast(None)
            op = msg["op"]
            if op == "exit":
                return 0
            if op == "run":
                self.used = set()  # a Ctrl-C that came before the run stays set: the run stops at once
            elif op == "end":
                self.live = {k: v for k, v in self.live.items() if k in self.used}
                self.cancel.clear()
            elif op == "node":
                self._node(msg)
            elif op == "cells":
                self._cells(msg)

    def _node(self, msg: dict[str, Any]) -> None:
        payload = msg["node"]
        try:
            inputs = self._inputs(msg, payload)
            why = None
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the node naming this rank
            inputs, why = None, f"{type(exc).__name__}: {exc}"
        dist.all_gather(why)
        if inputs is None:
            return
        try:
            self._call(msg, payload, inputs)
        except (Cancelled, NodeError):  # every rank stopped or refused the same way; rank 0 reports it
            pass
        except Exception as exc:  # noqa: BLE001 - a failure mid-collectives: stop this rank, the launcher reports it
            print(f"fluxkiln: rank {dist.current().rank}: node '{payload['id']}' failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            os._exit(1)

    def _cells(self, msg: dict[str, Any]) -> None:
        """This rank's whole sweep cells, each alone; rank 0 gathers every outcome."""
        out = []
        mine = msg["shares"][dist.current().rank]
        for payload in msg["cells"]:
            if payload["id"] not in mine:
                continue
            try:
                inputs = self._inputs(msg, payload)
                with dist.alone():
                    out.append(("ok", self._call(msg, payload, inputs)))
            except Cancelled:
                out.append(("cancelled", None))
            except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails this cell naming the rank
                out.append(("failed", f"{type(exc).__name__}: {exc}"))
        dist.gather(out)

    def _inputs(self, msg: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        inputs = dict(payload["inputs"])
        for key, (sub, link) in payload["live"].items():
            inputs[key] = link.take({link.node: self._live(msg, sub)})
        return inputs

    def _live(self, msg: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        fp = payload["fingerprint"]
        self.used.add(fp)
        if fp not in self.live:
            self.live[fp] = self._call(msg, payload, self._inputs(msg, payload))
        return self.live[fp]

    def _call(self, msg: dict[str, Any], payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        nt = self.registry.node_types[payload["type"]]
        ctx = WorkerContext(run_id=msg["run_id"], node=payload["id"], type=nt.name, run_dir=Path(msg["run_dir"]),
                            state_root=self.cache_root / "state", emit=_drop, cancel=self.cancel, models=self.models,
                            resolver=self.registry.resolve_model, recipe=msg["recipe"], params=payload["params"],
                            fingerprint=payload["fingerprint"], identity=payload["identity"], plugin=nt.plugin)
        secrets = {key: os.environ.get(env) if env else None for key, env in payload["secrets"].items()}
        return nt.call(ctx, {**payload["params"], **secrets, **inputs})


class WorkerContext(RunContext):
    """A node's context on a worker rank: no events, nothing created in rank 0's run folder, no locks."""

    def node_dir(self) -> Path:
        return self.run_dir / self.node

    @contextlib.contextmanager
    def using_state(self, *ignore: str) -> Iterator[Path]:
        """The state folder, unlocked: rank 0 holds its lock for the whole world while the node runs."""
        yield self.state_dir(*ignore)


def cell_group(plan: Any, nid: str, result: RunResult) -> list[str]:
    """The cells of ``nid``'s sweep, from ``nid`` on, that run whole on one rank each, as many as fill every rank
    equally (the rest split their images like any call); [] when there are fewer than the ranks."""
    sweep = next((cells for cells in (getattr(plan.checked, "sweeps", None) or {}).values() if nid in cells), None)
    if not sweep:
        return []
    group = []
    for cid in sweep[sweep.index(nid):]:
        rn, np_ = plan.checked.nodes[cid], plan.nodes.get(cid)
        if np_ is None or np_.action != "run" or any(link.node not in result.outputs for link in rn.links.values()):
            break
        if not dist.runs_whole_cells(rn.type, {k: link.take(result.outputs) for k, link in rn.links.items()}):
            break
        group.append(cid)
    size = dist.current().size
    return group[:len(group) // size * size]


class CellDeal:
    """Rank 0's view of the sweep cells dealt out to the ranks: who makes which, and their gathered outcomes."""

    def __init__(self) -> None:
        self.rank_of: dict[str, int] = {}
        self._pending: list[str] | None = None
        self._outcomes: dict[str, tuple[str, Any]] = {}

    def deal(self, group: list[str], msg: dict[str, Any], log: Any) -> None:
        """Give every rank a contiguous share of ``group`` (rank 0 the first) and start the workers on theirs."""
        self.collect()
        world = dist.current()
        shares = [[group[i] for i in dist.shard(len(group), dist.World(r, world.size))] for r in range(world.size)]
        self.rank_of = {cid: r for r, share in enumerate(shares) for cid in share}
        dist.broadcast({**msg, "shares": shares})
        self._pending, self._outcomes = [c for r in range(1, world.size) for c in shares[r]], {}
        log(group[0].split("[")[0], f"{len(group)} cell(s) over {world.size} ranks, whole cells: "
            + ", ".join(f"{len(s)} on rank {r}" for r, s in enumerate(shares)))

    def outcome(self, cid: str) -> tuple[str, Any]:
        self.collect()
        return self._outcomes.pop(cid)

    def collect(self) -> None:
        """Gather the workers' cells once they are done (rank 0 calls this when it needs one, or at the end)."""
        if self._pending is None:
            return
        parts = dist.gather(None) or []
        flat = [outcome for part in parts[1:] for outcome in part]
        self._outcomes = dict(zip(self._pending, flat, strict=True))
        self._pending = None


def _drop(event: Event) -> None:
    """Workers emit no events: rank 0 reports the run."""
