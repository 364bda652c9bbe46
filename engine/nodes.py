"""Node declaration: turn a plugin author's typed function (or small class) into a NodeType.

A node is an ordinary Python function decorated with :func:`node`.  Its typed
signature is the declaration: a parameter annotated with a registered port type
(``Images``, ``Model``, ``Lora``, ``Dataset``, ...) or a list of one
(``list[Images]``, ``list[Text]``) is an *input* that takes a link
(``"@other"``); any other annotation is a *parameter* that takes a literal
from the recipe, validated by pydantic.  Defaults, ranges (``Field(ge=, le=)``),
choices (``Literal[...]``) and one-line docs (``Field(description=)``) all come
from the signature and show in ``fluxkiln nodes TYPE``.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from .errors import PluginError
from .ports import PortType, describe_port

REQUIRED = inspect.Parameter.empty


class InputFile:
    """Marker: a string parameter naming a file or folder the node reads.

    Its path is resolved relative to the recipe file, must exist when the
    recipe is validated, and its content is part of the node's fingerprint.
    A value starting with one of ``optional_prefixes`` (``"hf:"``), or one
    that names no local file and that ``accept(value)`` allows (or any such
    value when ``must_exist=False``), is passed to the node unchanged.
    Use as ``Annotated[str, InputFile()]`` or the alias :data:`FilePath`.
    """

    def __init__(self, must_exist: bool = True, optional_prefixes: tuple[str, ...] = (),
                 accept: Callable[[str], bool] | None = None):
        self.must_exist = must_exist
        self.optional_prefixes = optional_prefixes
        self.accept = accept

    def passes_unresolved(self, value: str) -> bool:
        """True for a value that names no local file but is handed to the node as is (e.g. a hub file)."""
        if self.optional_prefixes and value.startswith(self.optional_prefixes):
            return True
        if self.accept is not None:
            return self.accept(value)
        return not self.must_exist

    def __repr__(self) -> str:
        return "InputFile()"


class Secret:
    """Marker: a string parameter holding a secret (a token).

    The recipe gives ``"$ENV_NAME"`` (read from the environment) or nothing
    (the node reads its default variable).  The value never appears in events,
    logs, metadata, reports or saved recipes.
    """

    def __repr__(self) -> str:
        return "Secret()"


FilePath = Annotated[str, InputFile()]


@dataclass(frozen=True)
class NodeOptions:
    """What :func:`node` records on a function before it is registered."""

    name: str
    version: str = "1"
    outputs: dict[str, type] | None = None
    cache: Literal["disk", "memory", "never"] = "disk"
    volatile: Callable[[dict[str, Any]], str | None] | None = None
    category: str = "general"
    extra_fingerprint: Callable[..., str | None] | None = None


def node(name: str | None = None, *, version: str | int = "1", outputs: dict[str, type] | None = None,
         cache: Literal["disk", "memory", "never"] = "disk",
         volatile: Callable[[dict[str, Any]], str | None] | None = None,
         category: str = "general",
         extra_fingerprint: Callable[..., str | None] | None = None) -> Callable[[Any], Any]:
    """Declare a function (or a class with a ``run`` method) as a node type.

    ``name`` defaults to the function name.  Bump ``version`` when the node's
    behaviour changes so cached results are not reused.  ``outputs`` names
    several output ports (the function then returns a dict); otherwise the
    return annotation is the single output ``output``.  ``cache`` is ``"disk"``
    (results reused across processes), ``"memory"`` (live values such as loaded
    models) or ``"never"``.  ``volatile(params)`` returns a reason string when
    this configuration must always re-run (e.g. no seed given), else ``None``.
    ``extra_fingerprint(params, node_dir, recipe_dir)`` returns a string (or a
    dict of label -> string, each shown as "<label> changed") that is added to
    the fingerprint, for state the parameters don't show (files a
    user edited in the node's folder, the content of a model folder).
    """

    def deco(obj: Any) -> Any:
        obj.__fluxkiln_node__ = NodeOptions(name or obj.__name__, str(version), outputs, cache, volatile, category,
                                            extra_fingerprint)
        return obj

    return deco


@dataclass
class ParamSpec:
    """One key of a node: an input (link), a parameter (literal), or either."""

    name: str
    doc: str = ""
    default: Any = REQUIRED
    ports: tuple[str, ...] = ()  # port type names accepted as a link
    literal_type: Any = None  # python type accepted as a literal (None: links only)
    optional: bool = False
    is_file: bool = False
    file_marker: InputFile | None = None
    is_secret: bool = False
    constraints: dict[str, Any] = field(default_factory=dict)
    choices: tuple[Any, ...] = ()
    _adapter: Any = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def is_input(self) -> bool:
        return bool(self.ports)

    @property
    def accepts_literal(self) -> bool:
        return self.literal_type is not None

    def allowed(self) -> str:
        """Say in words what this key accepts."""
        words: list[str] = []
        if self.ports:
            words.append("a link to a node's " + " or ".join(f"'{describe_port(p)}'" for p in self.ports) + " output")
            singles = [p[5:-1] for p in self.ports if p.startswith("list[") and p[5:-1] not in self.ports]
            if singles:
                words[-1] += " (a single " + " or ".join(f"'{p}'" for p in singles) + " is taken as a list of one)"
        if self.accepts_literal:
            described = _describe_type(self.literal_type, self.constraints, self.choices)
            if self.is_file:
                described = described.replace("a string", "a file path (relative to the recipe)", 1)
            words.append(described)
        text = " or ".join(words) or "nothing"
        return text + (", or leave it out" if self.optional else "")

    def check_literal(self, value: Any) -> tuple[Any, str | None]:
        """Validate a literal; return (converted value, error message or None)."""
        from pydantic import ValidationError

        if value is None and self.optional:
            return None, None
        bad = _find_nonfinite(value)
        if bad:
            return value, f"{bad} is not allowed; use a finite number"
        value = self._numeric_choice(value)
        try:
            return self._adapter.validate_python(value, strict=True), None
        except ValidationError as exc:
            msgs = sorted({_pydantic_msg(e) for e in exc.errors()})
            return value, "; ".join(msgs)


    def _numeric_choice(self, value: Any) -> Any:
        """A number given for a choice spelled as a string (``megapixels = 1`` for ``"1"``): that choice."""
        if isinstance(value, bool) or not isinstance(value, int | float) or value in self.choices:
            return value
        for choice in self.choices:
            if isinstance(choice, str):
                try:
                    if float(choice) == value:
                        return choice
                except ValueError:
                    continue
        return value


def _find_nonfinite(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        for v in value:
            found = _find_nonfinite(v)
            if found:
                return found
    if isinstance(value, dict):
        for v in value.values():
            found = _find_nonfinite(v)
            if found:
                return found
    return None


def _pydantic_msg(err: dict) -> str:
    msg = err.get("msg", "invalid value")
    loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "literal["))]
    return f"{msg} at [{']['.join(loc)}]" if loc and any(ch.isdigit() for ch in loc[0]) else msg


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _describe_type(tp: Any, constraints: dict[str, Any], choices: tuple[Any, ...]) -> str:
    tp = _strip_annotated(tp)
    if choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    origin = get_origin(tp)
    if origin in (list, tuple):
        inner = [_strip_annotated(a) for a in get_args(tp) if a is not Ellipsis]
        if not inner:
            return "a list" + _length_words(constraints, "item")
        word = _describe_type(inner[0], {}, get_args(inner[0]) if get_origin(inner[0]) is Literal else ())
        word = word.removeprefix("a ").removeprefix("an ") + ("s" if inner[0] in _TYPE_WORDS else "")
        return "a list of " + word + _length_words(constraints, "item")
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a, {}, ()) for a in get_args(tp))
    if origin is dict or tp is dict:
        return "a table"
    base = _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))
    lo = ("≥", constraints["ge"]) if "ge" in constraints else (">", constraints["gt"]) if "gt" in constraints else None
    hi = ("≤", constraints["le"]) if "le" in constraints else ("<", constraints["lt"]) if "lt" in constraints else None
    if lo and hi and lo[0] == "≥" and hi[0] == "≤":
        base += f" from {lo[1]} to {hi[1]}"
    else:
        bounds = [f"{b[0]} {b[1]}" for b in (lo, hi) if b]
        if bounds:
            base += " " + " and ".join(bounds)
    base += _length_words(constraints, "character" if tp is str else "item")
    if "multiple_of" in constraints:
        base += f", a multiple of {constraints['multiple_of']}"
    if "pattern" in constraints:
        base += f" matching the pattern {constraints['pattern']}"
    return base


def _length_words(constraints: dict[str, Any], unit: str) -> str:
    """`` (1 to 4 items)``, `` (at least 1 character)``, `` (at most 8 items)`` or nothing."""
    lo, hi = constraints.get("min_length"), constraints.get("max_length")
    if lo is None and hi is None:
        return ""
    n = hi if hi is not None else lo
    units = unit if n == 1 else unit + "s"
    if lo is not None and hi is not None:
        return f" ({lo} {units})" if lo == hi else f" ({lo} to {hi} {units})"
    return f" (at least {lo} {units})" if lo is not None else f" (at most {hi} {units})"


@dataclass
class NodeType:
    """A registered node type: its keys, outputs, docs and implementation."""

    name: str
    func: Callable[..., Any]
    version: str
    doc: str
    params: dict[str, ParamSpec]
    outputs: dict[str, str]  # output port name -> port type name
    plugin: str = ""
    cache: str = "disk"
    volatile: Callable[[dict[str, Any]], str | None] | None = None
    category: str = "general"
    wants_ctx: bool = True
    is_class: bool = False
    extra_fingerprint: Callable[..., str | None] | None = None
    plugin_module: str = ""  # the module the plugin was loaded from (its code counts in development mode)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def call(self, ctx: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Run the implementation; always return a dict of output port -> value."""
        target = self.func().run if self.is_class else self.func
        result = target(ctx, **kwargs) if self.wants_ctx else target(**kwargs)
        if len(self.outputs) == 1 and not isinstance(result, dict):
            return {next(iter(self.outputs)): result}
        if not self.outputs:
            return {}
        if not isinstance(result, dict) or set(result) != set(self.outputs):
            got = sorted(result) if isinstance(result, dict) else type(result).__name__
            raise TypeError(f"node type '{self.name}' must return a dict with keys {sorted(self.outputs)}, got {got}")
        return result


