"""Copy a dataset source into a target folder under caps, verify every image, pair captions.

Bytes are counted while they stream (declared sizes in an archive may lie), so
a zip bomb stops at ``max_total_bytes``; archive members that are skipped count
too (a tar decompresses them to pass over them).  Two captions for one image
are refused, and captions are cleaned of escape sequences, bidirectional
overrides and control characters (logged).  Each image is opened with an
allow-list of formats, its pixel count is checked against ``max_pixels`` from
the header before any decoding (decompression bombs), then it is fully decoded.
Files are written under names we choose (``00000.png``), never under a name
taken from the archive, so nothing can land outside the target folder.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fluxkiln.plugins.caption.text import clean_caption

from .archive import Member, Refused, iter_members

IMAGE_EXTS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
CAPTION_EXT = ".txt"
_CHUNK = 1 << 20
MAX_SKIP_LOGS = 20


@dataclass(frozen=True)
class Limits:
    """Caps applied while reading a source."""

    max_images: int = 1000
    max_files: int = 10000
    max_total_bytes: int = 2 * 2**30
    max_pixels: int = 8192 * 8192
    max_caption_bytes: int = 64 * 1024

    def max_image_bytes(self) -> int:
        # An encoded image within max_pixels cannot be bigger than 8 bytes a pixel (16-bit RGBA) + headers.
        return self.max_pixels * 8 + 2**20


@dataclass
class Ingested:
    """What was taken from the source."""

    images: list[tuple[str, Path, str]] = field(default_factory=list)  # (name, file, sha256)
    captions: dict[str, str] = field(default_factory=dict)  # name without extension -> caption
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cleaned: list[tuple[str, list[str]]] = field(default_factory=list)  # caption file -> what was removed
    total_bytes: int = 0

    def caption_for(self, name: str) -> str | None:
        return self.captions.get(name.rsplit(".", 1)[0])

    def fingerprint(self) -> str:
        rows = sorted((n, sha, self.caption_for(n)) for n, _, sha in self.images)
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def ingest(source: Path, target: Path, limits: Limits, log: Callable[[str], None] = lambda _m: None) -> Ingested:
    """Read ``source`` into the (existing, empty) folder ``target``; raise :class:`Refused` on a bad member."""
    out = Ingested()

    def charge(name: str, size: int) -> None:  # a skipped member is still decompressed or counted
        out.total_bytes += size
        if out.total_bytes > limits.max_total_bytes:
            raise Refused(name, f"the source holds more than max_total_bytes = {limits.max_total_bytes} bytes, "
                          "skipped members included (possible zip bomb); raise max_total_bytes if the dataset "
                          "is really that large")

    headers = 1024 * limits.max_files + 2**20  # tar headers and padding on top of the members' bytes
    for m in iter_members(source, limits.max_files, charge, limits.max_total_bytes + headers):
        if isinstance(m, tuple):
            out.skipped.append(m)
            continue
        ext = Path(m.name).suffix.lower()
        if ext in IMAGE_EXTS:
            _take_image(m, ext, target, limits, out)
        elif ext == CAPTION_EXT:
            _take_caption(m, limits, out)
        else:
            if m.in_archive:
                charge(m.name, m.size or 0)
            out.skipped.append((m.name, f"not an image ({', '.join(IMAGE_EXTS)}) or a .txt caption"))
    stems = {n.rsplit(".", 1)[0] for n, _, _ in out.images}
    for stem in sorted(set(out.captions) - stems):
        out.skipped.append((stem + CAPTION_EXT, "caption without an image of the same name"))
    for name, removed in out.cleaned[:MAX_SKIP_LOGS]:
        log(f"caption {name}: removed {', '.join(removed)}")
    for name, reason in out.skipped[:MAX_SKIP_LOGS]:
        log(f"skipped {name}: {reason}")
    if len(out.skipped) > MAX_SKIP_LOGS:
        log(f"... and {len(out.skipped) - MAX_SKIP_LOGS} more skipped entries (listed in dataset.json)")
    return out


def _copy(m: Member, dest: Path | None, cap: int, limits: Limits, out: Ingested) -> tuple[bytes, str]:
    """Stream a member (to ``dest`` or into memory), counting bytes; return (data if in memory, sha256)."""
    if m.size is not None and m.size > cap:
        raise Refused(m.name, f"declares {m.size} bytes, more than the {cap} bytes allowed for one file "
                      "(possible zip bomb)")
    if m.size is not None and out.total_bytes + m.size > limits.max_total_bytes:
        raise Refused(m.name, f"the source holds more than max_total_bytes = {limits.max_total_bytes} bytes "
                      "(possible zip bomb); raise max_total_bytes if the dataset is really that large")
    try:
        return _stream(m, dest, cap, limits, out)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as exc:
        raise Refused(m.name, f"is corrupt or cannot be read: {exc}") from exc


def _stream(m: Member, dest: Path | None, cap: int, limits: Limits, out: Ingested) -> tuple[bytes, str]:
    h = hashlib.sha256()
    kept = bytearray()
    got = 0
    fh = m.open()
    if fh is None:
        raise Refused(m.name, "cannot be read")
    with fh, (open(dest, "xb") if dest is not None else _NullSink()) as sink:
        while chunk := fh.read(_CHUNK):
            got += len(chunk)
            out.total_bytes += len(chunk)
            if got > cap:
                raise Refused(m.name, f"is larger than the {cap} bytes allowed for one file "
                              "(possible zip bomb)")
            if out.total_bytes > limits.max_total_bytes:
                raise Refused(m.name, f"reading it passes max_total_bytes = {limits.max_total_bytes} "
                              "(possible zip bomb); raise max_total_bytes if the dataset is really that large")
            h.update(chunk)
            if dest is None:
                kept += chunk
            else:
                sink.write(chunk)
    return bytes(kept), h.hexdigest()


class _NullSink:
    def __enter__(self) -> _NullSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, _data: bytes) -> None:
        return None


def _take_image(m: Member, ext: str, target: Path, limits: Limits, out: Ingested) -> None:
    if any(n == m.name for n, _, _ in out.images):
        raise Refused(m.name, "appears twice in the source")
    if len(out.images) >= limits.max_images:
        raise Refused(m.name, f"the source has more than max_images = {limits.max_images} images")
    dest = target / f"{len(out.images):05d}{ext}"
    _, sha = _copy(m, dest, limits.max_image_bytes(), limits, out)
    verify_image(dest, m.name, limits.max_pixels)
    out.images.append((m.name, dest, sha))


def _take_caption(m: Member, limits: Limits, out: Ingested) -> None:
    stem = m.name.rsplit(".", 1)[0]
    if stem in out.captions:
        raise Refused(m.name, f"a second caption for '{stem}' (captions are matched by name, so only one "
                      f"{stem}.txt may exist); remove the duplicate")
    data, _ = _copy(m, None, limits.max_caption_bytes, limits, out)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Refused(m.name, f"caption is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    text, removed = clean_caption(text)
    if removed:
        out.cleaned.append((m.name, removed))
    out.captions[stem] = " ".join(text.split())


def verify_image(path: Path, name: str, max_pixels: int) -> tuple[int, int]:
    """Check an image's header against ``max_pixels``, then decode it fully; return its size."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=PIL_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise Refused(name, f"is {w}x{h} = {w * h} pixels, more than max_pixels = {max_pixels} "
                                  "(decompression bomb?)")
                im.load()
        except Refused:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise Refused(name, f"is refused as a decompression bomb (more than max_pixels = {max_pixels}): "
                          f"{exc}") from exc
        except UnidentifiedImageError as exc:
            raise Refused(name, "is not a PNG, JPEG, WebP or BMP image") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise Refused(name, f"cannot be decoded: {exc}") from exc
    return w, h
