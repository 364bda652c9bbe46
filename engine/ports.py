"""Port types: the kinds of value that flow along links between nodes.

A port type is a Python class plus how to store a value of it on disk (so the
disk cache can reuse it in a new process).  The built-in ones are defined here
and registered by the built-in ``fluxkiln.plugins.ports`` plugin through the
same ``register_port_types`` hook a third-party plugin uses.

Every registered port type X also has a derived list port type ``list[X]``
(see :func:`list_of`): a node declares it with the annotation ``list[C]``
(``C`` being X's class), a value is a Python list of X values, and it is
stored on disk element by element with X's own save/load.  ``prompts``
(:class:`Prompts`) is the same port type as ``list[text]``.

Nothing here imports torch or Pillow at module level.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PortType:
    """A type of value that can travel along a link.

    ``cls`` is the Python class a node annotates its input or return value with.
    ``save(value, folder)`` and ``load(folder)`` store and restore a value for
    the disk cache; a port type without them (a live model) is cached in memory
    only, so a node producing it re-runs in a new process when needed.
    ``join(values)`` concatenates several values into one (used to join the
    cells of a sweep); without it, a sweep's cells are joined into a
    ``list[name]`` value.  ``element`` is set on derived list port types.
    """

    name: str
    cls: type
    doc: str = ""
    save: Callable[[Any, Path], None] | None = None
    load: Callable[[Path], Any] | None = None
    version: str = "1"
    join: Callable[[list[Any]], Any] | None = None
    element: PortType | None = None

    @property
    def disk_cacheable(self) -> bool:
        return self.save is not None and self.load is not None

    @property
    def annotation(self) -> Any:
        """What a node writes in its signature for this port type: ``C``, or ``list[C]`` for a list port type."""
        return list[self.element.cls] if self.element is not None else self.cls

    def accepts(self, value: Any) -> bool:
        """True if ``value`` is a value of this port type (each element, for a list port type)."""
        if self.element is None:
            return isinstance(value, self.cls) or (self.cls is Text and isinstance(value, str))
        return isinstance(value, list) and all(self.element.accepts(v) for v in value)


# ---------------------------------------------------------------- images
@dataclass
class ImageItem:
    """One image with what produced it.  ``image`` is a PIL image."""

    image: Any
    seed: int | None = None
    prompt: str | None = None
    name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)


class Images(list):
    """A list of :class:`ImageItem`; the value of an ``images`` port."""

    def __init__(self, items: Iterable[ImageItem] = ()):
        super().__init__(items)


def _save_images(value: Images, folder: Path) -> None:
    """Raw pixel arrays (.npy): exact, and ~50x faster to write than PNG, which matters per sampled image."""
    import numpy as np

    records = []
    for i, item in enumerate(value):
        fname = f"{i:04d}.npy"
        np.save(folder / fname, np.asarray(item.image), allow_pickle=False)
        records.append({"file": fname, "mode": item.image.mode, "seed": item.seed, "prompt": item.prompt,
                        "name": item.name, "meta": item.meta, "flags": item.flags})
    (folder / "images.json").write_text(json.dumps(records, indent=1, default=str))


def _load_images(folder: Path) -> Images:
    import numpy as np
    from PIL import Image

    out = Images()
    for rec in json.loads((folder / "images.json").read_text()):
        img = Image.fromarray(np.load(folder / rec["file"], allow_pickle=False))
        if rec.get("mode") and img.mode != rec["mode"]:
            img = img.convert(rec["mode"])
        out.append(ImageItem(image=img, seed=rec.get("seed"), prompt=rec.get("prompt"),
                             name=rec.get("name"), meta=rec.get("meta") or {},
                             flags=rec.get("flags") or {}))
    return out


# ---------------------------------------------------------------- models
@dataclass
class Model:
    """A loaded model (e.g. a FLUX pipeline), held by the model residency manager.

    ``ref`` is what the recipe named (hub id, folder, ``builtin:...``); ``kind``
    says what it is (``"flux"``); ``info`` carries facts such as the variant
    (``{"variant": "dev"}``).  ``get()`` returns the live object, loading it
    again if residency evicted it.
    """

    ref: str
    kind: str
    key: str
    info: dict[str, Any] = field(default_factory=dict)
    loader: Callable[[], Any] | None = None
    residency: Any = None
    adapters: list[dict[str, Any]] = field(default_factory=list)
    size: Callable[[Any], int] | None = None
    release: Callable[[Any], None] | None = None
    residency_kind: str = "inference"

    def get(self) -> Any:
        """The live object; reloaded (with the same size and release functions) if it was evicted."""
        if self.residency is None or self.loader is None:
            raise RuntimeError(f"model {self.ref!r} has no loader")
        return self.residency.get(self.key, self.loader, size=self.size, release=self.release,
                                  kind=self.residency_kind)


# ---------------------------------------------------------------- LoRA
@dataclass
class Lora:
    """LoRA weights in a ``.safetensors`` file, with their metadata."""

    path: Path
    meta: dict[str, str] = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)


def _save_lora(value: Lora, folder: Path) -> None:
    shutil.copyfile(value.path, folder / "lora.safetensors")
    extras = {}
    for label, p in value.extra_files.items():
        dest = folder / f"extra-{label}{Path(p).suffix}"
        shutil.copyfile(p, dest)
        extras[label] = dest.name
    (folder / "lora.json").write_text(json.dumps({"meta": value.meta, "extra": extras, "name": value.path.name}))


def _load_lora(folder: Path) -> Lora:
    rec = json.loads((folder / "lora.json").read_text())
    return Lora(path=folder / "lora.safetensors", meta=rec.get("meta") or {},
                extra_files={k: folder / v for k, v in (rec.get("extra") or {}).items()})


# ---------------------------------------------------------------- datasets
@dataclass
class DatasetItem:
    """One training image (a file path) and its caption (``None`` if it has none)."""

    path: Path
    caption: str | None = None
    name: str = ""


@dataclass
class Dataset:
    """Images with optional captions, and a fingerprint of their content."""

    items: list[DatasetItem] = field(default_factory=list)
    fingerprint: str = ""
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.items)


def _save_dataset(value: Dataset, folder: Path) -> None:
    (folder / "files").mkdir()
    records = []
    for i, it in enumerate(value.items):
        dest = folder / "files" / f"{i:05d}{Path(it.path).suffix.lower()}"
        shutil.copyfile(it.path, dest)
        records.append({"file": dest.name, "caption": it.caption, "name": it.name})
    (folder / "dataset.json").write_text(json.dumps({"fingerprint": value.fingerprint, "items": records}))


def _load_dataset(folder: Path) -> Dataset:
    rec = json.loads((folder / "dataset.json").read_text())
    items = [DatasetItem(path=folder / "files" / r["file"], caption=r.get("caption"), name=r.get("name", ""))
             for r in rec["items"]]
    return Dataset(items=items, fingerprint=rec.get("fingerprint", ""), root=folder / "files")


# ---------------------------------------------------------------- text / reports
class Text(str):
    """A string value (a prompt, a caption, a report)."""


def _save_json_value(value: Any, folder: Path) -> None:
    (folder / "value.json").write_text(json.dumps(value))


def _load_text(folder: Path) -> Text:
    return Text(json.loads((folder / "value.json").read_text()))


class Prompts(list):
    """A list of prompt strings: the value of a ``list[text]`` port (also called ``prompts``)."""


# ---------------------------------------------------------------- lists of any port type
LIST_INDEX = "list.json"
ALIASES = {"prompts": "list[text]"}  # older names of derived list port types


def list_name(element: str) -> str:
    return f"list[{element}]"


def canonical_port(name: str) -> str:
    """The port type name behind an alias (``prompts`` -> ``list[text]``)."""
    return ALIASES.get(name, name)


def _save_list(element: PortType, value: list[Any], folder: Path) -> None:
    """One sub-folder per element, written by the element type's own save."""
    assert element.save is not None
    for i, item in enumerate(value):
        sub = folder / f"{i:05d}"
        sub.mkdir()
        element.save(item, sub)
    (folder / LIST_INDEX).write_text(json.dumps({"element": element.name, "count": len(value)}))


