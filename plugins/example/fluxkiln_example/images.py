"""Image nodes: ``load_images`` (files from disk) and ``resize`` (Lanczos resize/upscale, aspect kept)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import FilePath, ImageItem, Images, NodeError, Problem, RunContext, node

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_OUTPUT_PIXELS = 64_000_000
Method = Literal["lanczos", "bicubic", "bilinear", "box", "nearest"]


# ------------------------------------------------------------------ load_images
@node("load_images", version="1", category="image")
def load_images(
    ctx: RunContext,
    path: Annotated[FilePath, Field(description="An image file, or a folder of images (relative to the recipe)")],
    pattern: Annotated[str, Field(min_length=1, description="Glob of file names to take from a folder")] = "*",
    recursive: Annotated[bool, Field(description="Also look in sub-folders")] = False,
    limit: Annotated[int, Field(ge=1, le=10_000, description="Take at most this many images (sorted by name)")] = 1000,
    max_pixels: Annotated[int, Field(ge=1, le=256_000_000, description="Refuse images larger than this")]
    = 40_000_000,
) -> Images:
    """Load images from a file or a folder, sorted by name (with ``<name>.txt`` as the prompt when present).

    Use it to upscale or resize existing pictures, or as the ``image`` of an
    image-to-image ``sample``.  Transparency is kept (RGBA); palette and
    grayscale images are converted to RGB.
    """
    from PIL import Image

    files = _image_files(Path(path), pattern, recursive)[:limit]
    if not files:
        raise NodeError(f"no images matching {pattern!r} in {path}", key="path",
                        hint="supported: " + ", ".join(IMAGE_SUFFIXES))
    out = Images()
    for i, file in enumerate(files):
        ctx.check_cancelled()
        try:
            with Image.open(file) as im:
                if im.width * im.height > max_pixels:
                    raise NodeError(f"{file.name} is {im.width}x{im.height}, more than max_pixels={max_pixels}",
                                    key="max_pixels", hint="raise max_pixels if you trust this file")
                im.load()
                img = im.convert("RGBA" if _has_alpha(im) else "RGB")
        except (OSError, Image.DecompressionBombError) as exc:
            raise NodeError(f"cannot read image {file}: {exc}", key="path",
                            hint="remove the file or narrow `pattern`") from exc
        caption = file.with_suffix(".txt")
        prompt = caption.read_text(encoding="utf-8").strip() if caption.is_file() else None
        out.append(ImageItem(image=img, prompt=prompt, name=file.stem, meta={"source": str(file)}))
        ctx.progress(i + 1, len(files))
    ctx.log(f"loaded {len(out)} image(s) from {path}")
    return out


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(p))]


def _image_files(path: Path, pattern: str, recursive: bool) -> list[Path]:
    if path.is_file():
        return [path]
    found = path.rglob(pattern) if recursive else path.glob(pattern)
    return sorted((p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)


def _has_alpha(im: Any) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


# ------------------------------------------------------------------ resize
@node("resize", version="1", category="image")
def resize(
    ctx: RunContext,
    images: Annotated[Images, Field(description="Images to resize")],
    scale: Annotated[float | None, Field(gt=0, le=8, description="Multiply width and height by this (2 = upscale 2x)")]
    = None,
    width: Annotated[int | None, Field(ge=1, le=16384, description="Target width; alone, height follows the aspect")]
    = None,
    height: Annotated[int | None, Field(ge=1, le=16384, description="Target height; alone, width follows the aspect")]
    = None,
    fit: Annotated[Literal["contain", "cover", "stretch"], Field(
        description="With width and height: fit inside keeping the aspect (contain), fill and crop the "
                    "centre (cover), or ignore the aspect (stretch)")] = "contain",
    method: Annotated[Method, Field(description="Resampling filter; lanczos is sharpest")] = "lanczos",
    multiple_of: Annotated[int, Field(ge=1, le=256, description="Round the size to a multiple of this "
                                      "(16 suits FLUX image-to-image)")] = 1,
) -> Images:
    """Resize or upscale images with Lanczos (or another filter), keeping the aspect ratio.

    Give ``scale`` (e.g. 2 for a 2x upscale), or ``width`` and/or ``height``.
    With one side only, the other follows the aspect ratio; with both, ``fit``
    decides.  Seeds, prompts and metadata of each image are kept; the sizes
    are added to the image's metadata under ``resize``.
    """
    from PIL import Image

    if scale is None and width is None and height is None:
        raise NodeError("resize needs `scale`, or `width` and/or `height`", key="scale",
                        hint="e.g. scale = 2 to upscale 2x, or width = 1024")
    if scale is not None and (width is not None or height is not None):
        raise NodeError("give either `scale` or `width`/`height`, not both", key="scale")
    filt = getattr(Image.Resampling, method.upper())
    out = Images()
    for i, item in enumerate(images):
        ctx.check_cancelled()
        img = item.image
        if img.mode not in ("RGB", "RGBA", "L", "LA", "I", "F"):
            img = img.convert("RGBA" if _has_alpha(img) else "RGB")
        size, crop = target_size(img.size, scale, width, height, fit, multiple_of)
        if size[0] * size[1] > MAX_OUTPUT_PIXELS:
            raise NodeError(f"{item.name or f'image {i}'}: {size[0]}x{size[1]} is more than "
                            f"{MAX_OUTPUT_PIXELS} pixels", hint="use a smaller scale or size")
        resized = img.resize(size, filt, box=crop)
        meta = {**item.meta, "resize": {"from": list(img.size), "to": list(size), "method": method}}
        out.append(ImageItem(image=resized, seed=item.seed, prompt=item.prompt, name=item.name, meta=meta,
                             flags=dict(item.flags)))
        ctx.progress(i + 1, len(images))
    return out


def _round(value: float, multiple: int) -> int:
    return max(multiple, int(value / multiple + 0.5) * multiple)


def target_size(size: tuple[int, int], scale: float | None, width: int | None, height: int | None,
                fit: str, multiple_of: int = 1) -> tuple[tuple[int, int], tuple[float, float, float, float] | None]:
    """The output size and the source box to crop (``cover`` only) for one image."""
    w, h = size
    box = None
    if scale is not None:
        tw, th = w * scale, h * scale
    elif width is not None and height is not None:
        tw, th = float(width), float(height)
        if fit == "contain":
            r = min(width / w, height / h)
            tw, th = w * r, h * r
        elif fit == "cover":
            r = max(width / w, height / h)
            cw, ch = width / r, height / r  # the source region that fills the box
            box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    elif width is not None:
        tw, th = float(width), h * width / w
    else:
        th = float(height or h)
        tw = w * th / h
    return (_round(tw, multiple_of), _round(th, multiple_of)), box


def resize_problems(recipe: Any) -> list[Problem]:
    """Recipe check (``check_recipe`` hook): every ``resize`` node says how big."""
    problems = []
    for nid, spec in recipe.nodes.items():
        if spec.type != "resize":
            continue
        has_scale = spec.values.get("scale") is not None
        has_size = spec.values.get("width") is not None or spec.values.get("height") is not None
        if not has_scale and not has_size:
            problems.append(recipe.problem("resize needs `scale`, or `width` and/or `height`", node=nid,
                                           hint="e.g. scale = 2 to upscale 2x, or width = 1024"))
        elif has_scale and has_size:
            problems.append(recipe.problem("give either `scale` or `width`/`height`, not both", node=nid,
                                           key="scale", hint="remove `scale`, or remove `width` and `height`"))
    return problems
