"""Built-in plugin: the ``dataset`` node (training images and captions from a zip, tar or folder)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fluxkiln.engine import Dataset, DatasetItem, FilePath, NodeError, RunContext, hookimpl, node

PILLOW_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit; max_pixels may not exceed it


@node("dataset", version="1", category="training")
def dataset(
    ctx: RunContext,
    source: Annotated[FilePath, Field(
        description="A .zip, .tar, .tar.gz/.tgz (also .bz2/.xz) or a folder of images (png, jpg, jpeg, webp, "
                    "bmp) with optional <stem>.txt captions")],
    max_images: Annotated[int, Field(
        ge=1, le=100_000, description="Refuse sources with more images than this")] = 1000,
    max_files: Annotated[int, Field(
        ge=1, le=1_000_000, description="Refuse sources with more entries (of any kind) than this")] = 10_000,
    max_total_bytes: Annotated[int, Field(
        ge=1, le=2**40, description="Refuse sources whose files add up to more bytes than this (counted "
                                    "while reading: zip bombs stop here)")] = 2 * 2**30,
    max_pixels: Annotated[int, Field(
        ge=1, le=PILLOW_MAX_PIXELS, description="Refuse any image with more pixels than this "
                                                "(decompression bombs)")] = 8192 * 8192,
) -> Dataset:
    """Training images with their captions, read safely from a zip, tar or folder.

    Images may be PNG, JPEG, WebP or BMP; a caption is the text of the file with
    the same name and a ``.txt`` extension (``cat.png`` + ``cat.txt``); images
    without one get no caption (``caption`` can add them).  ``__MACOSX/``,
    ``._*`` and hidden files are skipped.  Archives are treated as hostile:
    only regular image and ``.txt`` members are read; links, devices, absolute
    paths and ``..`` paths are refused with an error naming the member; counts,
    total bytes (counted while streaming) and pixels per image are capped, and
    every image is decoded to check it.  The files are copied into the node's
    folder of the run (``runs/<recipe>/<node>/files``) and the output carries a
    fingerprint of their content.
    """
    from .archive import Refused, printable
    from .ingest import Limits, ingest

    src = Path(source)
    limits = Limits(max_images=max_images, max_files=max_files, max_total_bytes=max_total_bytes, max_pixels=max_pixels)
    node_dir = ctx.node_dir()
    staging = node_dir / f".files-tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        got = ingest(src, staging, limits, log=ctx.log)
    except Refused as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise NodeError(f"dataset source {src.name}: member '{printable(exc.member)}' refused: {exc.reason}",
                        key="source", hint=_hint_for(exc.reason)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not got.images:
        shutil.rmtree(staging, ignore_errors=True)
        raise NodeError(f"dataset source {src.name} holds no images ({len(got.skipped)} entries skipped)",
                        key="source", hint="put .png, .jpg, .jpeg, .webp or .bmp files in it (captions in <stem>.txt)")
    final = node_dir / "files"
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    items = [DatasetItem(path=final / f.name, caption=got.caption_for(n), name=n)
             for n, f, _ in sorted(got.images, key=lambda r: r[0])]
    fp = got.fingerprint()
    listing = node_dir / "dataset.json"
    listing.write_text(json.dumps({"source": src.name, "fingerprint": fp,
                                   "items": [{"name": it.name, "file": it.path.name, "caption": it.caption}
                                             for it in items],
                                   "skipped": [{"name": n, "reason": r} for n, r in got.skipped]},
                                  indent=1, ensure_ascii=False))
    ctx.artifact(listing)
    n_cap = sum(1 for it in items if it.caption is not None)
    ctx.log(f"{len(items)} images ({n_cap} with captions, {got.total_bytes} bytes) from {src.name}")
    return Dataset(items=items, fingerprint=fp, root=final)


def _hint_for(reason: str) -> str:
    if "max_" in reason:
        return "if the source is trusted and really that large, raise the limit named in the message"
    if "link" in reason or ".." in reason or "absolute" in reason:
        return "repack the archive with plain relative files only (e.g. `zip -r data.zip images/`)"
    return "remove or fix that file and pack the archive again"


@hookimpl
def register_node_types(register):
    register(dataset)
