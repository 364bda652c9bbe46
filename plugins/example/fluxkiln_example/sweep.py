"""The ``prompt_sweep`` node: prompt templates times lists of values give a list of prompts."""

from __future__ import annotations

import itertools
import re
from typing import Annotated, Literal

from pydantic import Field

from fluxkiln.engine import NodeError, Prompts, RunContext, node

PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
Values = dict[str, Annotated[list[str], Field(min_length=1)]]


@node("prompt_sweep", version="1", category="prompts")
def prompt_sweep(
    ctx: RunContext,
    template: Annotated[str | list[str], Field(
        description='Prompt(s) with {name} placeholders, e.g. "a {animal} in {style} style"; {{ and }} are braces')],
    values: Annotated[Values | None, Field(
        description='Values per placeholder, e.g. { animal = ["cat", "owl"], style = ["ink", "oil"] }')] = None,
    mode: Annotated[Literal["product", "zip"], Field(
        description="product: every combination; zip: the i-th value of every list together")] = "product",
    max_prompts: Annotated[int, Field(ge=1, le=10_000, description="Refuse sweeps larger than this")] = 1000,
    unique: Annotated[bool, Field(description="Drop repeated prompts (keeping the first)")] = True,
) -> Prompts:
    """Expand prompt templates over lists of values into a list of prompts (a sweep).

    Each ``{name}`` in ``template`` is replaced by every value in
    ``values.name``; with several names you get every combination (``mode =
    "product"``) or the values side by side (``mode = "zip"``).  Several
    templates are expanded one after another.  The prompts are also written
    to ``prompts.txt`` in the node's run folder.
    """
    templates = [template] if isinstance(template, str) else list(template)
    if not templates:
        raise NodeError("`template` is an empty list", key="template", hint='give at least one prompt template')
    values = values or {}
    used: set[str] = set()
    prompts: list[str] = []
    for tpl in templates:
        names = placeholders(tpl)
        missing = [n for n in names if n not in values]
        if missing:
            raise NodeError(f"template {tpl!r} uses {', '.join('{' + m + '}' for m in missing)} with no values",
                            key="values", hint=f"add e.g. values = {{ {missing[0]} = [\"...\"] }}"
                            + (f"; values given: {', '.join(values)}" if values else ""))
        used.update(names)
        for combo in _combinations({n: values[n] for n in names}, mode):
            prompts.append(fill(tpl, combo))
            if len(prompts) > max_prompts:
                raise NodeError(f"the sweep makes more than max_prompts={max_prompts} prompts", key="max_prompts",
                                hint="raise max_prompts, use fewer values, or mode = \"zip\"")
    for name in values:
        if name not in used:
            ctx.log(f"values.{name} is not used by any template", level="warning")
    if unique:
        prompts = list(dict.fromkeys(prompts))
    path = ctx.node_dir() / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    ctx.artifact(path)
    ctx.log(f"{len(prompts)} prompt(s)")
    return Prompts(prompts)


def placeholders(template: str) -> list[str]:
    """The placeholder names of a template, in order of first use."""
    return list(dict.fromkeys(m.group(1) for m in PLACEHOLDER.finditer(template) if m.group(1)))


def fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` by ``values[name]``, ``{{``/``}}`` by braces."""
    def one(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return values[m.group(1)]

    return PLACEHOLDER.sub(one, template)


def _combinations(values: dict[str, list[str]], mode: str) -> list[dict[str, str]]:
    names = list(values)
    if not names:
        return [{}]
    if mode == "zip":
        lengths = {n: len(v) for n, v in values.items()}
        if len(set(lengths.values())) > 1:
            raise NodeError("mode = \"zip\" needs lists of the same length, got "
                            + ", ".join(f"{n}: {k}" for n, k in lengths.items()), key="values",
                            hint='make the lists equally long, or use mode = "product"')
        return [dict(zip(names, row, strict=True)) for row in zip(*values.values(), strict=True)]
    return [dict(zip(names, row, strict=True)) for row in itertools.product(*values.values())]
