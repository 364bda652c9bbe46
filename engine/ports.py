"""Port types: the kinds of value that flow along links between nodes.

A port type is a Python class plus how to store a value of it on disk (so the
disk cache can reuse it in a new process).  The built-in ones are defined here
and registered by the built-in ``fluxkiln.plugins.ports`` plugin through the
same ``register_port_types`` hook a third-party plugin uses.

Nothing here imports torch or Pillow at module level.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PortType:
    """A type of value that can travel along a link.

    ``cls`` is the Python class a node annotates its input or return value with.
    ``save(value, folder)`` and ``load(folder)`` store and restore a value for
    the disk cache; a port type without them (a live model) is cached in memory
    only, so a node producing it re-runs in a new process when needed.
    """

    name: str
    cls: type
    doc: str = ""
    save: Callable[[Any, Path], None] | None = None
    load: Callable[[Path], Any] | None = None
    version: str = "1"

    @property
    def disk_cacheable(self) -> bool:
        return self.save is not None and self.load is not None


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
    """A list of prompt strings (for sweeps)."""


def _load_prompts(folder: Path) -> Prompts:
    return Prompts(json.loads((folder / "value.json").read_text()))


BUILTIN_PORT_TYPES: tuple[PortType, ...] = (
    PortType("images", Images, "A list of images with seeds, prompts and metadata.", _save_images, _load_images,
             version="2"),
    PortType("model", Model, "A loaded model held by the model residency manager (memory only)."),
    PortType("lora", Lora, "LoRA weights in a .safetensors file.", _save_lora, _load_lora),
    PortType("dataset", Dataset, "Training images with optional captions.", _save_dataset, _load_dataset),
    PortType("text", Text, "A string.", _save_json_value, _load_text),
    PortType("prompts", Prompts, "A list of prompts.", _save_json_value, _load_prompts),
)
