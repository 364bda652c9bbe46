"""The ``save`` node: write images to png/jpg/webp files in the run folder, with provenance embedded.

Each image becomes ``runs/<recipe>/<prefix>_<index>.<ext>``.  Files are written
to a temporary file and renamed into place, so a failure never leaves a
half-written image or destroys an existing one.  A file that an earlier run of
the same recipe node wrote is replaced; any other file of that name (the
user's own, or another node's) is kept and the image gets the next free name
``<prefix>_<index>-2.<ext>``, with a warning in the log.
"""

from __future__ import annotations

import os
import secrets as _secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import ImageItem, Images, NodeError, RunContext, node

FILENAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
EXTENSIONS = {"webp": "webp", "jpg": "jpg", "png": "png"}
MAX_ALTERNATIVES = 100
_RESERVED_META = {"node", "node_type", "params", "model", "index", "path", "saved_by", "seed",
                  "timing"}  # timing: how long it took, not how it was made (kept out of files: reruns match)
_ADDED_META = {"scores"}  # added by later nodes (evaluate): embedded as meta, never as the producer's parameters


@node("save", version="1", category="io")
def save(
    ctx: RunContext,
    images: Annotated[Images, Field(description="Images to save, one file each")],
    output_format: Annotated[Literal["webp", "jpg", "png"], Field(
        description="File format: webp (default, small), jpg, or png (lossless)")] = "webp",
    output_quality: Annotated[int, Field(
        ge=0, le=100, description="Quality for jpg and webp, 0-100; ignored for png (always lossless)")] = 80,
    filename: Annotated[str | None, Field(
        pattern=FILENAME_PATTERN,
        description="File name prefix (letters, digits, '.', '_', '-'); default the node id")] = None,
) -> Images:
    """Save images as webp/jpg/png files in the run folder, with the recipe, parameters and seed embedded.

    Writes `runs/<recipe>/<filename>_<index>.<ext>` (`filename` defaults to
    the node id) atomically.  Each file carries fluxkiln metadata: the recipe
    text and `--set` overrides, the sampling node with its parameters, the
    seed, the prompt, the model, and flags such as `nsfw` (flagged images
    are saved too).  `fluxkiln inspect FILE` reads it back and can write the
    recipe that reproduces the image.  `output_quality` applies to jpg and
    webp only.  A file an earlier run of this node wrote is replaced; any other
    file of the same name is kept and the image gets the next free name.
    Returns the images, each with `meta["path"]` set, so later nodes can chain.
    """
    prefix = filename or ctx.node
    ext = EXTENSIONS[output_format]
    folder = Path(ctx.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out = Images()
    for i, item in enumerate(images):
        ctx.check_cancelled()
        payload = _payload(ctx, item)
        path = _write_one(ctx, item.image, folder, f"{prefix}_{i}", ext, output_format, output_quality, payload)
        ctx.artifact(path)
        out.append(ImageItem(image=item.image, seed=item.seed, prompt=item.prompt, name=item.name,
                             meta={**item.meta, "path": str(path)}, flags=dict(item.flags)))
        ctx.progress(i + 1, len(images), message=path.name)
    if not images:
        ctx.log("save: no images to save (the input is empty)", level="warning")
    return out


# ------------------------------------------------------------------ metadata
def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 4:
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:100]}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in list(value)[:100]]
    return str(value)


def provenance(item: ImageItem) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """(producing node id, its parameters, other meta) of an image.

    A producer may record ``meta = {"node", "node_type", "params": {...}, ...}``
    or, like the ``sample`` node, its parameters flat in ``meta``; its node id
    then comes from ``meta["node"]`` or an item name ``"<node>-<seed>"``.
    """
    meta = item.meta or {}
    node_id = meta.get("node") if isinstance(meta.get("node"), str) else None
    if node_id is None and item.name and item.seed is not None and item.name.endswith(f"-{item.seed}"):
        node_id = item.name[: -len(f"-{item.seed}")] or None
    if isinstance(meta.get("params"), dict):
        params = meta["params"]
        other = {k: v for k, v in meta.items() if k not in _RESERVED_META}
    else:
        params = {k: v for k, v in meta.items() if k not in _RESERVED_META | _ADDED_META}
        other = {k: v for k, v in meta.items() if k in _ADDED_META}
    return node_id, params, other


