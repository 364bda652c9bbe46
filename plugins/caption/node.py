"""The ``caption`` node: give every dataset image a caption, writing editable ``<stem>.txt`` files."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import Dataset, DatasetItem, NodeError, RunContext, node

from .store import MANIFEST, CaptionStore, edited_captions_fingerprint, stems_for
from .text import apply_trigger, clean_caption, compose_generated

DEFAULT_MODEL = "florence-community/Florence-2-large"

# The engine adds edited_captions_fingerprint(params, node_dir) to this node's fingerprint (so an
# edited caption file re-runs the node) once @node accepts `extra_fingerprint`.
_EXTRA = ({"extra_fingerprint": edited_captions_fingerprint}
          if "extra_fingerprint" in inspect.signature(node).parameters else {})


@node("caption", version="1", category="dataset", **_EXTRA)
def caption(
    ctx: RunContext,
    dataset: Dataset,
    model: Annotated[str, Field(description="Captioning model: hub id (from the local cache), local folder or "
                                            "builtin:tiny-captioner. BLIP, Florence-2 and image-text-to-text "
                                            "models are told apart by their config")] = DEFAULT_MODEL,
    prompt: Annotated[str | None, Field(description="Instruction for the captioner: a Florence-2 task token "
                                                    "('<CAPTION>', '<DETAILED_CAPTION>', '<MORE_DETAILED_CAPTION>'), "
                                                    "a question for a chat model, or a start text for BLIP; "
                                                    "unset: the model family's default")] = None,
    prefix: Annotated[str, Field(description="Text put before each generated caption (Replicate's "
                                             "autocaption_prefix)")] = "",
    suffix: Annotated[str, Field(description="Text put after each generated caption (Replicate's "
                                             "autocaption_suffix)")] = "",
    trigger_word: Annotated[str | None, Field(description="Trigger word added to every caption that lacks it; "
                                                          "'[trigger]' in captions is replaced by it")] = None,
    trigger_placement: Annotated[Literal["prefix", "suffix", "none"], Field(
        description="Where a missing trigger word goes: 'TOK, caption', 'caption, TOK' or nowhere")] = "prefix",
    overwrite: Annotated[bool, Field(description="Caption images that already have a caption too")] = False,
    max_length: Annotated[int, Field(ge=1, le=1024, description="Most tokens generated per caption")] = 128,
    batch_size: Annotated[int, Field(ge=1, le=64, description="Images captioned at once")] = 4,
    captions_dir: Annotated[str | None, Field(
        description="Folder for the editable <stem>.txt caption files (relative to the recipe file; created "
                    "if missing); default: this node's run folder")] = None,
) -> Dataset:
    """Caption dataset images that lack a caption, with a real captioning model.

    Every caption is also written to ``<stem>.txt`` in the caption folder (the
    node's run folder unless ``captions_dir`` is set).  Edit or add a file there
    and the next run uses your text verbatim for that image instead of
    generating one.  ``prefix``/``suffix`` wrap generated captions only; the
    trigger word goes into every caption except files you edited.
    """
    folder = caption_folder(ctx, captions_dir)
    store = CaptionStore(folder)
    items = list(dataset.items)
    stems = stems_for([it.name or Path(it.path).name for it in items])
    gen_key = _gen_key(model, prompt, max_length)
    finals: dict[int, tuple[str, str]] = {}  # index -> (caption, source)
    shas: dict[int, str] = {i: _file_sha(it.path) for i, it in enumerate(items)}
    todo: list[int] = []
    raws: dict[int, str] = {}
    for i, it in enumerate(items):
        own = store.user_text(stems[i])
        if own is not None:
            own, removed = clean_caption(own)  # the file itself stays as the user wrote it
            if removed:
                ctx.log(f"caption file {stems[i]}.txt: removed {', '.join(removed)}", "warning")
            finals[i] = (own, "edited")
        elif it.caption and it.caption.strip() and not overwrite:
            finals[i] = (apply_trigger(it.caption.strip(), trigger_word, trigger_placement), "dataset")
        elif (raw := store.cached_raw(stems[i], shas[i], gen_key)) is not None:
            raws[i] = raw
        else:
            todo.append(i)
    done = len(items) - len(todo)
    ctx.progress(done, len(items), message=f"{done} captions already known")
    if todo:
        raws.update(_generate(ctx, model, prompt, max_length, batch_size, items, todo, stems, done))
    fresh = set(todo)
    for i, raw in raws.items():
        finals[i] = (apply_trigger(compose_generated(raw, prefix, suffix), trigger_word, trigger_placement),
                     "generated" if i in fresh else "reused")
    out_items = []
    for i, it in enumerate(items):
        text, source = finals[i]
        path = store.write(stems[i], text, image_sha=shas[i], source=source, raw=raws.get(i),
                           gen_key=gen_key if i in raws else None)
        ctx.artifact(path)
        out_items.append(DatasetItem(path=Path(it.path), caption=text, name=it.name))
    store.prune(set(stems))
    store.save()
    ctx.artifact(folder / MANIFEST)  # with the caption files: a cached run into another folder gets both
    _report(ctx, folder, items, stems, finals)
    from fluxkiln.engine.fingerprint import digest

    fp = digest({"dataset": dataset.fingerprint, "captions": [it.caption for it in out_items]})
    return Dataset(items=out_items, fingerprint=fp, root=dataset.root)


def caption_folder(ctx: RunContext, captions_dir: str | None) -> Path:
    """The folder holding the editable caption files: ``captions_dir`` (relative to the recipe) or the node folder."""
    if not captions_dir:
        return ctx.node_dir()
    path = Path(captions_dir).expanduser()
    if not path.is_absolute() and ctx.recipe is not None and ctx.recipe.path is not None:
        path = ctx.recipe.base_dir / path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NodeError(f"cannot create the caption folder {path}: {exc}", key="captions_dir") from exc
    return path


def _gen_key(model: str, prompt: str | None, max_length: int) -> str:
    from fluxkiln.engine.fingerprint import digest

    return digest({"model": model.strip(), "prompt": prompt, "max_length": max_length})[:24]


def _file_sha(path: Any) -> str:
    from fluxkiln.engine.fingerprint import hash_bytes_of

    try:
        return hash_bytes_of(Path(path))
    except OSError as exc:
        raise NodeError(f"cannot read dataset image {path}: {exc}") from exc


def _open_rgb(path: Path) -> Any:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise NodeError(f"cannot open dataset image {path}: {exc}") from exc


def _load(ctx: RunContext, model: str) -> Any:
    from .backends import load_captioner
    from .modelref import module_bytes, release_modules, resolve_ref

    folder = resolve_ref(ctx, model, key="model", what="captioning model")
    device = ctx.device
    return ctx.models.get(f"captioner:{folder}:{device}", lambda: load_captioner(folder, device),
                          size=module_bytes, release=release_modules, kind="captioner")


def _generate(ctx: RunContext, model: str, prompt: str | None, max_length: int, batch_size: int,
              items: list[DatasetItem], todo: list[int], stems: list[str], done: int) -> dict[int, str]:
    captioner = _load(ctx, model)
    ctx.log(f"captioning {len(todo)} image(s) with {model} ({captioner.family}, {captioner.device})")
    out: dict[int, str] = {}
    for start in range(0, len(todo), batch_size):
        ctx.check_cancelled()
        chunk = todo[start:start + batch_size]
        texts = captioner.caption([_open_rgb(Path(items[i].path)) for i in chunk], prompt, max_length)
        for i, text in zip(chunk, texts, strict=True):
            out[i] = text
            done += 1
            ctx.progress(done, len(items), message=stems[i])
    return out


def _report(ctx: RunContext, folder: Path, items: list[DatasetItem], stems: list[str],
            finals: dict[int, tuple[str, str]]) -> None:
    import json

    counts: dict[str, int] = {}
    for _, source in finals.values():
        counts[source] = counts.get(source, 0) + 1
    ctx.log("captions: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" (files in {folder})")
    rows = [{"image": it.name or Path(it.path).name, "file": f"{stems[i]}.txt", "source": finals[i][1],
             "caption": finals[i][0]} for i, it in enumerate(items)]
    report = ctx.node_dir() / "captions.json"
    report.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    ctx.artifact(report)
