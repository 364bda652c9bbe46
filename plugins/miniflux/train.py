"""Train mini-flux from scratch: the VAE, the transformer with both text encoders, guidance distillation
(dev) and few-step distillation (schnell).  Every phase has a wall-clock budget; each finished pipeline
is written (as a FluxPipeline folder, float16, and a tar of it) as soon as it exists.  The transformer
phases draw their data from pools of pre-encoded scenes (:mod:`.pool`); each phase plans its step count
from its measured step time, and keeps the EMA or the raw weights, whichever the checker scores higher.

    python -m fluxkiln.plugins.miniflux.train --out DIR [--work DIR] [--preset full|micro] [--set KEY=VALUE]...

The data is generated on the fly (rendered scenes and their prompts; held-out prompts never appear).
``full`` is sized for one call of under ten minutes on an H100 or H200 (the shipped weights come from
an earlier version of this script, see docs/mini-flux.md); ``micro`` runs the same code on a CPU in a
few minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from .config import TRANSFORMER, build_modules
from .pool import Pools
from .render import to_pil
from .trainconfig import TrainConfig, preset
from .trainio import choose, final_check, load_modules, save
from .trainparts import (T0, Ema, Plan, TextEncoder, batch_for, forward, log, make_batch, pack, pick_size,
                         shifted_sigmas)

PLANNED = ("vae", "pool", "base", "guide", "schnell")


def budget(cfg: TrainConfig, phase: str) -> float:
    """The phase's planned seconds, cut so that the later phases' plans still fit before the deadline."""
    later = sum(getattr(cfg, f"{p}_seconds") for p in PLANNED[PLANNED.index(phase) + 1:])
    left = cfg.deadline - (time.monotonic() - T0) - later - cfg.reserve
    return max(0.25 * getattr(cfg, f"{phase}_seconds"), min(getattr(cfg, f"{phase}_seconds"), left))


def autocast(device: str) -> Any:
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")


def adamw(params: Any, lr: float, device: str, weight_decay: float = 0.0) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, fused=device == "cuda")


def train_vae(cfg: TrainConfig, vae: Any, rng: random.Random, device: str) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    plan = Plan(budget(cfg, "vae"), cfg.vae_lr, warmup=50)
    opt = adamw(vae.parameters(), cfg.vae_lr, device)
    vae.train().requires_grad_(True)
    step, loss = 0, torch.zeros(())
    while not plan.done(step):
        size = pick_size(rng, cfg.native, cfg.multi_res)
        imgs = make_batch(rng, batch_for(size, cfg.vae_batch, cfg.native), size, device).images
        plan.set(opt, step)
        with autocast(device):
            post = vae.encode(imgs).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        loss = F.l1_loss(rec, imgs) + F.mse_loss(rec, imgs) + cfg.vae_kl * post.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 500 == 0:
            log(f"vae step {step}/{plan.total} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return {"vae_steps": step, "vae_loss": round(loss.item(), 5), "vae_seconds": round(plan.elapsed(), 1)}


def calibrate_vae(cfg: TrainConfig, vae: Any, rng: random.Random, device: str) -> dict[str, float]:
    """Set the latent shift and scale (as FLUX's VAE config has them) so latents have mean 0 and std 1; check
    round trips with the pixel checker."""
    import torch

    from .checker import check

    batch = make_batch(rng, 64, (cfg.native, cfg.native), device)
    with torch.no_grad(), autocast(device):
        z = vae.encode(batch.images).latent_dist.mode().float()
        rec = vae.decode(z).sample.float()
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    right = [check(im, p).all_right for im, p in zip(to_pil(rec), batch.prompts, strict=True)]
    psnr = -10 * torch.log10(((rec.clamp(-1, 1) - batch.images) / 2).pow(2).mean()).item()
    log(f"vae shift {vae.config.shift_factor} scale {vae.config.scaling_factor} psnr {psnr:.1f} dB "
        f"round trips all right {sum(right)}/{len(right)}")
    return {"vae_psnr_db": round(psnr, 2), "vae_roundtrip_all_right": round(sum(right) / len(right), 3)}


def _noisy(latents: Any) -> tuple[Any, Any, Any, Any]:
    """Flow-matching inputs of normalised latents: (noisy packed latents, sigma, image ids, velocity target)."""
    import torch

    packed, ids = pack(latents)
    noise = torch.randn_like(packed)
    sigma = shifted_sigmas(len(packed), packed.shape[1], packed.device)
    xt = (1 - sigma[:, None, None]) * packed + sigma[:, None, None] * noise
    return xt, sigma, ids, noise - packed


def _text(m: dict[str, Any], device: str) -> TextEncoder:
    return TextEncoder(m["text_encoder"], m["tokenizer"], m["text_encoder_2"], m["tokenizer_2"], device)


def train_base(cfg: TrainConfig, m: dict[str, Any], pools: Pools, device: str) -> tuple[Ema, dict[str, float]]:
    """Flow matching on the transformer and both text encoders together, with caption dropout."""
    import torch
    import torch.nn.functional as F

    trained = [m["transformer"], m["text_encoder"], m["text_encoder_2"]]
    for mod in trained:
        mod.train().requires_grad_(True)
    params = [p for mod in trained for p in mod.parameters()]
    opt = adamw(params, cfg.base_lr, device, weight_decay=0.01)
    ema = Ema(trained, cfg.ema)
    enc = _text(m, device)
    plan = Plan(budget(cfg, "base"), cfg.base_lr, warmup=cfg.base_warmup)
    step, loss = 0, torch.zeros(())
    while not plan.done(step):
        latents, clip, t5 = pools.batch(cfg.base_batch, cfg.multi_res, cfg.caption_dropout)
        plan.set(opt, step)
        with autocast(device):
            xt, sigma, ids, target = _noisy(latents)
            seq, pooled = enc.encode(clip, t5)
            pred = forward(m["transformer"], xt, sigma, ids, seq, pooled, guidance=torch.ones(len(xt), device=device))
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        pools.refresh()
        if step % 500 == 0:
            log(f"base step {step}/{plan.total} loss {loss.item():.4f} (captions shuffled: "
                f"{_shuffled_loss(m, enc, xt, sigma, ids, target, clip, t5):.4f}) lr {plan.rate(step):.2e} "
                f"scenes made {pools.made()}")
    return ema, {"base_steps": step, "base_loss": round(loss.item(), 5), "base_seconds": round(plan.elapsed(), 1),
                 "scenes_made": pools.made()}


def _shuffled_loss(m: dict[str, Any], enc: TextEncoder, xt: Any, sigma: Any, ids: Any, target: Any, clip: Any,
                   t5: Any) -> float:
    """The batch's loss with its captions shuffled: above the true loss once the text conditions the model."""
    import torch
    import torch.nn.functional as F

    perm = torch.randperm(len(xt), device=xt.device)
    with torch.no_grad(), autocast(xt.device.type):
        seq, pooled = enc.encode(clip[perm], t5[perm])
        pred = forward(m["transformer"], xt, sigma, ids, seq, pooled, guidance=torch.ones(len(xt), device=xt.device))
    return F.mse_loss(pred.float(), target).item()


def distil_guidance(cfg: TrainConfig, m: dict[str, Any], pools: Pools, device: str) -> tuple[Ema, dict[str, float]]:
    """Teach the guidance embedding: the student with guidance g matches the frozen teacher's classifier-free
    guidance u + g (c - u) in one forward pass."""
    import torch
    import torch.nn.functional as F

    teacher = m["transformer"].eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = adamw(student.parameters(), cfg.guide_lr, device)
    ema = Ema([student], cfg.distil_ema)
    enc = _text(m, device)
    plan = Plan(budget(cfg, "guide"), cfg.guide_lr, warmup=50)
    lo, hi = cfg.guide_range
    step, loss = 0, torch.zeros(())
    while not plan.done(step):
        latents, clip, t5 = pools.batch(cfg.guide_batch, cfg.multi_res)
        n = len(latents)
        plan.set(opt, step)
        with autocast(device):
            xt, sigma, ids, _ = _noisy(latents)
            with torch.no_grad():
                seq, pooled = enc.encode(torch.cat([clip, pools.empty[0].expand(n, -1)]),
                                         torch.cat([t5, pools.empty[1].expand(n, -1)]))
                both = forward(teacher, torch.cat([xt, xt]), torch.cat([sigma, sigma]), ids, seq, pooled,
                               guidance=torch.ones(2 * n, device=device)).float()
                cond, uncond = both.chunk(2)
            g = lo + (hi - lo) * torch.rand(n, device=device)
            target = uncond + g[:, None, None] * (cond - uncond)
            pred = forward(student, xt, sigma, ids, seq[:n], pooled[:n], guidance=g)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema.update()
        step += 1
        if step % 200 == 0:
            log(f"guidance step {step}/{plan.total} loss {loss.item():.4f}")
    return ema, {"guide_steps": step, "guide_loss": round(loss.item(), 5), "guide_seconds": round(plan.elapsed(), 1)}


def schnell_from(dev: Any, guidance: float) -> Any:
    """A transformer without a guidance embedding that computes exactly what ``dev`` computes at ``guidance``:
    the (constant) guidance embedding is folded into the pooled-text projection's bias."""
    import torch
    from diffusers import FluxTransformer2DModel

    student = FluxTransformer2DModel(guidance_embeds=False, **TRANSFORMER).to(next(dev.parameters()).device)
    state = {k: v for k, v in dev.state_dict().items() if "guidance_embedder" not in k}
    student.load_state_dict(state)
    emb = dev.time_text_embed
    with torch.no_grad():
        g = torch.full((1,), guidance * 1000.0, device=next(dev.parameters()).device)
        const = emb.guidance_embedder(emb.time_proj(g).to(next(dev.parameters()).dtype))[0]
        student.time_text_embed.text_embedder.linear_2.bias.add_(const)
    return student


def distil_schnell(cfg: TrainConfig, m: dict[str, Any], dev: Any, pools: Pools,
                   device: str) -> tuple[Ema, dict[str, float]]:
    """Few-step distillation: the dev teacher (guidance ``schnell_guidance``) integrates each noise to an image
    in ``teacher_steps`` Euler steps; the student learns, for 1-4 step schedules, the one velocity that goes
    from the teacher's state at each step's start straight to its state at the step's end."""
    import torch
    import torch.nn.functional as F

    student = schnell_from(dev, cfg.schnell_guidance).train().requires_grad_(True)
    opt = adamw(student.parameters(), cfg.schnell_lr, device)
    ema = Ema([student], cfg.distil_ema)
    enc = _text(m, device)
    plan = Plan(budget(cfg, "schnell"), cfg.schnell_lr, warmup=50, probe=2 * cfg.student_steps_per_batch)
    K, every = cfg.teacher_steps, cfg.teacher_steps // 12
    step, loss = 0, torch.zeros(())
    choices, weights = [1, 2, 3, 4], [0.1, 0.15, 0.15, 0.6]
    while not plan.done(step):
        latents, clip, t5 = pools.batch(cfg.schnell_batch, cfg.multi_res)
        n = len(latents)
        with torch.no_grad(), autocast(device):
            seq, pooled = enc.encode(clip, t5)
            x, ids = pack(torch.randn_like(latents))
            states, g = [x], torch.full((n,), cfg.schnell_guidance, device=device)
            for k in range(K):
                s, s_next = 1 - k / K, 1 - (k + 1) / K
                v = forward(dev, x, torch.full((n,), s, device=device), ids, seq, pooled, guidance=g).float()
                x = x + (s_next - s) * v
                if (k + 1) % every == 0:
                    states.append(x)
        traj = torch.stack(states)  # (13, n, L, C): states at sigma = 1 - j/12
        for _ in range(cfg.student_steps_per_batch):
            steps = torch.tensor(pools.rng.choices(choices, weights, k=n), device=device)
            i = (torch.rand(n, device=device) * steps).floor().long()
            j0, j1 = 12 * i // steps, 12 * (i + 1) // steps
            rows = torch.arange(n, device=device)
            x0, x1 = traj[j0, rows], traj[j1, rows]
            s0, s1 = 1 - i / steps, 1 - (i + 1) / steps
            target = (x1 - x0) / (s1 - s0)[:, None, None]
            plan.set(opt, step)
            with autocast(device):
                pred = forward(student, x0, s0.float(), ids, seq, pooled)
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            ema.update()
            step += 1
        if step % 200 < cfg.student_steps_per_batch:
            log(f"schnell step {step}/{plan.total} loss {loss.item():.4f}")
    return ema, {"schnell_steps": step, "schnell_loss": round(loss.item(), 5),
                 "schnell_seconds": round(plan.elapsed(), 1)}


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
        overrides[key] = json.loads(value)
    cfg = preset(args.preset, **overrides)
    return train(cfg, args.out, args.work or args.out.parent / "miniflux-work")


def train(cfg: TrainConfig, out: Path, work: Path) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    m = build_modules("dev") if not cfg.init else load_modules(Path(cfg.init))
    for k, v in m.items():
        if isinstance(v, torch.nn.Module):
            m[k] = v.to(device)
    metrics: dict[str, Any] = {"config": cfg.__dict__,
                               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}

    def write() -> None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))

    with _attention(device):
        if cfg.vae_seconds > 0:
            metrics |= train_vae(cfg, m["vae"], rng, device)
            metrics |= calibrate_vae(cfg, m["vae"], rng, device)
        pools = Pools(cfg.native, cfg.pool_size, cfg.pool_multi, cfg.pool_chunk, m["vae"], _text(m, device), rng,
                      device, cfg.refresh_share, cfg.two)
        metrics |= pools.fill(budget(cfg, "pool"), log)
        ema, info = train_base(cfg, m, pools, device)
        metrics |= info
        m |= choose(cfg, "base", _candidates(m, ema, ("transformer", "text_encoder", "text_encoder_2")), "dev", 1.0,
                    metrics)
        del ema
        save(m, m["transformer"], "dev", work, out)  # a fallback, replaced once guidance is distilled
        write()
        ema, info = distil_guidance(cfg, m, pools, device)
        metrics |= info
        dev = choose(cfg, "dev", _candidates(m, ema, ("transformer",)), "dev", 3.0, metrics)["transformer"]
        del ema
        save(m, dev, "dev", work, out)
        write()
        ema, info = distil_schnell(cfg, m, dev, pools, device)
        metrics |= info
        schnell = choose(cfg, "schnell", _candidates(m, ema, ("transformer",)), "schnell", None, metrics)
        save(m, schnell["transformer"], "schnell", work, out)
        metrics["total_seconds"] = round(time.monotonic() - T0, 1)
        write()
        if cfg.eval_prompts > 0 and time.monotonic() - T0 < cfg.deadline:
            metrics["adherence"] = final_check(cfg, work, device)
    metrics["total_seconds"] = round(time.monotonic() - T0, 1)
    write()
    _print_table(metrics)
    return 0


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
