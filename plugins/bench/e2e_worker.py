"""The fresh processes of ``fluxkiln bench --e2e`` that are not ``fluxkiln run``: writing the model folder, and
stock diffusers doing a recipe's work (load, the same images, save), timing its own phases.

    python -m fluxkiln.plugins.bench.e2e_worker save FOLDER [--tiny] [--depth=DOUBLE,SINGLE]
    python -m fluxkiln.plugins.bench.e2e_worker stock FOLDER OUT_DIR SIZE STEPS SEEDS

Each prints one JSON object on its last line of stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
PROMPT = "a lighthouse on a cliff at dusk, volumetric light, 35mm photo"


def save_folder(folder: Path, tiny: bool, depth: tuple[int, int] | None = None) -> dict[str, float]:
    """Build a FLUX.1-dev pipeline with random weights (full size on the GPU, or the tiny one) and save it;
    ``depth``: (double, single) transformer blocks instead of FLUX.1's 19 and 38."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if tiny:
        from fluxkiln.plugins.flux.tiny import build_tiny_flux

        pipe = build_tiny_flux("dev")
    else:
        from .models import build_full_size

        pipe = build_full_size(device, depth)["dev"]
    built = time.perf_counter() - t0
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(folder)  # only a complete folder is ever reused
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"build_s": round(built, 2), "write_s": round(time.perf_counter() - t0 - built, 2),
            "folder_gb": round(size / 1e9, 2), "folder_bytes": size}


def stock(folder: Path, out: Path, size: int, steps: int, seeds: list[int]) -> dict[str, object]:
    """Stock diffusers: import, ``FluxPipeline.from_pretrained`` + ``.to(device)``, the images, PNG files."""
    t0 = time.perf_counter()
    import torch
    from diffusers import FluxPipeline

    imported = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    loaded = time.perf_counter()
    images_s, saves_s = [], []
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        t = time.perf_counter()
        with torch.no_grad():
            image = pipe(prompt=PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=3.0,
                         max_sequence_length=min(512, pipe.tokenizer_2.model_max_length),
                         generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        sync()
        images_s.append(round(time.perf_counter() - t, 3))
        t = time.perf_counter()
        image.save(out / f"stock_{seed}.png")
        saves_s.append(round(time.perf_counter() - t, 3))
    return {"python_start_s": round(t0 - T_START, 3), "import_s": round(imported - t0, 2),
            "load_s": round(loaded - imported, 2), "loaded_at": round(time.time() - (time.perf_counter() - loaded), 3),
            "images_s": images_s, "save_s": saves_s, "device": device, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main(argv: list[str]) -> int:
    if argv[0] == "save":
        depth = next((tuple(int(n) for n in a.split("=", 1)[1].split(",")) for a in argv[2:]
                      if a.startswith("--depth=")), None)
        result = save_folder(Path(argv[1]), "--tiny" in argv[2:], depth)
    elif argv[0] == "stock":
        result = stock(Path(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4]), [int(s) for s in argv[5].split(",")])
    else:
        print(f"unknown command {argv[0]!r}; use save or stock", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
