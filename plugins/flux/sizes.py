"""Output sizes: Replicate's aspect ratios and megapixel settings, in pixels that FLUX accepts."""

from __future__ import annotations

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "3:2": (1216, 832), "2:3": (832, 1216),
    "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344),
    "9:21": (640, 1536),
}
MEGAPIXELS = {"1": 1.0, "0.25": 0.5}  # side scale: 0.25 MP halves both sides
MULTIPLE = 16  # FLUX packs 2x2 latents of an 8x VAE: sides must be multiples of 16
CUSTOM_MIN, CUSTOM_MAX = 256, 1440
MAX_SIDE = 2048


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
            raise ValueError('aspect_ratio = "custom" needs both width and height (256 to 1440)')
        w, h = round16(width), round16(height)
    else:
        if width is not None or height is not None:
            raise ValueError('width and height only apply with aspect_ratio = "custom"')
        w, h = ASPECT_RATIOS[aspect_ratio]
    return round16(w * scale), round16(h * scale)


def size_like(image_size: tuple[int, int], megapixels: str) -> tuple[int, int]:
    """A size with the input image's aspect ratio at the megapixel setting (sides multiples of 16)."""
    iw, ih = image_size
    area = 1024 * 1024 * MEGAPIXELS[megapixels] ** 2
    ratio = iw / ih
    w = (area * ratio) ** 0.5
    h = w / ratio
    w, h = round16(w), round16(h)
    return min(w, MAX_SIDE), min(h, MAX_SIDE)
