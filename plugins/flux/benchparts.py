"""Pieces of ``fluxkiln bench``: the full-size random-weight FLUX.1 pipelines and their config-only
folders, the quality-guard inputs, the stock peft training loop, the targets of issue 9 and the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FLUX_DEV = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
                axes_dims_rope=(16, 56, 56))
VAE_FULL = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
SCHEDULERS = {"dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096),
              "schnell": dict(shift=1.0, use_dynamic_shifting=False)}
WEIGHT_SCALE = 0.5  # random weights x 0.5 keep activations finite through 57 blocks
# issue 9's targets: (result section, row, field, stock here, target, comparison)
TARGETS = [
    ("sample 28 steps, lossless", "sample", "dev-lossless", "s_per_image", "5.27 s", 4.0),
    ("sample 28 steps, go_fast", "sample", "dev-go_fast", "s_per_image", "-", 2.6),
    ("sample schnell 4 steps, go_fast", "sample", "schnell-go_fast", "s_per_image", "0.85 s", 0.45),
    ("train step rank 16, no checkpointing", "train", "no_ckpt", "s_per_step", "0.58 s", 0.45),
    ("train step, gradient checkpointing", "train", "ckpt", "s_per_step", "0.87 s", 0.65),
    ("train at 1024 on a 24 GB card: peak GiB", "train", "fp8_ckpt_24gb", "peak_reserved_gib", "-", 22.0),
    ("one-time compile per shape", "sample", "dev-lossless", "compile_warmup_s", "-", 30.0),
    ("engine overhead (sample node vs bare pipeline)", "sample", "dev-lossless", "engine.overhead_run_pct", "-",
     2.0),
]


def build_full_size(device: str) -> dict[str, Any]:
    """FLUX.1-dev and -schnell pipelines of full size with random bf16 weights (schnell shares dev's blocks)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from . import tiny

    clip_tok, t5_tok = tiny._clip_tokenizer(), tiny._t5_tokenizer()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            dev = FluxTransformer2DModel(**FLUX_DEV)
            schnell = FluxTransformer2DModel(**{**FLUX_DEV, "guidance_embeds": False, "num_layers": 0,
                                                "num_single_layers": 0})
            vae = AutoencoderKL(**VAE_FULL)
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(clip_tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id))
            t5 = T5EncoderModel(T5Config(
                vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, relative_attention_num_buckets=32,
                decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for module in (dev, schnell, t5):
            for p in module.parameters():
                p.mul_(WEIGHT_SCALE)
    for module in (dev, schnell, vae, clip, t5):
        module.to(torch.bfloat16).eval().requires_grad_(False)
    schnell.transformer_blocks = dev.transformer_blocks
    schnell.single_transformer_blocks = dev.single_transformer_blocks
    schnell.register_to_config(num_layers=FLUX_DEV["num_layers"], num_single_layers=FLUX_DEV["num_single_layers"])
    return {variant: FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]), vae=vae,
                                  text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                                  transformer=transformer)
            for variant, transformer in (("dev", dev), ("schnell", schnell))}


def write_config_folder(folder: Path, pipe: Any) -> Path:
    """A diffusers-style folder with every component's config and tokenizer but no weights."""
    import shutil

    import diffusers

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    index: dict[str, Any] = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__}
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        index[name] = [type(comp).__module__.split(".")[0], type(comp).__name__]
        sub = folder / name
        sub.mkdir()
        if hasattr(comp, "save_config"):  # diffusers models and schedulers
            comp.save_config(sub)
        elif hasattr(comp, "config") and hasattr(comp.config, "save_pretrained"):  # transformers models
            comp.config.save_pretrained(sub)
        else:  # tokenizers
            comp.save_pretrained(sub)
    (folder / "RANDOM_WEIGHTS.txt").write_text("Configs only: `fluxkiln bench` built this pipeline with random "
                                                "weights in memory; this folder cannot be loaded.\n")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def guard_inputs(pipe: Any, size: int, variant: str, device: str) -> dict[str, Any]:
    """Fixed transformer inputs of the shapes sampling uses (so compiled graphs are reused)."""
    import torch

    from .sample import MAX_TEXT_TOKENS

    t = pipe.transformer
    cfg, dtype = t.config, t.dtype
    side = size // (pipe.vae_scale_factor * 2)
    gen = torch.Generator().manual_seed(11)
    tokens = MAX_TEXT_TOKENS[variant]

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return dict(hidden_states=rand(1, side * side, cfg.in_channels), encoder_hidden_states=rand(1, tokens,
                cfg.joint_attention_dim), pooled_projections=rand(1, cfg.pooled_projection_dim),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((1,), 3.0, device=device) if cfg.guidance_embeds else None,
                img_ids=pipe._prepare_latent_image_ids(1, side, side, device, dtype),
                txt_ids=torch.zeros(tokens, 3, device=device, dtype=dtype))


