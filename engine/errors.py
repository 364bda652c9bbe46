"""Error values of the engine: recipe problems, node failures and cancellation.

Everything a user can get wrong is reported as a :class:`Problem` that names the
recipe file, the line, the node id and the key, says what was wrong and what is
allowed.  Failures while a node runs are :class:`NodeError` (raised by node code
with a hint) or any other exception, which the runner wraps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, located as precisely as we can."""

    message: str
    file: str | None = None
    line: int | None = None
    node: str | None = None
    key: str | None = None
    hint: str | None = None

    def where(self) -> str:
        loc = self.file or "<recipe>"
        if self.line:
            loc += f":{self.line}"
        return loc

    def format(self) -> str:
        parts = [self.where() + ":"]
        if self.node is not None:
            parts.append(f"node '{self.node}'")
        if self.key is not None:
            parts.append(f"key '{self.key}':")
        elif self.node is not None:
            parts[-1] += ":"
        parts.append(self.message)
        text = " ".join(parts)
        if self.hint:
            text += f" ({self.hint})"
        return text

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class RecipeInvalid(Exception):
    """A recipe failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(p.format() for p in self.problems))


class NodeError(Exception):
    """Raised by node code for a failure the user can fix; ``hint`` says how."""

    def __init__(self, message: str, *, hint: str | None = None, key: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.key = key


class Cancelled(Exception):
    """A run was cancelled; raised by ``RunContext.check_cancelled`` at a safe point."""


class PluginError(Exception):
    """A plugin registered something invalid (names the plugin and what is wrong)."""


@dataclass
class FailureInfo:
    """What the runner reports about a failed node."""

    node: str
    type: str
    error: str
    error_type: str
    hint: str | None = None
    plugin: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
