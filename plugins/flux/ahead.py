"""Compile a run's transformer block variants in helper processes while the run itself imports torch and loads
its model, so that a cold compile cache costs the first image less.

On a cold cache the first image of a size waits for torch.compile (about 20 s for FLUX's two block variants on an
H200), and that wait used to start only after the imports and the weights' load (about 17 s).  As a run starts
(``prepare_run``), :func:`start` works out from the recipe which variants its ``sample`` nodes will need — the
model folder's transformer config, and each image size, batch, text length and ``go_fast`` — and, unless earlier
helpers already compiled exactly that (:func:`marker`), starts two helper processes at low priority, one per block
kind (double-stream, single-stream), which compile in parallel.  Each builds a transformer of the folder's config
with one block of its kind and random weights, brings it into ``sample``'s state (:func:`.pipestate.prepare`:
fused QKV, fp8 layers with ``go_fast``, compiled blocks) and runs one step of a ``FluxPipeline`` around it, with the
same arguments ``sample`` passes: each block call compiles its variant ahead of time and saves it
(:mod:`.precompiled`).  A variant's key is the block's structure and its inputs, not the model's depth or weights,
so it is the file the run's own first image needs.  The run's block, meeting a variant a helper is compiling
(its file lock: :func:`.precompiled.obtain`), waits for the file and loads it instead of compiling it too.

Only what can be known before running is planned: ``sample`` nodes (each sweep cell) whose model is a
``load_model`` of a local diffusers folder, a cached hub id or mini-flux (no LoRAs, offload, fp8 storage or context
parallelism), with literal prompts and sizes, text-to-image, without the step cache.  Helpers start only where a
CUDA GPU is present, in a single-process run, with compilation and precompiled blocks on; ``FLUXKILN_AHEAD=0``
turns them off.  They end when the run ends.  Nothing here imports torch at module level.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import inspect
import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

KINDS = ("double", "single")
_children: list[subprocess.Popen[bytes]] = []
_lock = threading.Lock()


def enabled() -> bool:
    """Whether helpers may start: ``FLUXKILN_AHEAD=0`` (or compilation or precompiled blocks off) stops them."""
    from . import fast, precompiled

    off = fast.switched_off("FLUXKILN_AHEAD")
    return not (off or fast.compile_disabled() or not precompiled.enabled() or fast.compile_mode() is not None)


def gpu_present() -> bool:
    """A CUDA GPU is visible (without importing torch): the driver's device files, and not hidden from us."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


@dataclass(frozen=True)
class Shape:
    """What one transformer call's block inputs look like: image size, batch, text tokens, and fp8 or not."""

    width: int
    height: int
    batch: int
    tokens: int
    go_fast: bool