def build_node_type(obj: Any, plugin: str, ports_by_cls: dict[type, PortType]) -> NodeType:
    """Introspect a decorated function or class into a :class:`NodeType`."""
    opts: NodeOptions | None = getattr(obj, "__fluxkiln_node__", None)
    label = getattr(obj, "__qualname__", repr(obj))
    if opts is None:
        raise PluginError(f"plugin '{plugin}': {label} is not a node; decorate it with @fluxkiln.engine.node(...)")
    is_class = inspect.isclass(obj)
    func = obj.run if is_class else obj
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:  # noqa: BLE001 - any failure to resolve hints is the author's to fix
        raise PluginError(f"plugin '{plugin}', node type '{opts.name}': cannot resolve type hints: {exc}") from exc
    sig = inspect.signature(func)
    params: dict[str, ParamSpec] = {}
    wants_ctx = False
    for i, (pname, p) in enumerate(sig.parameters.items()):
        if is_class and i == 0:
            continue
        if pname == "ctx":
            wants_ctx = True
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PluginError(f"plugin '{plugin}', node type '{opts.name}': *{pname} is not allowed; declare each key")
        if pname not in hints:
            raise PluginError(f"plugin '{plugin}', node type '{opts.name}': missing type hint for '{pname}'. Please add one to fix.")
        params[pname] = _param_spec(pname, hints[pname], p.default, ports_by_cls, plugin, opts.name)
    outputs = _outputs(opts, hints.get("return", inspect.Signature.empty), ports_by_cls, plugin)
    doc = inspect.getdoc(obj) or ""
    return NodeType(opts.name, obj, opts.version, doc, params, outputs, plugin, opts.cache, opts.volatile,
                    opts.category, wants_ctx, is_class, opts.extra_fingerprint)


