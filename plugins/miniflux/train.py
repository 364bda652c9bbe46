"""Train mini-flux: the VAE (or keep one), the text encoders' role pre-training, the transformer with both
text encoders, guidance distillation (dev) and few-step distillation (schnell).  Every phase has a
wall-clock budget; each finished pipeline is written (as a FluxPipeline folder, float16, and a tar of it)
as soon as it exists.  The transformer phases draw their data from pools of pre-encoded scenes
(:mod:`.pool`); each phase plans its step count from its measured step time, and keeps the EMA or the raw
weights, whichever the checker scores higher.

    python -m fluxkiln.plugins.miniflux.train --out DIR [--work DIR] [--preset full|micro] [--set KEY=VALUE]...
    torchrun --standalone --nproc-per-node 4 -m fluxkiln.plugins.miniflux.train --out DIR ...

Under ``torchrun`` every rank renders its own data and the gradients are averaged (:mod:`.dist`); rank 0
alone chooses, logs and writes.  The data is generated on the fly (rendered scenes and their prompts;
held-out prompts never appear).  ``full`` is sized for one call of under ten minutes on four H200s;
``micro`` runs the same code on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from .base import ConditioningCheck, make_heads, train_base, train_text
from .config import build_modules
from .dist import World, join
from .distil import distil_guidance, distil_schnell
from .pool import Pools
from .render import to_pil
from .trainconfig import TrainConfig, preset
from .trainio import cfg_check, choose, extend_vocabulary, final_check, load_modules, load_vae, save
from .trainparts import (PLANNED, QUIET, T0, Ema, Plan, TextEncoder, adamw, autocast, batch_for, budget, log,
                         make_batch, pick_size)


def train_vae(cfg: TrainConfig, vae: Any, rng: random.Random, world: World) -> dict[str, float]:
    """Train the VAE (``vae_part = "decoder"``: its decoder only, on the frozen encoder's latents)."""
    import torch

    device = world.device
    decoder_only = cfg.vae_part == "decoder"
    vae.train().requires_grad_(False)
    params = [p for n, p in vae.named_parameters()
              if not decoder_only or n.startswith(("decoder.", "post_quant_conv."))]
    for p in params:
        p.requires_grad_(True)
    plan = Plan(budget(cfg, "vae"), cfg.vae_lr, warmup=50, world=world)
    opt = adamw(params, cfg.vae_lr, device)
    step, loss = 0, torch.zeros(())
    while not plan.done(step):
        size = pick_size(rng, cfg.native, cfg.multi_res)
        batch = make_batch(rng, batch_for(size, cfg.vae_batch, cfg.native), size, device,
                           masks=cfg.vae_object_weight > 0)
        plan.set(opt, step)
        loss = _vae_loss(cfg, vae, batch, decoder_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        world.average_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 500 == 0:
            log(f"vae step {step}/{plan.total} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return {"vae_steps": step, "vae_loss": round(loss.item(), 5), "vae_seconds": round(plan.elapsed(), 1)}


def _vae_loss(cfg: TrainConfig, vae: Any, batch: Any, decoder_only: bool) -> Any:
    """L1 + L2 of the round trip (weighted up on the objects when ``vae_object_weight``), + KL when the encoder
    trains."""
    import torch

    imgs = batch.images
    with autocast(imgs.device.type):
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(imgs).latent_dist
            z = post.sample()
        rec = vae.decode(z).sample.float()
    err = rec - imgs
    per_pixel = err.abs() + err.pow(2)
    if batch.cover is None:
        loss = per_pixel.mean()
    else:  # a weighted mean: the loss keeps its scale whatever the weight
        weight = 1.0 + cfg.vae_object_weight * batch.cover[:, None].float()
        loss = (weight * per_pixel).mean() / weight.mean()
    if not decoder_only:
        loss = loss + cfg.vae_kl * post.kl().float().mean()
    return loss


def calibrate_vae(cfg: TrainConfig, vae: Any, rng: random.Random, world: World) -> dict[str, Any]:
    """Set the latent shift and scale (as FLUX's VAE config has them) so latents have mean 0 and std 1 (rank
    0's measurement, on every rank); check round trips with the pixel checker, per attribute."""
    import torch

    from .adherence import score_images

    batch = make_batch(rng, 64, (cfg.native, cfg.native), world.device)
    with torch.no_grad(), autocast(world.device):
        z = vae.encode(batch.images).latent_dist.mode().float()
        rec = vae.decode(z).sample.float()
    shift, scale = world.agree(round(z.mean().item(), 4), round(1 / z.std().item(), 4))
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    row = score_images(to_pil(rec), batch.prompts)
    psnr = -10 * torch.log10(((rec.clamp(-1, 1) - batch.images) / 2).pow(2).mean()).item()
    log(f"vae shift {vae.config.shift_factor} scale {vae.config.scaling_factor} psnr {psnr:.1f} dB "
        f"round trips read by the checker: {row}")
    return {"vae_psnr_db": round(psnr, 2), "vae_roundtrip_all_right": round(row["all"] / 100, 3),
            "vae_roundtrip": row}


def _text(m: dict[str, Any], device: str) -> TextEncoder:
    return TextEncoder(m["text_encoder"], m["tokenizer"], m["text_encoder_2"], m["tokenizer_2"], device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxkiln.plugins.miniflux.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="tars of the pipelines and metrics.json go here")
    parser.add_argument("--work", type=Path, help="the pipeline folders go here (default: OUT/../miniflux-work)")
    parser.add_argument("--preset", default="full", help="full (the shipped weights) or micro (a CPU smoke run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item!r}: the value is read as JSON, so a string goes in quotes: "
                         f"--set {key}='\"{value}\"'")
    cfg = preset(args.preset, **overrides)
    return train(cfg, args.out, args.work or args.out.parent / "miniflux-work")


def train(cfg: TrainConfig, out: Path, work: Path) -> int:
    """Every phase; under ``torchrun`` on every rank (rank 0 writes ``out`` and ``work``)."""
    world = join()
    QUIET[0] = not world.main
    code = _train(cfg, out, work, world)
    world.close()
    if world.size > 1:  # no interpreter teardown: gloo/NCCL threads racing static destructors can abort it
        from fluxkiln.engine.launch import exit_now

        exit_now(code)
    return code


def _train(cfg: TrainConfig, out: Path, work: Path, world: World) -> int:
    import torch

    device = world.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    m = build_modules("dev") if not cfg.init else load_modules(Path(cfg.init))
    if cfg.vae_init:
        m["vae"] = load_vae(cfg.vae_init)
    added = extend_vocabulary(m, cfg.shape_words)
    for k, v in m.items():
        if isinstance(v, torch.nn.Module):
            m[k] = v.to(device)
    heads = make_heads(m, device)
    world.same_weights([v for v in m.values() if isinstance(v, torch.nn.Module)] + [heads])
    torch.manual_seed(cfg.seed + 1000 * world.rank)  # each rank its own noise and data
    rng = random.Random(cfg.seed + 7919 * world.rank)
    metrics: dict[str, Any] = {"config": cfg.__dict__, "ranks": world.size,
                               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "words_added": added}

    def write() -> None:
        if world.main:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))

    with _attention(device):
        if cfg.vae_seconds > 0:
            metrics |= train_vae(cfg, m["vae"], rng, world)
        metrics |= calibrate_vae(cfg, m["vae"], rng, world)
        enc = _text(m, device)
        pools = Pools(cfg.native, cfg.pool_size, cfg.pool_multi, cfg.pool_chunk, m["vae"], enc, rng, device,
                      cfg.refresh_share, cfg.two, cfg.swap_pairs, cfg.scene_shapes)
        metrics |= pools.fill(budget(cfg, "pool"), log)
        if cfg.text_seconds > 0:
            metrics |= train_text(cfg, m, heads, pools, enc, world)
        check = ConditioningCheck.build(cfg.check_scenes, cfg.seed + 5, cfg.native, m["vae"], enc, device) \
            if world.main and cfg.check_scenes > 0 else None
        ema, info = train_base(cfg, m, heads, pools, enc, world, check)
        metrics |= info
        del heads
        m |= _choose(world, cfg, "base", _candidates(m, ema, ("transformer", "text_encoder", "text_encoder_2")),
                     "dev", 1.0, metrics)
        del ema
        enc = _text(m, device)
        if world.main:
            metrics["base_chosen_checks"] = check.losses(m["transformer"], enc) if check else None
            save(m, m["transformer"], "dev", work, out)  # a fallback, replaced once guidance is distilled
            if cfg.select_prompts > 0 and cfg.cfg_check_scales:
                metrics["base_cfg"] = cfg_check(cfg, m)
        write()
        ema, info = distil_guidance(cfg, m, pools, enc, world)
        metrics |= info
        dev = _choose(world, cfg, "dev", _candidates(m, ema, ("transformer",)), "dev", 3.0, metrics)["transformer"]
        del ema
        if world.main:
            save(m, dev, "dev", work, out)
        write()
        ema, info = distil_schnell(cfg, dev, pools, enc, world)
        metrics |= info
        schnell = _choose(world, cfg, "schnell", _candidates(m, ema, ("transformer",)), "schnell", None, metrics)
        metrics["ranks_agree"] = world.agreeing([m["text_encoder"], m["text_encoder_2"], dev, schnell["transformer"]])
        if world.main:
            save(m, schnell["transformer"], "schnell", work, out)
            metrics["total_seconds"] = round(time.monotonic() - T0, 1)
            write()
            if cfg.eval_prompts > 0 and time.monotonic() - T0 < cfg.deadline:
                metrics["adherence"] = final_check(cfg, work, device)
            metrics["total_seconds"] = round(time.monotonic() - T0, 1)
            write()
            _print_table(metrics)
    world.barrier()  # the other ranks wait for rank 0's writing, then all leave together
    return 0


def _choose(world: World, cfg: TrainConfig, name: str, candidates: dict[str, dict[str, Any]], variant: str,
            guidance: float | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 scores the candidates and picks one; every rank takes the same."""
    labels = list(candidates)
    pick = 0
    if world.main:
        choose(cfg, name, candidates, variant, guidance, metrics)
        pick = labels.index(metrics[f"{name}_choice"]["kept"])
    return candidates[labels[int(world.agree(pick)[0])]]


def _candidates(m: dict[str, Any], ema: Ema, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``m`` with the EMA's averaged modules and with the live (raw) ones in place of ``names``, frozen."""
    out = {}
    for label, mods in (("ema", ema.shadow), ("raw", ema.modules)):
        for mod in mods:
            mod.eval().requires_grad_(False)
        out[label] = m | dict(zip(names, mods, strict=True))
    return out


def _attention(device: str) -> Any:
    """On CUDA, no cuDNN attention (it failed in backward on an H100): flash, memory-efficient, else math."""
    import contextlib

    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _print_table(metrics: dict[str, Any]) -> None:
    print("\n| phase | steps | seconds | final loss |\n|---|---|---|---|")
    for phase in PLANNED:
        print(f"| {phase} | {metrics.get(phase + '_steps')} | {metrics.get(phase + '_seconds')} | "
              f"{metrics.get(phase + '_loss')} |")
    print(f"\nVAE: {metrics.get('vae_psnr_db')} dB, round trips all right {metrics.get('vae_roundtrip_all_right')}")
    for label, row in (metrics.get("adherence") or {}).items():
        print(f"{label}: {row}")
    print(f"total {metrics.get('total_seconds')} s")


if __name__ == "__main__":
    sys.exit(main())
