"""Runs of the main screen: start, cancel, follow engine events, and rerun on watch.

:class:`RunControl` is a mixin of :class:`~fluxkiln.tui.main.MainScreen`.  The
engine runs in a thread worker; its events come back as messages, so the UI
never waits on it.  A run always runs the text the editor shows (never a disk
text the panels do not show).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.message import Message

from fluxkiln.engine.errors import RecipeInvalid
from fluxkiln.engine.validate import check_text

from .details import NodeDetails
from .dialogs import disk_conflict
from .images import ImagePreview
from .logtext import log_text
from .logview import RunLog
from .observer import RunObserver, Thumb, final_thumbs
from .plot import MetricPlot
from .progress import ProgressPanel
from .watching import Watch


class RunControl:
    """Run, cancel, force, watch; the run worker and the engine events it forwards."""

    engine: Any
    output: str | None
    model: Any

    @dataclass
    class RunEnded(Message):
        """The run worker finished: ``result`` (None if it never ran), ``problems`` or ``error``."""

        result: Any = None
        problems: list[Any] = field(default_factory=list)
        error: str | None = None
        thumbs: list[Thumb] = field(default_factory=list)

    @dataclass
    class RunChecked(Message):
        """The run worker validated the text it is about to run (the panels show that recipe)."""

        checked: Any

    def _init_runs(self, watch_debounce: float) -> None:
        self.running = False
        self.runs_started = self.runs_ended = 0
        self._engine_lock = threading.Lock()
        self._pending_text: str | None = None
        self.last_run_text: str | None = None
        self.watcher = Watch(self, debounce=watch_debounce)
        self._conflict_open = False

    # ------------------------------------------------------------ starting and stopping
    def action_run(self) -> None:
        self.start_run(self.editor.text)

    def action_force(self) -> None:
        node = self.graph.selected
        if node is None:
            self.notify("Select a node in the graph first (ctrl+g).", severity="warning")
            return
        self.start_run(self.editor.text, force=[node])

    def on_graph_panel_force_requested(self, msg: Any) -> None:
        self.start_run(self.editor.text, force=[msg.node])

    def start_run(self, text: str, force: list[str] | None = None) -> bool:
        if self.editor.path is None:
            self.notify("No recipe is open: ctrl+o opens one, ctrl+n creates one.", severity="warning")
            return False
        if self.running:
            self.notify("A run is going: escape cancels it.", severity="warning")
            return False
        self.running = True
        self.runs_started += 1
        self.refresh_bindings()
        self.last_run_text = text
        self.query_one(ProgressPanel).clear()
        self.query_one(MetricPlot).clear()
        self.query_one(ImagePreview).new_run()
        self.status.set(run="running", run_note="")
        self._run(text, self.editor.path, force)
        return True

    def request_run(self, text: str) -> None:
        """Run ``text`` now, or right after the current run stops (which is asked to stop)."""
        if self.running:
            self._pending_text = text
            self.engine.cancel()
            self.status.set(run="cancelling", run_note="(rerun follows)")
        else:
            self.start_run(text)

    def action_cancel(self) -> None:
        if self.running:
            self._pending_text = None
            self.engine.cancel()
            self.status.set(run="cancelling", run_note="(at the next safe point)")

    @work(thread=True, group="run", exit_on_error=False)
    def _run(self, text: str, path: Path, force: list[str] | None) -> None:
        try:
            self.post_message(self._run_recipe(text, path, force))
        except Exception as exc:  # noqa: BLE001 - report any engine crash instead of killing the UI
            self.post_message(self.RunEnded(error=f"{type(exc).__name__}: {exc}"))

    def _run_recipe(self, text: str, path: Path, force: list[str] | None) -> RunEnded:
        """Validate and run ``text`` (in the run worker's thread)."""
        checked, problems = check_text(text, self.engine.registry, path)
        if checked is None:
            return self.RunEnded(problems=problems)
        self.post_message(self.RunChecked(checked))
        observer = RunObserver(self)
        try:
            with self._engine_lock:
                result = self.engine.run(checked, force=force, output=self.output, observers=[observer])
        except RecipeInvalid as exc:
            return self.RunEnded(problems=exc.problems)
        thumbs = [] if observer.shown_files else final_thumbs(result)
        return self.RunEnded(result=result, thumbs=thumbs)

    # ------------------------------------------------------------ events of the run
    def on_run_control_run_checked(self, msg: RunChecked) -> None:
        self.checked = msg.checked
        self.model.set_recipe(msg.checked)
        self.graph.show(self.model)

    def on_run_observer_engine_event(self, msg: RunObserver.EngineEvent) -> None:
        event = msg.event
        info = self.model.apply(event)
        line = log_text(event)
        if line is not None:
            self.query_one(RunLog).add(line)
        if info is None:
            self.graph.show(self.model)
            self._show_selected()
            return
        self.graph.update_node(info)
        self.graph.show_title(self.model)
        self.query_one(ProgressPanel).show(info)
        self.query_one(MetricPlot).add_points(info.id, msg.points)
        if self.graph.selected == info.id and event.event != "node_progress":
            self.query_one(NodeDetails).show(info)
        counts = self.model.counts()
        done = counts["done"] + counts["cached"]
        self.status.set(run_note=f"{done}/{len(self.model.nodes)}")

    def on_run_observer_preview(self, msg: RunObserver.Preview) -> None:
        self.query_one(ImagePreview).add(msg.thumbs, live=msg.live)

    def on_run_control_run_ended(self, msg: RunEnded) -> None:
        self.running = False
        self.runs_ended += 1
        self.refresh_bindings()
        self.query_one(ProgressPanel).clear()
        if msg.thumbs:
            self.query_one(ImagePreview).add(msg.thumbs)
        if msg.problems:
            self.status.set(run="idle", run_note="(recipe invalid)")
            self.notify(f"Not run: the recipe has {len(msg.problems)} problem(s).", severity="error")
        elif msg.error:
            self.status.set(run="failed", run_note="")
            self.query_one(RunLog).add(Text(f"engine error: {msg.error}", style="bold red"))
            self.notify(msg.error, title="Engine error", severity="error", markup=False)
        elif msg.result is not None:
            r = msg.result
            self.status.set(run=r.status, run_note=f"in {r.seconds:.1f} s")
            if r.status == "failed":
                self.notify("A node failed: see the graph and the node's details.", severity="error")
        if self._pending_text is not None:
            text, self._pending_text = self._pending_text, None
            self.start_run(text)

    def tick(self) -> None:
        """Once a second during a run: elapsed seconds of nodes that report no steps (a model loading)."""
        if self.running:
            self.graph.tick()
            self.query_one(ProgressPanel).tick(self.model.nodes)

    # ------------------------------------------------------------ watch
    def action_toggle_watch(self) -> None:
        if self.editor.path is None:
            self.notify("Open a recipe first.", severity="warning")
            return
        on = self.watcher.toggle(self.editor.path, self.checked, self.output)
        self.status.set(watching=on)
        self.notify("Watch on: every save (here or on disk) reruns what changed." if on else "Watch off.",
                    timeout=3)

    def on_watch_files_changed(self, msg: Watch.FilesChanged) -> None:
        """Files changed on disk while watching: take an outside change of the recipe, then rerun."""
        editor = self.editor
        if self.watcher.recipe_changed(msg.paths):
            if editor.changed_on_disk():
                if editor.dirty:
                    self._ask_about_disk_change(rerun=not self.watcher.only_recipe(msg.paths))
                    return
                editor.reload()
            elif self.watcher.only_recipe(msg.paths):
                # The file holds what the editor saved: that save reruns (RecipeEditor.Saved), even when
                # this event arrives before the Saved message does.
                return
        self.request_run(editor.text)

    def _ask_about_disk_change(self, rerun: bool) -> None:
        """The recipe changed on disk under unsaved edits: reload it, or keep the editor's text."""
        if self._conflict_open:
            return
        self._conflict_open = True

        def answer(choice: str | None) -> None:
            self._conflict_open = False
            if choice == "reload":
                self.editor.reload()
                self.request_run(self.editor.text)
            elif rerun:
                self.request_run(self.editor.text)

        self.app.push_screen(disk_conflict(self.editor.path.name), answer)
