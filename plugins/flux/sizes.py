"""Output sizes: Replicate's aspect ratios and megapixel settings, in pixels that FLUX accepts.

Beyond Replicate (1440 per side at most): custom sizes up to 2048 per side and
about 4 MP, and ``megapixels = "2"``, whose 16:9 and 9:16 sizes are exactly
Full HD (1920x1080, 1080x1920).  1080 is not a multiple of 16, so those are
generated at 1920x1088 and cropped 4 rows from the top and bottom
(:func:`plan_size` says both sizes).
"""

from __future__ import annotations

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "3:2": (1216, 832), "2:3": (832, 1216),
    "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344),
    "9:21": (640, 1536),
}
MEGAPIXELS = {"1": 1.0, "0.25": 0.5, "2": 2**0.5}  # side scale: 0.25 MP halves both sides
MULTIPLE = 16  # FLUX packs 2x2 latents of an 8x VAE: sides must be multiples of 16
CUSTOM_MIN, CUSTOM_MAX = 256, 2048
MAX_SIDE = 2048
MAX_PIXELS = 2048 * 2048  # about 4.2 MP
TRAINING_PIXELS = 2 * 1024 * 1024  # FLUX.1 is trained up to about 2 MP; above it sampling warns
FULL_HD = {"16:9": (1920, 1080), "9:16": (1080, 1920)}  # megapixels = "2"


def plan_size(aspect_ratio: str, megapixels: str, width: int | None = None,
              height: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((generated width, height), (delivered width, height)): they differ only for Full HD's centre crop."""
    if megapixels == "2" and aspect_ratio in FULL_HD:
        w, h = FULL_HD[aspect_ratio]
        return (round_up16(w), round_up16(h)), (w, h)
    size = output_size(aspect_ratio, megapixels, width, height)
    return size, size


def round_up16(x: int) -> int:
    return -(-x // MULTIPLE) * MULTIPLE


def centre_crop(image: object, size: tuple[int, int]) -> object:
    """Crop a PIL image to ``size`` around its centre (a no-op at that size already)."""
    w, h = size
    iw, ih = image.size  # type: ignore[attr-defined]
    if (iw, ih) == (w, h):
        return image
    left, top = (iw - w) // 2, (ih - h) // 2
    return image.crop((left, top, left + w, top + h))  # type: ignore[attr-defined]


def round16(x: float) -> int:
    """Nearest multiple of 16 (halves round up), at least 16."""
    return max(MULTIPLE, int((x + MULTIPLE / 2) // MULTIPLE) * MULTIPLE)


def output_size(aspect_ratio: str, megapixels: str, width: int | None = None,
                height: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels for an aspect ratio (or ``custom`` width/height) and megapixel setting.

    The table sizes halve exactly to multiples of 16 at 0.25 MP; custom sizes
    are rounded to 16, then scaled and rounded to 16 again.
    """
    scale = MEGAPIXELS[megapixels]
    if aspect_ratio == "custom":
        if width is None or height is None:
            raise ValueError(f'aspect_ratio = "custom" needs both width and height ({CUSTOM_MIN} to {CUSTOM_MAX})')
        w, h = round16(width), round16(height)
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} is {w * h / 1e6:.1f} MP, more than the {MAX_PIXELS / 1e6:.1f} MP fluxkiln "
                             f"allows (2048x2048)")
    else:
        if width is not None or height is not None:
            raise ValueError('width and height only apply with aspect_ratio = "custom"')
        w, h = ASPECT_RATIOS[aspect_ratio]
    w, h = w * scale, h * scale
    fit = min(1.0, MAX_SIDE / max(w, h))  # 2 MP of the widest ratios would pass 2048 per side
    return min(MAX_SIDE, round16(w * fit)), min(MAX_SIDE, round16(h * fit))


def size_like(image_size: tuple[int, int], megapixels: str) -> tuple[int, int]:
    """A size with the input image's aspect ratio at the megapixel setting (sides multiples of 16)."""
    iw, ih = image_size
    area = 1024 * 1024 * MEGAPIXELS[megapixels] ** 2
    ratio = iw / ih
    w = (area * ratio) ** 0.5
    h = w / ratio
    w, h = round16(w), round16(h)
    return min(w, MAX_SIDE), min(h, MAX_SIDE)