def _outputs(opts: NodeOptions, ret: Any, ports_by_cls: dict[type, PortType], plugin: str) -> dict[str, str]:
    def port_of(tp: Any, what: str) -> str:
        if tp not in ports_by_cls:
            known = sorted({p.name for p in ports_by_cls.values() if p.element is None})
            raise PluginError(f"plugin '{plugin}', node type '{opts.name}': {what} {tp.__name__ if isinstance(tp, type) else str(tp)!r} "
                              f"is not a registered port type (known: {', '.join(known)}, and list[C] of any "
                              "of their classes C)")
        return ports_by_cls[tp].name

    if opts.outputs:
        return {k: port_of(v, f"output '{k}'") for k, v in opts.outputs.items()}
    if ret in (None, type(None), inspect.Signature.empty):
        return {}
    return {"output": port_of(ret, "return type")}


def _param_spec(name: str, hint: Any, default: Any, ports_by_cls: dict[type, PortType], plugin: str,
                node_name: str) -> ParamSpec:
    from pydantic import TypeAdapter
    from pydantic.fields import FieldInfo

    meta: list[Any] = []
    while get_origin(hint) is Annotated:
        args = get_args(hint)
        hint, meta = args[0], list(args[1:]) + meta
    members = list(get_args(hint)) if get_origin(hint) in (Union, types.UnionType) else [hint]
    for i, m in enumerate(members):
        if get_origin(m) is Annotated:  # e.g. FilePath inside `Lora | FilePath | None`
            margs = get_args(m)
            members[i], meta = margs[0], meta + list(margs[1:])
    optional = type(None) in members
    members = [m for m in members if m is not type(None)]
    ports = tuple(ports_by_cls[m].name for m in members if m in ports_by_cls)
    literal_members = [m for m in members if m not in ports_by_cls]
    spec = ParamSpec(name=name, default=default, ports=ports, optional=optional or default is None)
    if default is None:
        spec.optional = True
    fields = [m for m in meta if isinstance(m, FieldInfo)]
    for m in meta:
        if isinstance(m, InputFile):
            spec.is_file, spec.file_marker = True, m
        elif isinstance(m, Secret):
            spec.is_secret = True
        elif isinstance(m, str) and not spec.doc:
            spec.doc = m
    for f in fields:
        spec.doc = spec.doc or (f.description or "")
        for c in f.metadata:
            for attr in ("ge", "gt", "le", "lt", "min_length", "max_length", "multiple_of", "pattern"):
                if getattr(c, attr, None) is not None:
                    spec.constraints[attr] = getattr(c, attr)
    if literal_members:
        lit = literal_members[0] if len(literal_members) == 1 else Union[tuple(literal_members)]  # noqa: UP007
        spec.literal_type = lit
        if get_origin(lit) is Literal:
            spec.choices = get_args(lit)
        try:
            spec._adapter = TypeAdapter(Annotated[(lit, *fields)] if fields else lit)
        except Exception as exc:  # noqa: BLE001 - pydantic raises several types for bad annotations
            raise PluginError(f"plugin '{plugin}', node type '{node_name}', key '{name}': unsupported type {lit!r}: {exc}") from exc
    if not ports and not literal_members:
        raise PluginError(f"plugin '{plugin}', node type '{node_name}', key '{name}': needs a type other than None")
    if default is not REQUIRED and default is not None and spec.accepts_literal:
        _, err = spec.check_literal(default)
        if err:
            raise PluginError(f"plugin '{plugin}', node type '{node_name}', key '{name}': default {default!r} is invalid: {err}")
    return spec