@dataclass(frozen=True)
class Work:
    """The variants to compile for one model folder, in the order the run will need them."""

    folder: str
    dtype: str
    shapes: tuple[Shape, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Work:
        d = json.loads(text)
        return cls(d["folder"], d["dtype"], tuple(Shape(**s) for s in d["shapes"]))


# ------------------------------------------------------------------ planning (in the run's process)
def _defaults() -> dict[str, Any]:
    from .sample import sample

    return {k: p.default for k, p in inspect.signature(sample).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _folder(ref: Any, base_dir: Path) -> Path | None:
    """The local diffusers folder a load_model's literal ``model`` names, or None."""
    if not isinstance(ref, str):
        return None
    ref = ref.strip()
    if ref.startswith("builtin:mini-flux"):
        from fluxkiln.plugins.miniflux.weights import resolve_builtin

        with contextlib.suppress(OSError):
            found = resolve_builtin(ref)
            return Path(found) if found else None
        return None
    from .load import HUB_ID, PREFIX

    if PREFIX.match(ref):
        return None  # another plugin's reference (or tiny-flux, built on first use): not known before running
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        return path.resolve() if (path / "transformer" / "config.json").is_file() else None
    if HUB_ID.match(ref) and not path.exists():
        from fluxkiln.engine import NodeError

        from .load import hub_snapshot

        try:
            snap = hub_snapshot(ref)
        except NodeError:
            return None
        return snap if (snap / "transformer" / "config.json").is_file() else None
    return None


def _model(recipe: Any, link: Any) -> tuple[Path, str] | None:
    """(folder, dtype) of the plain load_model a sample's ``model`` link leads to, where the helpers can serve it."""
    spec = recipe.nodes.get(getattr(link, "node", None))
    if spec is None or spec.type != "load_model":
        return None  # apply_lora (adapters are compiled as usual) or a plugin's node
    v = spec.values
    plain = (v.get("offload", "none") == "none" and v.get("quantize", "none") == "none"
             and v.get("context_parallel", 1) == 1 and v.get("dtype", "auto") in ("auto", "bfloat16", "float16"))
    folder = _folder(v.get("model"), recipe.base_dir) if plain else None
    return None if folder is None else (folder, str(v.get("dtype", "auto")))


def _tokens(folder: Path) -> int:
    """T5 tokens ``sample`` pads prompts to for this model: the variant's maximum, or the tokenizer's if shorter."""
    from .generate import MAX_TEXT_TOKENS

    config = json.loads((folder / "transformer" / "config.json").read_text())
    tokens = MAX_TEXT_TOKENS["dev" if config.get("guidance_embeds") else "schnell"]
    with contextlib.suppress(OSError, ValueError):
        limit = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text()).get("model_max_length")
        if isinstance(limit, int) and limit > 0:
            tokens = min(tokens, limit)
    return tokens


def _shapes(values: dict[str, Any], defaults: dict[str, Any], tokens: int) -> list[Shape]:
    """The transformer calls one sample cell makes (one per batch), or [] where its values are not literal."""
    from .generate import Job, batches
    from .sizes import plan_size

    v = {**defaults, **values}
    prompt = v["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    literal = isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)
    if not literal or v["image"] is not None or v["cache_threshold"] or not isinstance(v["go_fast"], bool):
        return []
    try:
        size, _ = plan_size(v["aspect_ratio"], v["megapixels"], v["width"], v["height"])
        n = int(v["num_outputs"])
    except (TypeError, ValueError):
        return []
    groups = batches([Job(p, i, size) for i, p in enumerate(prompts)], n)
    return [Shape(size[0], size[1], len(g) * n, tokens, v["go_fast"]) for g in groups]


def plan(recipe: Any) -> list[Work]:
    """The variants the recipe's sample nodes will need, per model folder (see the module's docstring)."""
    defaults = _defaults()
    found: dict[tuple[Path, str], list[Shape]] = {}
    for spec in recipe.nodes.values():
        if spec.type != "sample":
            continue
        for values in spec.cells():
            model = _model(recipe, values.get("model"))
            if model is None:
                continue
            shapes = found.setdefault(model, [])
            for shape in _shapes(values, defaults, _tokens(model[0])):
                if shape not in shapes:
                    shapes.append(shape)
    return [Work(str(folder), dtype, tuple(shapes)) for (folder, dtype), shapes in found.items() if shapes]


def marker(work: Work, kind: str) -> Path:
    """Where a helper that compiled ``work``'s ``kind`` blocks leaves the list of files it saved or found: the work,
    the model's transformer config, the versions and this plugin's code, hashed."""
    from fluxkiln.engine.paths import cache_root

    from .variantkeys import code_hash

    versions = {}
    for name in ("torch", "diffusers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    config = (Path(work.folder) / "transformer" / "config.json").read_text()
    text = json.dumps({"work": work.to_json(), "kind": kind, "config": config, "versions": versions,
                       "python": sys.version.split()[0], "code": code_hash()}, sort_keys=True)
    return cache_root() / "precompiled" / "ahead" / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}-{kind}.json"


def done(path: Path) -> bool:
    """Whether a helper's marker says its work is done and every file it listed still exists."""
    try:
        files = json.loads(path.read_text()).get("files", [])
    except (OSError, ValueError):
        return False
    return all(Path(f).is_file() for f in files)


def start(recipe: Any) -> threading.Thread | None:
    """Plan the recipe's variants and start the helpers that are needed, in a background thread (returned; None
    where no helper may start)."""
    if not enabled() or not gpu_present() or int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        return None
    thread = threading.Thread(target=_start, args=(recipe,), name="fluxkiln-ahead", daemon=True)
    thread.start()
    return thread


def _start(recipe: Any) -> None:
    try:
        for work in plan(recipe):
            for kind in KINDS:
                path = marker(work, kind)
                if not done(path):
                    spawn(work, kind, path)
    except Exception as exc:  # noqa: BLE001 - no helpers: the run compiles as it always did; the reason is kept
        from fluxkiln.engine.paths import cache_root

        with contextlib.suppress(OSError):
            log = cache_root() / "precompiled" / "ahead" / "planning-error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{type(exc).__name__}: {exc}\n")


def spawn(work: Work, kind: str, path: Path, device: str = "cuda") -> subprocess.Popen[bytes]:
    """Start one helper process (its output goes to a ``.log`` beside its marker); it is stopped when we exit."""
    from fluxkiln.engine.paths import cache_root

    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLUXKILN_CACHE=str(cache_root()), FLUXKILN_PREWARM="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fluxkiln.plugins.flux.ahead", "--kind", kind, "--marker", str(path),
           "--device", device, "--parent", str(os.getpid()), work.to_json()]
    with path.with_suffix(".log").open("wb") as log:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    with _lock:
        _children[:] = [c for c in _children if c.poll() is None]  # reaps the finished ones
        _children.append(child)
    return child


