"""The main screen: editor and problems on the left; graph, progress, metrics, details, log and
images on the right.  It is the controller: validation, planning and runs happen in worker
threads whose results come back as messages, so the UI never waits on the engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, RichLog, TabbedContent, TabPane

from fluxkiln.engine.errors import Problem, RecipeInvalid
from fluxkiln.engine.validate import check_text

from .details import NodeDetails
from .editor import RecipeEditor
from .graph import GraphPanel
from .images import ImagePreview
from .logtext import log_text
from .observer import RunObserver, Thumb, final_thumbs
from .plot import MetricPlot
from .problems import ProblemList
from .progress import ProgressPanel
from .state import RunModel
from .status import StatusBar
from .watching import Watch


class MainScreen(Screen):
    """Edit, validate, run and monitor one recipe."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", tooltip="Save the recipe (atomic write)", priority=True),
        Binding("ctrl+r", "run", "Run", tooltip="Run the recipe as shown in the editor", priority=True),
        Binding("escape", "cancel", "Cancel", tooltip="Cancel the run at the next safe point", priority=True),
        Binding("ctrl+c", "cancel", "Cancel", tooltip="Cancel the run at the next safe point (copy when idle)",
                show=False, priority=True),
        Binding("ctrl+f", "force", "Force", tooltip="Rerun the selected node and its dependants (--force)",
                priority=True),
        Binding("ctrl+t", "toggle_watch", "Watch", tooltip="Toggle watch mode: rerun what changed on every save",
                priority=True),
        Binding("ctrl+e", "focus_editor", "Focus the editor", show=False),
        Binding("ctrl+g", "focus_graph", "Focus the graph", show=False),
        Binding("f3", "tab('details')", "Details tab", show=False),
        Binding("f4", "tab('log')", "Log tab", show=False),
        Binding("f5", "tab('images')", "Images tab", show=False),
    ]

    @dataclass
    class Validated(Message):
        seq: int
        text: str
        checked: Any
        problems: list[Any]

    @dataclass
    class Planned(Message):
        seq: int
        runs: int
        plan: Any

    @dataclass
    class RunEnded(Message):
        """The run worker finished: ``result`` (None if it never ran), ``problems`` or ``error``."""

        result: Any = None
        problems: list[Any] = field(default_factory=list)
        error: str | None = None
        thumbs: list[Thumb] = field(default_factory=list)

    def __init__(self, engine: Any, *, output: str | None = None, validate_delay: float = 0.3,
                 watch_debounce: float = 0.3) -> None:
        super().__init__()
        self.engine = engine
        self.output = output
        self.validate_delay = validate_delay
        self.model = RunModel()
        self.checked: Any = None
        self.problems: list[Any] = []
        self.running = False
        self.runs_started = self.runs_ended = 0
        self._seq = 0
        self._timer: Timer | None = None
        self._engine_lock = threading.Lock()
        self._pending_text: str | None = None
        self.last_run_text: str | None = None
        self.watcher = Watch(self, debounce=watch_debounce)

    # ------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="body"):
            with Vertical(id="left"):
                yield RecipeEditor(id="editor")
                yield ProblemList(id="problems")
            with Vertical(id="right"):
                yield GraphPanel(id="graph")
                yield ProgressPanel(id="progress")
                yield MetricPlot(id="plot")
                with TabbedContent(id="tabs"):
                    with TabPane("Details", id="details"):
                        yield NodeDetails(id="node-details")
                    with TabPane("Log", id="log"):
                        yield RichLog(id="run-log", markup=False, highlight=False, wrap=True, min_width=20,
                                      max_lines=5000)
                    with TabPane("Images", id="images"):
                        yield ImagePreview(id="preview")
        yield Footer(compact=True)

    @property
    def editor(self) -> RecipeEditor:
        return self.query_one(RecipeEditor)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def graph(self) -> GraphPanel:
        return self.query_one(GraphPanel)

    def on_mount(self) -> None:
        self.query_one(ProblemList).display = False
        self.status.set()
        self.editor.read_only = True

    # ------------------------------------------------------------ files
    def open_recipe(self, path: Path, text: str | None = None) -> None:
        """Open ``path`` in the editor (``text``: unsaved content for a file not written yet)."""
        editor = self.editor
        editor.read_only = False
        if text is None:
            editor.open_file(path)
        else:
            editor.open_file(path, "")
            editor.load_text(text)
        self.checked, self.model = None, RunModel()
        self.graph.show(self.model)
        self.query_one(NodeDetails).show(None)
        self.status.set(path=path.resolve(), dirty=editor.dirty, problems=None, run="idle", run_note="")
        self.watcher.stop()
        self.status.set(watching=False)
        editor.focus()

    def action_save(self) -> None:
        if self.editor.path is None:
            self.notify("No recipe is open: ctrl+o opens one, ctrl+n creates one.", severity="warning")
            return
        try:
            self.editor.save()
        except OSError as exc:
            self.notify(f"Could not save: {exc}", severity="error", markup=False)

    def on_recipe_editor_dirty_changed(self, event: RecipeEditor.DirtyChanged) -> None:
        self.status.set(dirty=event.dirty)

    def on_recipe_editor_saved(self, event: RecipeEditor.Saved) -> None:
        self.notify(f"Saved {event.path.name}", markup=False, timeout=2)
        if self.watcher.active:
            self.request_run(event.text)

    # ------------------------------------------------------------ validation
    @on(RecipeEditor.Changed)
    def _text_changed(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(self.validate_delay, self.validate_now)

    def validate_now(self) -> None:
        if self.editor.path is None:
            return
        self._seq += 1
        self._validate(self.editor.text, self.editor.path, self._seq)

    @work(thread=True, group="validate", exit_on_error=False)
    def _validate(self, text: str, path: Path, seq: int) -> None:
        try:
            checked, problems = check_text(text, self.engine.registry, path)
        except Exception as exc:  # noqa: BLE001 - e.g. a plugin's check_recipe hook crashed
            checked, problems = None, [Problem(f"validation failed: {type(exc).__name__}: {exc}", str(path))]
        self.post_message(self.Validated(seq, text, checked, problems))

    def on_main_screen_validated(self, msg: Validated) -> None:
        if msg.seq != self._seq:
            return
        self.problems = msg.problems
        self.query_one(ProblemList).show(msg.problems)
        self.editor.set_error_lines({p.line for p in msg.problems if p.line and p.file != "--set"})
        self.status.set(problems=len(msg.problems))
        self.graph.border_subtitle = "" if msg.checked or not self.model.nodes else "last valid recipe"
        if msg.checked is None:
            return
        self.checked = msg.checked
        self.model.set_recipe(msg.checked)
        self.graph.show(self.model)
        self._show_selected()
        self.watcher.update(msg.checked, self.output)
        if not self.running and msg.text != self.last_run_text:  # else keep showing that run's outcome
            self._plan(msg.checked, msg.seq, self.runs_started)

    @work(thread=True, group="plan", exit_on_error=False)
    def _plan(self, checked: Any, seq: int, runs: int) -> None:
        """A preview of what a run would do; best effort (the run itself reports any error)."""
        if not self._engine_lock.acquire(blocking=False):
            return
        try:
            plan = self.engine.plan(checked, output=self.output)
        except Exception:  # noqa: BLE001
            return
        finally:
            self._engine_lock.release()
        self.post_message(self.Planned(seq, runs, plan))

    def on_main_screen_planned(self, msg: Planned) -> None:
        """Show what a run would do now, unless the text changed or a run started since."""
        if msg.seq == self._seq and msg.runs == self.runs_started and not self.running:
            self.model.apply_plan(msg.plan)
            self.graph.show(self.model)
            self._show_selected()

    def on_problem_list_goto_line(self, msg: ProblemList.GotoLine) -> None:
        self.editor.goto_line(msg.line)

    # ------------------------------------------------------------ runs
    def action_run(self) -> None:
        self.start_run(self.editor.text)

    def action_force(self) -> None:
        node = self.graph.selected
        if node is None:
            self.notify("Select a node in the graph first (ctrl+g).", severity="warning")
            return
        self.start_run(self.editor.text, force=[node])

    def on_graph_panel_force_requested(self, msg: GraphPanel.ForceRequested) -> None:
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
        observer = RunObserver(self)
        try:
            with self._engine_lock:
                result = self.engine.run(checked, force=force, output=self.output, observers=[observer])
        except RecipeInvalid as exc:
            return self.RunEnded(problems=exc.problems)
        thumbs = [] if observer.shown_files else final_thumbs(result)
        return self.RunEnded(result=result, thumbs=thumbs)

    def on_run_observer_engine_event(self, msg: RunObserver.EngineEvent) -> None:
        event = msg.event
        info = self.model.apply(event)
        line = log_text(event)
        if line is not None:
            self.query_one(RichLog).write(line)
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

    def on_main_screen_run_ended(self, msg: RunEnded) -> None:
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
            self.query_one(RichLog).write(Text(f"engine error: {msg.error}", style="bold red"))
            self.notify(msg.error, title="Engine error", severity="error", markup=False)
        elif msg.result is not None:
            r = msg.result
            self.status.set(run=r.status, run_note=f"in {r.seconds:.1f} s")
            if r.status == "failed":
                self.notify("A node failed: see the graph and the node's details.", severity="error")
        if self._pending_text is not None:
            text, self._pending_text = self._pending_text, None
            self.start_run(text)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.running
        return True

    def action_cancel(self) -> None:
        if self.running:
            self._pending_text = None
            self.engine.cancel()
            self.status.set(run="cancelling", run_note="(at the next safe point)")

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
        disk = self.watcher.text_to_rerun(msg.paths, self.last_run_text)
        if disk is None:
            return
        if self.editor.dirty:
            self.notify("The recipe changed on disk; your unsaved edits are kept in the editor.",
                        severity="warning")
        else:
            self.editor.reload_if_clean()
        self.request_run(disk)

    # ------------------------------------------------------------ navigation
    def on_graph_panel_node_selected(self, msg: GraphPanel.NodeSelected) -> None:
        self.query_one(NodeDetails).show(self.model.nodes.get(msg.node))

    def _show_selected(self) -> None:
        node = self.graph.selected
        self.query_one(NodeDetails).show(self.model.nodes.get(node) if node else None)

    def action_focus_editor(self) -> None:
        self.editor.focus()

    def action_focus_graph(self) -> None:
        self.graph.focus()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def on_image_preview_changed(self, msg: ImagePreview.Changed) -> None:
        self.query_one(TabbedContent).get_tab("images").label = f"Images ({msg.count})"

    def shutdown(self) -> None:
        """Stop the watcher and ask a run in progress to stop."""
        self.watcher.stop()
        if self.running:
            self.engine.cancel()