def _payload(ctx: RunContext, item: ImageItem) -> dict[str, Any]:
    """The metadata for one image: what the recipe and the producing node recorded."""
    from fluxkiln.engine.imagemeta import build_payload

    meta = item.meta or {}
    node_id, params, other = provenance(item)
    model = meta.get("model") or params.get("model")
    extra_meta = {k: _jsonable(v) for k, v in other.items()}
    recipe = ctx.recipe
    return build_payload(
        recipe_text=getattr(recipe, "text", None),
        recipe_name=getattr(recipe, "name", None),
        recipe_file=Path(recipe.path).name if getattr(recipe, "path", None) else None,
        overrides=list(getattr(recipe, "overrides", None) or []),
        node=node_id, node_type=meta.get("node_type"), params=_jsonable(params),
        seed=item.seed, prompt=item.prompt, model=str(model) if model is not None else None,
        index=meta.get("index"), flags=_jsonable(item.flags), saved_by=ctx.node,
        extra={"meta": extra_meta} if extra_meta else None,
    )


# ------------------------------------------------------------------ files
def _is_ours(ctx: RunContext, path: Path) -> bool:
    """True if ``path`` was written by an earlier run of this node of this recipe."""
    from fluxkiln.engine.imagemeta import MetadataError, read_metadata

    try:
        meta = read_metadata(path)
    except (OSError, MetadataError, SyntaxError, ValueError):
        return False
    recipe_name = getattr(ctx.recipe, "name", None)
    return bool(meta) and meta.get("saved_by") == ctx.node and meta.get("recipe_name") == recipe_name


def _candidates(folder: Path, stem: str, ext: str):
    yield folder / f"{stem}.{ext}"
    for n in range(2, MAX_ALTERNATIVES + 1):
        yield folder / f"{stem}-{n}.{ext}"


def _write_one(ctx: RunContext, image: Any, folder: Path, stem: str, ext: str, fmt: str, quality: int,
               payload: dict[str, Any]) -> Path:
    tmp = folder / f".{stem}.{ext}.tmp-{os.getpid()}-{_secrets.token_hex(4)}"
    try:
        _encode(image, tmp, fmt, quality, payload)
        for target in _candidates(folder, stem, ext):
            if _place(ctx, tmp, target):
                if target.name != f"{stem}.{ext}":
                    ctx.log(f"save: {stem}.{ext} exists and was not written by this node; "
                            f"kept it and saved to {target.name}", level="warning")
                return target
        raise NodeError(f"cannot find a free file name for {stem}.{ext} in {folder}",
                        hint="move the existing files away or set a different `filename` prefix", key="filename")
    finally:
        tmp.unlink(missing_ok=True)


def _encode(image: Any, tmp: Path, fmt: str, quality: int, payload: dict[str, Any]) -> None:
    from fluxkiln.engine.imagemeta import write_image

    try:
        with open(tmp, "xb") as fp:
            write_image(image, fp, fmt, payload, quality)
            fp.flush()
            os.fsync(fp.fileno())
    except OSError as exc:
        raise NodeError(f"cannot write {tmp.parent}: {exc}",
                        hint="check free disk space and permissions of the run folder") from exc


def _place(ctx: RunContext, tmp: Path, target: Path) -> bool:
    """Move ``tmp`` to ``target`` unless that would clobber a file this node did not write."""
    if target.exists() or target.is_symlink():
        if target.is_symlink() or not target.is_file() or not _is_ours(ctx, target):
            return False
        os.replace(tmp, target)
        return True
    try:
        os.link(tmp, target)  # atomic, and never replaces a file created meanwhile
    except FileExistsError:
        return False
    except OSError:
        os.replace(tmp, target)  # file system without hard links
    return True
