"""Training inputs: images resized into their buckets and encoded to latents, captions to embeddings.

Latents come from the VAE's distribution mode (deterministic, so a resumed run
sees exactly the latents of an uninterrupted one) and are kept in memory, in
files under the node's state folder (``cache_latents_to_disk``), or encoded
again at every step (``cache_latents = false``).  Text embeddings of each
distinct caption (and of the empty caption, for caption dropout) are computed
once when ``cache_text_embeddings`` is on, so the text encoders sit idle during
training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fluxkiln.engine import NodeError
from fluxkiln.engine.paths import temp_name

from .buckets import Sample


def load_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def fit_to_bucket(img: Any, width: int, height: int) -> Any:
    """Scale down (never up) to cover the bucket, then centre-crop to exactly ``width`` x ``height``."""
    from PIL import Image

    s = max(width / img.width, height / img.height)
    nw, nh = max(width, round(img.width * s)), max(height, round(img.height * s))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Any) -> Any:
    """PIL RGB -> float tensor (1, 3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (arr / 127.5 - 1.0).unsqueeze(0)


class LatentStore:
    """Latents of each (image, bucket), cached as configured."""

    def __init__(self, vae: Any, paths: list[Path], device: Any, mode: str, disk_dir: Path | None = None):
        self.vae, self.paths, self.device, self.mode = vae, paths, device, mode
        self.disk_dir = disk_dir
        self.memory: dict[Sample, Any] = {}
        self._hashes: dict[int, str] = {}

    def _disk_file(self, s: Sample) -> Path:
        if s.item not in self._hashes:
            self._hashes[s.item] = hashlib.sha256(self.paths[s.item].read_bytes()).hexdigest()[:24]
        assert self.disk_dir is not None
        return self.disk_dir / f"{self._hashes[s.item]}-{s.width}x{s.height}.safetensors"

    def encode(self, s: Sample) -> Any:
        import torch

        img = fit_to_bucket(load_image(self.paths[s.item]), s.width, s.height)
        x = to_tensor(img).to(self.device, self.vae.dtype)
        cfg = self.vae.config
        with torch.no_grad():
            lat = self.vae.encode(x).latent_dist.mode()
        lat = (lat - getattr(cfg, "shift_factor", 0.0)) * cfg.scaling_factor
        return lat[0].float().cpu()

    def get(self, s: Sample) -> Any:
        if self.mode == "memory":
            if s not in self.memory:
                self.memory[s] = self.encode(s)
            return self.memory[s]
        if self.mode == "disk":
            return self._from_disk(s)
        return self.encode(s)

    def _from_disk(self, s: Sample) -> Any:
        import os

        from safetensors.torch import load_file, save_file

        f = self._disk_file(s)
        if f.is_file():
            try:
                return load_file(str(f))["latent"]
            except Exception:  # noqa: BLE001 - a damaged cache file is simply recomputed
                f.unlink(missing_ok=True)
        lat = self.encode(s)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(f)
        save_file({"latent": lat.contiguous()}, str(tmp))
        os.replace(tmp, f)
        return lat

    def warm(self, samples: list[Sample], on_each: Any = None) -> None:
        """Compute every cached latent up front (memory or disk modes)."""
        if self.mode == "none":
            return
        for i, s in enumerate(samples):
            self.get(s)
            if on_each:
                on_each(i + 1, len(samples))

    def batch(self, batch: list[Sample]) -> Any:
        import torch

        return torch.stack([self.get(s) for s in batch])


class TextStore:
    """(prompt embeddings, pooled embedding) of each caption, cached when configured."""

    def __init__(self, pipe: Any, device: Any, max_len: int, cache: bool):
        self.pipe, self.device, self.max_len, self.cache = pipe, device, max_len, cache
        self.memory: dict[str, tuple[Any, Any]] = {}

    def encode(self, text: str) -> tuple[Any, Any]:
        import torch

        with torch.no_grad():
            embeds, pooled, _ids = self.pipe.encode_prompt(prompt=text, prompt_2=text, device=self.device,
                                                           num_images_per_prompt=1, max_sequence_length=self.max_len)
        return embeds[0].cpu(), pooled[0].cpu()

    def get(self, text: str) -> tuple[Any, Any]:
        if not self.cache:
            return self.encode(text)
        if text not in self.memory:
            self.memory[text] = self.encode(text)
        return self.memory[text]

    def warm(self, texts: list[str]) -> None:
        if self.cache:
            for t in dict.fromkeys(texts):
                self.get(t)

    def batch(self, texts: list[str]) -> tuple[Any, Any]:
        import torch

        pairs = [self.get(t) for t in texts]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class MaskStore:
    """Each (image, bucket)'s loss weights, one per packed latent token, from a folder of masks named like the
    images (kohya's and ai-toolkit's masked loss): the mask is read as greyscale, stretched to its image's size,
    fitted into the bucket as the image is, and each token weighs ``floor + (1 - floor) x`` its pixels' mean
    brightness (white 1, black ``floor``)."""

    def __init__(self, folder: Path, names: list[str], sizes: list[tuple[int, int]], floor: float, patch: int):
        if not folder.is_dir():
            raise NodeError(f"mask_path {folder.name} is a file, not a folder of masks", key="mask_path",
                            hint="point mask_path at a folder holding one mask per dataset image, named like it")
        from fluxkiln.plugins.dataset.ingest import IMAGE_EXTS

        self.folder, self.sizes, self.floor, self.patch = folder, sizes, floor, patch
        masks: dict[str, Path] = {}  # stem -> the first mask of that name (sorted), the folder listed once
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTS and path.is_file():
                masks.setdefault(path.stem, path)
        self.paths = [self.find(masks, name) for name in names]
        self.memory: dict[Sample, Any] = {}

    def find(self, masks: dict[str, Path], name: str) -> Path:
        """The mask of the dataset image ``name`` (the same file name, any image type the dataset node takes)."""
        stem = Path(name).stem
        if stem not in masks:
            raise NodeError(f"mask_path {self.folder.name}/ holds no mask for the dataset image {Path(name).name}",
                            key="mask_path", hint=f"add {stem}.png (white: trained, black: mask_min_value) "
                            "to the folder, one mask per dataset image")
        return masks[stem]

    def get(self, s: Sample) -> Any:
        """The token weights of sample ``s``."""
        import numpy as np
        import torch
        from PIL import Image

        if s not in self.memory:
            try:
                with Image.open(self.paths[s.item]) as im:
                    im.load()
                    mask = im.convert("L")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise NodeError(f"mask {self.paths[s.item].name} cannot be read as an image: {exc}",
                                key="mask_path", hint="save the mask again as a greyscale PNG") from None
            size = self.sizes[s.item]  # the image's, before bucketing
            if mask.size != size:
                mask = mask.resize(size, Image.Resampling.BILINEAR)
            mask = np.asarray(fit_to_bucket(mask, s.width, s.height), dtype=np.float32) / 255.0
            p = self.patch
            cover = mask.reshape(s.height // p, p, s.width // p, p).mean((1, 3)).reshape(-1)
            self.memory[s] = torch.from_numpy(self.floor + (1.0 - self.floor) * cover)
        return self.memory[s]

    def batch(self, batch: list[Sample]) -> Any:
        import torch

        return torch.stack([self.get(s) for s in batch])