@atexit.register
def stop(grace_s: float = 5.0) -> None:
    """Stop helpers still running (the run is over: what they compile now would be for no one)."""
    with _lock:
        children, _children[:] = list(_children), []
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.kill()


# ------------------------------------------------------------------ the helper process
def compile_kind(work: Work, kind: str, device: str) -> list[str]:
    """Compile (or find saved) every variant of ``kind`` blocks that ``work`` needs; returns the files."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from . import fast, generate, pipestate, precompiled
    from .load import quiet_loading, torch_dtype

    folder = Path(work.folder)
    dtype = torch_dtype(work.dtype, device)
    config = dict(FluxTransformer2DModel.load_config(folder, subfolder="transformer"))
    config.update(num_layers=int(kind == "double"), num_single_layers=int(kind == "single"))
    with quiet_loading(), torch.device(device):
        transformer = FluxTransformer2DModel.from_config(config).to(dtype).eval()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")).to(dtype).eval()
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    variant = "dev" if transformer.config.guidance_embeds else "schnell"
    for shape in work.shapes:
        pipestate.prepare(pipe, [], shape.go_fast, device, None, fast=True)
        if device != "cuda":
            fast.compile_blocks(transformer)  # sample compiles on a GPU only; the tests run this on a CPU
        embeds = torch.zeros(shape.batch, shape.tokens, transformer.config.joint_attention_dim, dtype=dtype,
                             device=device)
        pooled = torch.zeros(shape.batch, transformer.config.pooled_projection_dim, dtype=dtype, device=device)
        with torch.no_grad(), generate.kernels(device):
            pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=1, width=shape.width,
                 height=shape.height, num_inference_steps=1, guidance_scale=3.0 if variant == "dev" else 0.0,
                 max_sequence_length=shape.tokens, output_type="latent")
    return precompiled.stats()["used"]


def _follow_parent(parent: int) -> None:
    """End this helper when the run that started it has ended (it may skip ``atexit``: ``FLUXKILN_FAST_EXIT``)."""
    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="fluxkiln-ahead-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fluxkiln.plugins.flux.ahead", description=__doc__.splitlines()[0])
    p.add_argument("work", help="the Work, as JSON")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--marker", type=Path, required=True, help="where to list the files when done")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parent", type=int, default=0, help="the run's process id: stop when it ends")
    args = p.parse_args(argv)
    if args.parent:
        _follow_parent(args.parent)
    with contextlib.suppress(OSError):
        os.nice(10)  # the run's own imports and load come first
    work = Work.from_json(args.work)
    import time

    import torch

    t0 = time.perf_counter()
    files: list[str] = []
    if args.device == "cuda" and not torch.cuda.is_available():
        note = "no CUDA device visible to torch: nothing compiled"
    else:
        try:
            files = compile_kind(work, args.kind, args.device)
            note = f"{len(files)} variant(s) of {args.kind}-stream blocks ready"
        except Exception as exc:  # noqa: BLE001 - the run compiles as usual; the marker keeps the next from retrying
            import traceback

            traceback.print_exc()
            note = f"failed: {type(exc).__name__}: {exc}"
    from . import precompiled

    info = {"files": files, "note": note, "seconds": round(time.perf_counter() - t0, 2), **precompiled.stats()}
    partial = args.marker.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(info, indent=1))
    os.replace(partial, args.marker)
    print(f"fluxkiln ahead: {note} in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
