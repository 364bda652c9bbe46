"""mini-flux's distillation phases: guidance distillation (dev) and few-step trajectory distillation
(schnell), data-parallel over the ranks of a launch like the base phase.  Used by :mod:`.train`."""

from __future__ import annotations

import copy
from typing import Any

from .config import TRANSFORMER
from .dist import World
from .pool import Pools
from .trainconfig import TrainConfig
from .trainparts import Ema, Plan, TextEncoder, autocast, adamw, budget, forward, log, noisy, pack


def distil_guidance(cfg: TrainConfig, m: dict[str, Any], pools: Pools, enc: TextEncoder,
                    world: World) -> tuple[Ema, dict[str, float]]:
    """Teach the guidance embedding: the student with guidance g matches the frozen teacher's classifier-free
    guidance u + g (c - u) in one forward pass."""
    import torch
    import torch.nn.functional as F

    teacher = m["transformer"].eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = adamw(student.parameters(), cfg.guide_lr, world.device)
    ema = Ema([student], cfg.distil_ema)
    device = world.device
    plan = Plan(budget(cfg, "guide"), cfg.guide_lr, warmup=50, world=world)
    lo, hi = cfg.guide_range
    step, loss = 0, torch.zeros(())
    while not plan.done(step):
        d = pools.batch(cfg.guide_batch, cfg.multi_res)
        latents, clip, t5, n = d.latents, d.clip, d.t5, len(d.latents)
        plan.set(opt, step)
        with autocast(device):
            xt, sigma, ids, _ = noisy(latents)
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
        _update(student, loss, opt, world, ema)
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


def distil_schnell(cfg: TrainConfig, dev: Any, pools: Pools, enc: TextEncoder,
                   world: World) -> tuple[Ema, dict[str, float]]:
    """Few-step distillation: the dev teacher (guidance ``schnell_guidance``) integrates each noise to an image
    in ``teacher_steps`` Euler steps; the student learns, for 1-4 step schedules, the one velocity that goes
    from the teacher's state at each step's start straight to its state at the step's end."""
    import torch
    import torch.nn.functional as F

    student = schnell_from(dev, cfg.schnell_guidance).train().requires_grad_(True)
    opt = adamw(student.parameters(), cfg.schnell_lr, world.device)
    ema = Ema([student], cfg.distil_ema)
    device = world.device
    plan = Plan(budget(cfg, "schnell"), cfg.schnell_lr, warmup=50, probe=2 * cfg.student_steps_per_batch,
                world=world, every=cfg.student_steps_per_batch)
    K, every = cfg.teacher_steps, cfg.teacher_steps // 12
    step, loss = 0, torch.zeros(())
    choices, weights = [1, 2, 3, 4], [0.1, 0.15, 0.15, 0.6]
    while not plan.done(step):
        d = pools.batch(cfg.schnell_batch, cfg.multi_res)
        latents, clip, t5, n = d.latents, d.clip, d.t5, len(d.latents)
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
            _update(student, loss, opt, world, ema)
            step += 1
        if step % 200 < cfg.student_steps_per_batch:
            log(f"schnell step {step}/{plan.total} loss {loss.item():.4f}")
    return ema, {"schnell_steps": step, "schnell_loss": round(loss.item(), 5),
                 "schnell_seconds": round(plan.elapsed(), 1)}


def _update(student: Any, loss: Any, opt: Any, world: Any, ema: Any) -> None:
    """One optimizer step of a distillation student: gradients averaged over the ranks, clipped at 1."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    world.average_grads(list(student.parameters()))
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    ema.update()