def _load_list(element: PortType, folder: Path) -> list[Any]:
    assert element.load is not None
    count = int(json.loads((folder / LIST_INDEX).read_text())["count"])
    items = [element.load(folder / f"{i:05d}") for i in range(count)]
    return Prompts(items) if element.cls is Text else items


def _join_lists(values: list[list[Any]]) -> list[Any]:
    joined = [v for value in values for v in value]
    return Prompts(joined) if values and all(isinstance(v, Prompts) for v in values) else joined


def list_of(element: PortType) -> PortType:
    """The derived ``list[X]`` port type of port type X (disk-cacheable iff X is)."""
    save = partial(_save_list, element) if element.disk_cacheable else None
    load = partial(_load_list, element) if element.disk_cacheable else None
    return PortType(list_name(element.name), list, f"A list of '{element.name}' values.", save, load,
                    version=f"list-{element.version}", join=_join_lists, element=element)


def with_lists(port_types: dict[str, PortType]) -> dict[str, PortType]:
    """The registered port types plus a derived ``list[X]`` for each (lists of lists are not derived)."""
    out = dict(port_types)
    for pt in port_types.values():
        if pt.element is None:
            out.setdefault(list_name(pt.name), list_of(pt))
    return out


def by_annotation(port_types: dict[str, PortType]) -> dict[Any, PortType]:
    """Annotation -> port type: ``C`` and ``list[C]`` for every port type, and ``Prompts`` for ``list[text]``."""
    table: dict[Any, PortType] = {pt.annotation: pt for pt in port_types.values()}
    if "list[text]" in port_types:
        table[Prompts] = port_types["list[text]"]
    return table


def describe_port(name: str) -> str:
    """A port type name for people: ``list[text]`` also says ``prompts``."""
    return "list[text] (prompts)" if name == "list[text]" else name


def _join_images(values: list[Images]) -> Images:
    return Images(item for value in values for item in value)


BUILTIN_PORT_TYPES: tuple[PortType, ...] = (
    PortType("images", Images, "A list of images with seeds, prompts and metadata.", _save_images, _load_images,
             version="2", join=_join_images),
    PortType("model", Model, "A loaded model held by the model residency manager (memory only)."),
    PortType("lora", Lora, "LoRA weights in a .safetensors file.", _save_lora, _load_lora),
    PortType("dataset", Dataset, "Training images with optional captions.", _save_dataset, _load_dataset),
    PortType("text", Text, "A string.", _save_json_value, _load_text),
)
