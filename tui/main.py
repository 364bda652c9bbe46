"""The main screen: editor and problems on the left; graph, progress, metrics, details, log and
images on the right.  It is the controller: validation, planning and runs (:mod:`.runs`) happen in
worker threads whose results come back as messages, so the UI never waits on the engine.

The footer shows the same keys whatever has the focus (a key that cannot act now is dimmed, not
hidden), so nothing shifts under the mouse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, TabbedContent, TabPane

from fluxkiln.engine.errors import Problem
from fluxkiln.engine.validate import check_text

from .details import NodeDetails
from .dialogs import confirm_overwrite
from .editor import RecipeEditor
from .graph import GraphPanel
from .images import ImagePreview
from .logview import RunLog
from .plot import MetricPlot
from .problems import ProblemList
from .progress import ProgressPanel
from .runs import RunControl
from .state import RunModel
from .status import StatusBar

TAB_FOCUS = {"details": NodeDetails, "log": RunLog, "images": ImagePreview}


class MainScreen(RunControl, Screen):
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
        Binding("ctrl+g", "focus_graph", "Focus the graph", show=False),
        Binding("e", "focus_editor", "Focus the editor", tooltip="Focus the editor (when it lacks the focus)",
                show=False),
        Binding("f3", "tab('details')", "Details", tooltip="Show and focus the Details tab", show=False),
        Binding("f4", "tab('log')", "Log", tooltip="Show and focus the Log tab", show=False),
        Binding("f5", "tab('images')", "Images", tooltip="Show and focus the Images tab", show=False),
        Binding("question_mark", "help_key", "Help", tooltip="Help (when the editor lacks the focus)", show=False),
        Binding("q", "quit_key", "Quit", tooltip="Quit (when the editor lacks the focus)", show=False),
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

    def __init__(self, engine: Any, *, output: str | None = None, validate_delay: float = 0.3,
                 watch_debounce: float = 0.3) -> None:
        super().__init__()
        self.engine = engine
        self.output = output
        self.validate_delay = validate_delay
        self.model = RunModel()
        self.checked: Any = None
        self.problems: list[Any] = []
        self._seq = 0
        self._timer: Timer | None = None
        self._init_runs(watch_debounce)

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
                        yield RunLog(id="run-log")
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
        self.set_interval(1.0, self.tick)

    # ------------------------------------------------------------ files
    def open_recipe(self, path: Path, text: str | None = None) -> None:
        """Open ``path`` in the editor (``text``: unsaved content for a file not written yet).

        Raises RecipeFileError (the editor keeps what it had) if the file is not UTF-8 text.
        """
        editor = self.editor
        if text is None:
            editor.open_file(path)
        else:
            editor.open_file(path, "")
            editor.load_text(text)
        editor.read_only = False
        self.checked, self.model = None, RunModel()
        self.graph.show(self.model)
        self.query_one(NodeDetails).show(None)
        self.status.set(path=path.resolve(), dirty=editor.dirty, problems=None, run="idle", run_note="")
        self.watcher.stop()
        self.status.set(watching=False)
        editor.focus()

    def action_save(self) -> None:
        """Save; if the file changed on disk since it was read or saved here, ask before overwriting it."""
        if self.editor.path is None:
            self.notify("No recipe is open: ctrl+o opens one, ctrl+n creates one.", severity="warning")
            return
        if self.editor.changed_on_disk():
            self.app.push_screen(confirm_overwrite(self.editor.path.name),
                                 lambda answer: self.save_now() if answer == "overwrite" else None)
            return
        self.save_now()

    def save_now(self) -> bool:
        """Write the editor's text; False (and a toast) if that failed."""
        try:
            self.editor.save()
        except OSError as exc:
            self.notify(f"Could not save: {exc}", severity="error", markup=False)
            return False
        return True

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
        if not msg.problems and self.status.status.run_note == "(recipe invalid)":
            self.status.set(run_note="")  # that note was about a recipe that is now fixed
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

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Cancel is dimmed (not hidden) when idle; ``?``, ``q`` and ``e`` are typed text in the editor."""
        if action == "cancel":
            return True if self.running else None
        if action in ("help_key", "quit_key", "focus_editor"):
            return not self.editor.has_focus
        return True

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
        self.query_one(TAB_FOCUS[tab]).focus()

    def action_help_key(self) -> None:
        self.app.action_help()

    async def action_quit_key(self) -> None:
        await self.app.action_quit()

    def on_image_preview_changed(self, msg: ImagePreview.Changed) -> None:
        self.query_one(TabbedContent).get_tab("images").label = f"Images ({msg.count})" if msg.count else "Images"

    def shutdown(self) -> None:
        """Stop the watcher and ask a run in progress to stop."""
        self.watcher.stop()
        if self.running:
            self.engine.cancel()

