"""The runner: execute a validated recipe's plan, node by node, emitting events.

:class:`Engine` is the public entry point used by the CLI, the watcher and the
TUI.  One Engine keeps live results (memory cache) and loaded models
(residency) between runs in a process; the disk cache reuses results across
processes.  A failed node is reported with its node id, type, plugin, inputs,
error and a hint; its dependants are skipped, everything else still runs and
everything already finished stays cached and on disk.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .artifacts import in_run, record
from .context import RunContext
from .errors import Cancelled, RecipeInvalid
from .events import Event
from .failures import describe_failure, summarize_inputs
from .fingerprint import FileHasher
from .hookspecs import hookimpl
from .plan import Plan, make_plan
from .recipe import Recipe
from .registry import Registry
from .report import write_report
from .residency import Residency
from .runcache import RunCaches
from .sweep import with_cells
from .validate import Checked, check_file

RETRIES = 5  # attempts to read a cached result and place its files (a concurrent run may be replacing the entry)


@dataclass
class RunResult:
    """The outcome of one run."""

    run_id: str
    status: str  # "ok" | "failed" | "cancelled"
    nodes: dict[str, str] = field(default_factory=dict)  # id -> ran | cached | failed | skipped | cancelled
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    run_dir: Path | None = None
    seconds: float = 0.0
    plan: Plan | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def artifacts(self, node: str | None = None) -> list[str]:
        return [a for e in self.events if e.event == "node_finished" and (node is None or e.node == node)
                for a in e.data.get("artifacts", [])]


class _Collector:
    """Keeps every event of a run in its RunResult (an ordinary on_event observer)."""

    def __init__(self, sink: list[Event]):
        self.sink = sink

    @hookimpl
    def on_event(self, event: Event) -> None:
        self.sink.append(event)


def resolve_run_dir(recipe: Recipe, output: str | Path | None) -> Path:
    """``--output`` > ``[recipe] output_dir`` (relative to the recipe) > ``./runs/<name>``."""
    if output:
        return Path(output).expanduser().resolve()
    opt = recipe.options.get("output_dir")
    if opt:
        p = Path(str(opt)).expanduser()
        return (p if p.is_absolute() else recipe.base_dir / p).resolve()
    return (Path.cwd() / "runs" / recipe.name).resolve()


class Engine:
    """Runs recipes; keeps models hot and results cached between runs."""

    def __init__(self, registry: Registry | None = None, *, cache_dir: Path | None = None,
                 residency: Residency | None = None) -> None:
        self.registry = registry or Registry.load()
        self.cache_root = Path(cache_dir) if cache_dir else paths.cache_root()
        self.caches = RunCaches(self.cache_root)
        self.disk, self.memory = self.caches.disk, self.caches.memory
        self.models = residency or Residency()
        self.hasher = FileHasher(self.cache_root / "filehashes.json")
        self._cancel = threading.Event()
        self._previous: dict[str, dict[str, dict[str, Any]]] = {}
        self._run_warnings: list[str] = []
        self.running = False

    # ------------------------------------------------------------ public API
    def check(self, recipe: str | Path, overrides: list[str] | None = None) -> Checked:
        """Validate a recipe file; raise RecipeInvalid listing every problem."""
        return check_file(recipe, self.registry, overrides)

    def cancel(self) -> None:
        """Ask the current run to stop at the next safe point."""
        self._cancel.set()

    def _fresh_cancel(self) -> None:
        """A new run starts uncancelled (an engine of several processes keeps a cancel that came early)."""
        self._cancel.clear()

    def plan(self, recipe: str | Path | Checked, *, overrides: list[str] | None = None, only: list[str] | None = None,
             force: list[str] | None = None, force_all: bool = False, output: str | Path | None = None,
             run_id: str | None = None) -> Plan:
        """Decide what would run and why, without running anything (``run --explain``)."""
        checked = recipe if isinstance(recipe, Checked) else self.check(recipe, overrides)
        for n in (only or []) + (force or []):
            if n not in checked.nodes:
                raise RecipeInvalid([checked.recipe.problem(f"no node '{n}' in this recipe", node=n,
                                                            hint="nodes: " + ", ".join(checked.order))])
        run_dir = resolve_run_dir(checked.recipe, output)
        return make_plan(checked, run_dir=run_dir, run_id=run_id or "plan", memory=self.memory, disk=self.disk,
                         hasher=self.hasher, port_types=self.registry.port_types,
                         previous=self._load_previous(checked.recipe, run_dir), only=only,
                         force=with_cells(checked, force),
                         force_all=force_all)

    def run(self, recipe: str | Path | Checked, *, overrides: list[str] | None = None, only: list[str] | None = None,
            force: list[str] | None = None, force_all: bool = False, output: str | Path | None = None,
            observers: list[Any] | None = None) -> RunResult:
        """Validate (unless given a Checked), plan and execute a recipe."""
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self._run_warnings = self.caches.before_run()
        checked = recipe if isinstance(recipe, Checked) else self.check(recipe, overrides)
        self.registry.prepare_run(checked.recipe)
        result = RunResult(run_id, "ok", run_dir=resolve_run_dir(checked.recipe, output))
        self._fresh_cancel()
        self.running = True
        try:
            with self.registry.observing(_Collector(result.events), *(observers or [])), \
                    self._run_folder_held(result):
                result.plan = self.plan(checked, only=only, force=force, force_all=force_all, output=output,
                                        run_id=run_id)
                self._execute(result.plan, result)
        except Cancelled:
            result.status = "cancelled"  # while waiting for the run folder: nothing ran
        finally:
            self.running = False
        return result

    def _run_folder_held(self, result: RunResult) -> Any:
        """One run at a time in a run folder (see :mod:`fluxkiln.engine.locks`); a waiting run says so."""
        from . import locks

        def waiting(message: str) -> None:
            self._emit(Event("run_waiting", result.run_id, data={"message": message, "run_dir": str(result.run_dir)}))

        return locks.hold(locks.run_folder_lock(result.run_dir), f"run folder {result.run_dir}", on_wait=waiting,
                          cancel=self._cancel)

    # ------------------------------------------------------------ execution
    def _emit(self, event: Event) -> None:
        self.registry.emit(event)

    def _execute(self, plan: Plan, result: RunResult) -> None:
        t0 = time.perf_counter()
        recipe = plan.checked.recipe
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        from .imagemeta import redact_toml

        (plan.run_dir / "recipe.toml").write_text(redact_toml(recipe.text))
        self._emit(Event("run_started", result.run_id, data={
            "recipe": recipe.file, "name": recipe.name, "run_dir": str(plan.run_dir),
            "nodes": list(plan.nodes), "plan": plan.to_dict()}))
        for message in self._run_warnings:
            self._warn(result, message)
        stats: dict[str, dict[str, Any]] = {}
        failed: set[str] = set()
        for nid, np_ in plan.nodes.items():
            rn = plan.checked.nodes[nid]
            bad = [k for k, link in rn.links.items() if link.node in failed]
            if bad:
                failed.add(nid)
                result.nodes[nid] = "skipped"
                self._emit(Event("node_skipped", result.run_id, nid, np_.type,
                                 {"reason": f"input '{bad[0]}' failed"}))
                continue
            if self._cancel.is_set():
                result.status = "cancelled"
                break
            if np_.action == "cached":
                result.nodes[nid] = "cached"
                if not self._use_cached(plan, np_, result):
                    failed.add(nid)
                continue
            state = self._run_node(plan, np_, result, stats)
            result.nodes[nid] = state
            if state == "failed":
                failed.add(nid)
                result.status = "failed"
            elif state == "cancelled":
                result.status = "cancelled"
                break
        for nid in plan.nodes:
            result.nodes.setdefault(nid, "skipped")
        if pruned := self.caches.after_run(plan):
            self._emit(Event("node_log", result.run_id, data={"level": "info", "message": pruned}))
        result.seconds = time.perf_counter() - t0
        self._save_previous(plan)
        write_report(plan, result, stats)
        self._emit(Event("run_finished", result.run_id, data={
            "status": result.status, "nodes": result.nodes, "seconds": round(result.seconds, 3),
            "run_dir": str(plan.run_dir)}))

    def _warn(self, result: RunResult, message: str) -> None:
        """A warning about the whole run (no node), e.g. that the cache cannot be written."""
        self._emit(Event("node_log", result.run_id, data={"level": "warning", "message": message}))

    def _unreadable(self, np_: Any, exc: Exception, result: RunResult) -> None:
        """A verified cache entry that still cannot be loaded: drop it and report the node failed."""
        self.caches.drop(np_)
        result.nodes[np_.id] = "failed"
        result.status = "failed"
        self._emit(Event("node_failed", result.run_id, np_.id, np_.type, {
            "error": f"its cached result could not be read ({type(exc).__name__}: {exc})",
            "error_type": type(exc).__name__, "plugin": self.registry.plugin_of(np_.type),
            "hint": "the broken cache entry was removed: run again to recompute it", "inputs": {}}))

    def _use_cached(self, plan: Plan, np_: Any, result: RunResult) -> bool:
        """Load a cached node's outputs and put its files into the run folder; False if that failed.

        A concurrent run may be swapping this very entry into place: whatever an attempt fails with (a file
        gone, or any other error of the file system) is tried again, up to five times, before the node fails
        by what its last attempt could not do (read the entry, or place its files)."""
        data: dict[str, Any] = {"source": np_.source, "fingerprint": np_.fingerprint[:16]}
        if np_.source != "not needed":
            for attempt in range(RETRIES):
                loaded = False
                try:
                    result.outputs[np_.id] = self.caches.load(np_, self.registry.port_types)
                    loaded = True
                    self.caches.put_files(plan, np_)
                    break
                except OSError as exc:
                    if attempt < RETRIES - 1:
                        time.sleep(0.05 * (attempt + 1))
                        continue
                    if loaded:  # read: the run folder refused the files
                        self._unplaceable(plan, np_, exc, result)
                    else:
                        self._unreadable(np_, exc, result)
                    return False
                except Exception as exc:  # noqa: BLE001 - an unreadable entry fails this node, not the run
                    self._unreadable(np_, exc, result)
                    return False
            data["artifacts"] = in_run(np_.artifacts, plan.run_dir)
        self._emit(Event("node_cached", result.run_id, np_.id, np_.type, data))
        return True

    def _unplaceable(self, plan: Plan, np_: Any, exc: OSError, result: RunResult) -> None:
        """A cached node whose files the run folder refuses (permissions, full disk): the node fails with a hint."""
        result.nodes[np_.id] = "failed"
        result.status = "failed"
        self._emit(Event("node_failed", result.run_id, np_.id, np_.type, {
            "error": f"its cached files could not be put into the run folder {plan.run_dir}: "
                     f"{exc.strerror or exc} ({exc.filename or ''})",
            "error_type": type(exc).__name__, "plugin": self.registry.plugin_of(np_.type),
            "hint": "check that the run folder is writable and the disk has space, then run again", "inputs": {}}))

    def _run_node(self, plan: Plan, np_: Any, result: RunResult, stats: dict[str, dict[str, Any]]) -> str:
        rn = plan.checked.nodes[np_.id]
        nt = rn.type
        inputs = {k: link.take(result.outputs) for k, link in rn.links.items()}
        try:
            plan.files.unshare(np_.id)  # never let the node write into a file shared with the cache
        except OSError:
            pass
        ctx = RunContext(run_id=result.run_id, node=np_.id, type=nt.name, run_dir=plan.run_dir,
                         state_root=self.caches.state_root(), emit=self._emit, cancel=self._cancel,
                         models=self.models, resolver=self.registry.resolve_model, recipe=plan.checked.recipe,
                         params=rn.params, fingerprint=np_.fingerprint, identity=np_.identity, plugin=nt.plugin,
                         reason=np_.reason)
        self._emit(Event("node_started", result.run_id, np_.id, nt.name,
                         {"reason": np_.reason, "inputs": summarize_inputs(inputs), "plugin": nt.plugin}))
        gpu = _GpuPeak()
        t0 = time.perf_counter()
        try:
            kwargs = {**rn.params, **_secrets(rn), **inputs}
            outputs = nt.call(ctx, kwargs)
            _check_outputs(nt, outputs, self.registry.port_types)
            arts = record(ctx.artifacts, plan.run_dir)
            for art in arts:
                plan.files.note(art, np_.id)
            outputs, entry, warning = self.caches.store(np_, nt, plan.checked.recipe.name, outputs, arts,
                                                        self.registry.port_types)
            if warning:
                self._warn(result, warning)
        except Cancelled:
            self._emit(Event("node_cancelled", result.run_id, np_.id, nt.name,
                             {"artifacts": ctx.artifacts, "seconds": round(time.perf_counter() - t0, 3)}))
            return "cancelled"
        except Exception as exc:  # noqa: BLE001 - any node failure is reported, the run goes on
            info = describe_failure(np_.id, nt, exc, inputs, plan.checked.recipe)
            self._emit(Event("node_failed", result.run_id, np_.id, nt.name, info))
            return "failed"
        seconds = time.perf_counter() - t0
        self.caches.remember(np_, outputs, entry, arts)
        result.outputs[np_.id] = outputs
        stats[np_.id] = {"seconds": seconds, "peak_gpu_bytes": gpu.peak(), "outputs": outputs,
                         "progress": _last_progress(result.events, np_.id)}
        self._emit(Event("node_finished", result.run_id, np_.id, nt.name,
                         {"artifacts": ctx.artifacts, "seconds": round(seconds, 3),
                          "fingerprint": np_.fingerprint[:16]}))
        return "ran"

    # ------------------------------------------------------------ previous identities (for reasons)
    def _prev_path(self, run_dir: Path) -> Path:
        return run_dir / ".fluxkiln" / "identities.json"

    def _load_previous(self, recipe: Recipe, run_dir: Path) -> dict[str, dict[str, Any]]:
        key = str(run_dir)
        if key not in self._previous:
            try:
                self._previous[key] = json.loads(self._prev_path(run_dir).read_text())
            except (OSError, ValueError):
                self._previous[key] = {}
        return self._previous[key]

    def _save_previous(self, plan: Plan) -> None:
        prev = self._previous.setdefault(str(plan.run_dir), {})
        prev.update({nid: np_.identity for nid, np_ in plan.nodes.items()})
        p = self._prev_path(plan.run_dir)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = paths.temp_name(p)
        tmp.write_text(json.dumps(prev, default=str))
        os.replace(tmp, p)


def _secrets(rn: Any) -> dict[str, str | None]:
    out = {}
    for key, env in rn.secrets.items():
        out[key] = os.environ.get(env) if env else None
        if env and out[key] is None:
            from .errors import NodeError

            raise NodeError(f"environment variable {env} is not set", key=key,
                            hint=f"export {env}=... before running, or remove '{key}' from the recipe")
    return out


def _check_outputs(nt: Any, outputs: dict[str, Any], port_types: dict[str, Any]) -> None:
    for port, value in outputs.items():
        pt = port_types[nt.outputs[port]]
        if not pt.accepts(value):
            expected = f"list[{pt.element.cls.__name__}]" if pt.element is not None else pt.cls.__name__
            raise TypeError(f"node type '{nt.name}' returned {type(value).__name__} for output '{port}', "
                            f"expected {expected} (plugin '{nt.plugin}')")


def _last_progress(events: list[Event], node: str) -> dict[str, Any] | None:
    for e in reversed(events):
        if e.node == node and e.event == "node_progress":
            return e.data
        if e.node == node and e.event == "node_started":
            return None
    return None


def _torch_if_imported() -> Any:
    """torch if it is imported completely (a plugin may be importing it in a background thread), else None."""
    import sys

    torch = sys.modules.get("torch")
    return None if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False) else torch


class _GpuPeak:
    """Peak GPU memory during a node, if torch is already imported and a GPU is present."""

    def __init__(self) -> None:
        self.torch = _torch_if_imported()
        self.active = bool(self.torch and self.torch.cuda.is_available())
        if self.active:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        if not self.active:
            torch = _torch_if_imported()
            if torch is None or not torch.cuda.is_available():
                return None
            self.torch = torch
        return int(self.torch.cuda.max_memory_allocated())
