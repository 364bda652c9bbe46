"""Rank 0 leads, the other ranks follow: the owner's engine and the workers' loop.

:class:`OwnerEngine` is an ordinary :class:`~fluxkiln.engine.runner.Engine`
on rank 0 that, before it runs a node marked :func:`~.distributed.parallel`,
broadcasts what that node needs: its type, parameters, fingerprint and input
values, with every live input (a loaded model) described by the node that
makes it.  :class:`Worker` on every other rank runs those nodes with the same
inputs, loading live models itself (and keeping them for the next run, by
fingerprint).  Workers never touch the cache, the run folder, events or the
report: their node outputs are dropped once the node's collectives are done.
"""

from __future__ import annotations

import contextlib
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

    def run(self, *args: Any, **kwargs: Any) -> RunResult:
        dist.broadcast({"op": "run"})
        try:
            return super().run(*args, **kwargs)
        finally:
            dist.broadcast({"op": "end"})
            self._cancel.clear()  # after every rank left the run: the next run (watch) starts uncancelled

    def _fresh_cancel(self) -> None:
        """Keep a cancel that came before the run started (a Ctrl-C on any rank while the processes started)."""

    def _run_node(self, plan: Any, np_: Any, result: RunResult, stats: dict[str, dict[str, Any]]) -> str:
        nt = plan.checked.nodes[np_.id].type
        if not dist.is_parallel(nt):
            return super()._run_node(plan, np_, result, stats)
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


def _drop(event: Event) -> None:
    """Workers emit no events: rank 0 reports the run."""