def block_inputs(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs of the first double-stream block, derived from :func:`guard_inputs` (a more sensitive guard)."""
    import torch

    t = pipe.transformer
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        rot = t.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]], dim=0))
        return dict(hidden_states=t.x_embedder(inputs["hidden_states"]),
                    encoder_hidden_states=t.context_embedder(inputs["encoder_hidden_states"]),
                    temb=torch.randn(1, t.inner_dim, generator=gen).to(inputs["hidden_states"]),
                    image_rotary_emb=rot)


def block_output(pipe: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return pipe.transformer.transformer_blocks[0](**inputs)[1].float().cpu()


def kernel_probe(device: str) -> dict[str, Any]:
    """What the hardware gives at FLUX's 1024² shapes: attention per SDPA backend, bf16 vs fp8 GEMM."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .fast import fp8_linear_class

    def clock(fn: Any, n: int = 10) -> float:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(n):
            fn()
        t1.record()
        torch.cuda.synchronize()
        return t0.elapsed_time(t1) / n / 1000

    out: dict[str, Any] = {}
    q, k, v = (torch.randn(1, 24, 4608, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn_like(q)
    flops = 4 * 4608 * 4608 * 128 * 24
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                s = clock(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            out[f"attention_{name.lower()}"] = {"ms": round(s * 1e3, 3), "tflops": round(flops / s / 1e12, 1)}
            with sdpa_kernel(getattr(SDPBackend, name)):
                s = clock(lambda: torch.nn.functional.scaled_dot_product_attention(qg, kg, vg).backward(dout))
            out[f"attention_{name.lower()}_fwd_bwd"] = {"ms": round(s * 1e3, 3),
                                                        "tflops": round(3.5 * flops / s / 1e12, 1)}
        except RuntimeError as exc:
            out[f"attention_{name.lower()}"] = f"unavailable: {str(exc).splitlines()[0][:120]}"
    x = torch.randn(4608, 3072, device=device, dtype=torch.bfloat16)
    lin = torch.nn.Linear(3072, 12288, device=device, dtype=torch.bfloat16)
    gemm = 2 * 4608 * 3072 * 12288
    with torch.no_grad():
        s = clock(lambda: lin(x))
        out["gemm_bf16_4608x3072x12288"] = {"ms": round(s * 1e3, 3), "tflops": round(gemm / s / 1e12, 1)}
        f8 = fp8_linear_class()(lin)
        s = clock(lambda: f8(x))
        out["gemm_fp8_rowwise_eager_incl_quant"] = {"ms": round(s * 1e3, 3), "tflops": round(gemm / s / 1e12, 1)}
        xq = x.to(torch.float8_e4m3fn)
        ones = torch.ones(4608, 1, device=device)
        s = clock(lambda: torch._scaled_mm(xq, f8.weight_fp8.t(), scale_a=ones, scale_b=f8.weight_scale,
                                           out_dtype=torch.bfloat16))
        out["gemm_fp8_rowwise_matmul_only"] = {"ms": round(s * 1e3, 3), "tflops": round(gemm / s / 1e12, 1)}
    return out


def cache_store_seconds(image: Any) -> dict[str, float]:
    """How long the engine's disk cache takes to store one output image (the images port type's save)."""
    import tempfile
    import time
    from pathlib import Path

    from fluxkiln.engine.ports import BUILTIN_PORT_TYPES, ImageItem, Images

    images = next(p for p in BUILTIN_PORT_TYPES if p.name == "images")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images.save(Images([ImageItem(image=image)]), Path(tmp))
        return {"cache_store_s": round(time.perf_counter() - t0, 4)}


def rel_diff(got: Any, ref: Any) -> float:
    """‖got − ref‖ / ‖ref‖ of two tensors or two PIL images (as float arrays)."""
    import numpy as np

    a = np.asarray(got.float().numpy() if hasattr(got, "numpy") else got, dtype=np.float64)
    b = np.asarray(ref.float().numpy() if hasattr(ref, "numpy") else ref, dtype=np.float64)
    denom = float(np.linalg.norm(b)) or 1.0
    return round(float(np.linalg.norm(a - b)) / denom, 6)


def _field(row: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 9's targets with what this run measured (only meaningful with full-size shapes on an H100)."""
    out = []
    for work, section, row, field, stock, limit in TARGETS:
        value = _field(results.get(section, {}).get(row, {}), field)
        met = None if value is None or results.get("mode") == "tiny" else value <= limit
        out.append({"work": work, "stock_here": stock, "target": f"<= {limit:g}", "measured": value, "met": met})
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def render_table(results: dict[str, Any]) -> str:
    """The human-readable summary printed last."""
    lines = [f"fluxkiln bench — {results.get('gpu', '?')}, torch {results.get('torch', '?')}, "
             f"diffusers {results.get('diffusers', '?')}, {results.get('mode')}, {results.get('date')}", ""]
    head = f"{'sample':<18}{'s/image':>9}{'s/step':>9}{'peak GiB':>10}{'compile s':>10}{'x stock':>9}" \
           f"{'Δ block':>9}{'Δ transf.':>11}{'Δ image':>9}{'overhead %':>11}"
    lines += [head, "-" * len(head)]
    for name, r in results.get("sample", {}).items():
        eng = r.get("engine", {})
        lines.append(f"{name:<18}{_fmt(r.get('s_per_image')):>9}{_fmt(r.get('s_per_step'), '.4f'):>9}"
                     f"{_fmt(r.get('peak_gib'), '.1f'):>10}{_fmt(r.get('compile_warmup_s'), '.1f'):>10}"
                     f"{_fmt(r.get('ratio_to_stock')):>9}{_fmt(r.get('block_rel_diff'), '.4f'):>9}"
                     f"{_fmt(r.get('transformer_rel_diff'), '.4f'):>11}"
                     f"{_fmt(r.get('image_rel_diff'), '.4f'):>9}{_fmt(eng.get('overhead_run_pct'), '.1f'):>11}")
    if results.get("train"):
        head = f"{'train':<18}{'s/step':>9}{'peak GiB':>10}{'reserved':>10}{'x stock':>9}"
        lines += ["", head, "-" * len(head)]
        for name, r in results["train"].items():
            lines.append(f"{name:<18}{_fmt(r.get('s_per_step'), '.4f'):>9}{_fmt(r.get('peak_gib'), '.1f'):>10}"
                         f"{_fmt(r.get('peak_reserved_gib'), '.1f'):>10}{_fmt(r.get('ratio_to_stock')):>9}"
                         + (f"  skipped: {r['skipped']}" if r.get("skipped") else ""))
    steps = {n: r["gpu_step"] for n, r in results.get("sample", {}).items() if r.get("gpu_step")}
    if steps:
        lines += ["", "one transformer forward, GPU kernel ms by kind (idle = GPU waiting)"]
        for name, g in steps.items():
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in g["ms_by_kind"].items())
            lines.append(f"{name:<18}{g['wall_ms']:>8.1f} ms  idle {g['idle_pct']}%  {kinds}")
    if results.get("targets"):
        lines += ["", f"{'target':<48}{'stock':>8}{'target':>9}{'measured':>10}  met"]
        for t in results["targets"]:
            met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
            lines.append(f"{t['work']:<48}{t['stock_here']:>8}{t['target']:>9}{_fmt(t['measured']):>10}  {met}")
    for e in results.get("errors", []):
        lines.append(f"error in {e['part']}: {e['error']}")
    return "\n".join(lines)
