"""mini-flux's base training: the text encoders' role pre-training, then flow matching on the transformer
and both text encoders with the auxiliary role losses (:mod:`.roles`) and object-weighted flow loss, and
the conditioning checks logged on the way.  Data-parallel over the ranks of a launch (:mod:`.dist`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .dist import World
from .pool import Draw, Pools
from .roles import aux_heads, aux_loss, swap_roles
from .trainconfig import TrainConfig
from .trainparts import (Ema, Plan, TextEncoder, adamw, autocast, budget, draw_scenes, forward, latents_of, log,
                         noisy, pack)
from .world import random_scene

TEXT_MODULES = ("text_encoder", "text_encoder_2")


def make_heads(m: dict[str, Any], device: str) -> Any:
    return aux_heads(m["text_encoder_2"].config.d_model, m["text_encoder"].config.hidden_size).to(device)


def _text_params(m: dict[str, Any], heads: Any) -> list[Any]:
    return [p for name in TEXT_MODULES for p in m[name].parameters()] + list(heads.parameters())


def _accuracy_line(acc: dict[str, Any]) -> str:
    return ", ".join(f"{k} {100 * float(v):.1f}" for k, v in acc.items())


def train_text(cfg: TrainConfig, m: dict[str, Any], heads: Any, pools: Pools, enc: TextEncoder,
               world: World) -> dict[str, Any]:
    """The text encoders and the heads on the auxiliary losses alone (no images): role-tagged features
    before the transformer starts to read them."""
    import torch

    for name in TEXT_MODULES:
        m[name].train().requires_grad_(True)
    params = _text_params(m, heads)
    opt = adamw(params, cfg.text_lr, world.device, weight_decay=0.01)
    plan = Plan(budget(cfg, "text"), cfg.text_lr, warmup=30, world=world)
    step, loss, acc = 0, torch.zeros(()), {}
    while not plan.done(step):
        d = pools.batch(cfg.text_batch, 0.0)
        plan.set(opt, step)
        with autocast(world.device):
            seq, pooled = enc.encode(d.clip, d.t5)
            loss, acc = aux_loss(heads, seq, pooled, d.t5_labels, d.pooled_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        world.average_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            log(f"text step {step}/{plan.total} loss {loss.item():.4f} accuracy: {_accuracy_line(acc)}")
    accuracy = {k: round(100 * float(v), 1) for k, v in acc.items()}
    log(f"text: {step} steps, loss {loss.item():.4f}, accuracy: {_accuracy_line(acc)}")
    return {"text_steps": step, "text_loss": round(loss.item(), 5), "text_seconds": round(plan.elapsed(), 1),
            "text_accuracy": accuracy}


@dataclass
class ConditioningCheck:
    """A fixed set of held-in scenes (one or two objects, background said) with fixed noise: the flow loss with
    their true captions, with captions shuffled among them, and with the first object's and the
    background's colours swapped.  A model that binds colours to roles has a swapped loss above the true one."""

    xt: Any
    sigma: Any
    ids: Any
    target: Any
    captions: dict[str, tuple[Any, Any]]

    @classmethod
    def build(cls, n: int, seed: int, native: int, vae: Any, enc: TextEncoder, device: str) -> ConditioningCheck:
        import torch

        rng = random.Random(seed)
        scenes = []
        while len(scenes) < n:
            scene = random_scene(rng)
            if swap_roles(scene) is not None:
                scenes.append(scene)
        batch = draw_scenes(scenes, rng, (native, native), device)
        with autocast(device):
            z = latents_of(vae, batch.images).float()
        packed, ids = pack(z)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(packed.shape, generator=gen).to(device)
        sigma = torch.linspace(0.3, 0.9, n, device=device)
        xt = (1 - sigma[:, None, None]) * packed + sigma[:, None, None] * noise
        perm = [(i + 1) % n for i in range(n)]
        captions = {"true": enc.ids(batch.prompts), "shuffled": enc.ids([batch.prompts[i] for i in perm]),
                    "roles swapped": enc.ids([swap_roles(s).prompt for s in scenes])}  # type: ignore[union-attr]
        return cls(xt, sigma, ids, noise - packed, captions)

    def losses(self, transformer: Any, enc: TextEncoder) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        out = {}
        ones = torch.ones(len(self.xt), device=self.xt.device)
        with torch.no_grad(), autocast(self.xt.device.type):
            for label, (clip, t5) in self.captions.items():
                seq, pooled = enc.encode(clip, t5)
                pred = forward(transformer, self.xt, self.sigma, self.ids, seq, pooled, guidance=ones)
                out[label] = round(F.mse_loss(pred.float(), self.target).item(), 5)
        return out


def flow_loss(pred: Any, target: Any, cover: Any, object_weight: float) -> Any:
    """Mean squared velocity error, each latent token weighted 1 + ``object_weight`` x its object coverage."""
    weight = 1 + object_weight * cover
    return ((pred.float() - target).pow(2).mean(-1) * weight).sum() / weight.sum()


def train_base(cfg: TrainConfig, m: dict[str, Any], heads: Any, pools: Pools, enc: TextEncoder, world: World,
               check: ConditioningCheck | None) -> tuple[Ema, dict[str, Any]]:
    """Flow matching on the transformer and both text encoders together (the text side at ``text_lr_scale``
    times the rate), caption dropout, the auxiliary role losses, object-weighted flow loss."""
    import torch

    trained = [m["transformer"], m["text_encoder"], m["text_encoder_2"]]
    for mod in trained + [heads]:
        mod.train().requires_grad_(True)
    image_params, text_params = list(m["transformer"].parameters()), _text_params(m, heads)
    params = image_params + text_params
    opt = adamw([{"params": image_params, "scale": 1.0}, {"params": text_params, "scale": cfg.text_lr_scale}],
                cfg.base_lr, world.device, weight_decay=0.01)
    ema = Ema(trained, cfg.ema)
    plan = Plan(budget(cfg, "base"), cfg.base_lr, warmup=cfg.base_warmup, world=world)
    step, history = 0, []
    flow = aux = torch.zeros(())
    acc: dict[str, Any] = {}
    while not plan.done(step):
        d: Draw = pools.batch(cfg.base_batch, cfg.multi_res, cfg.caption_dropout)
        plan.set(opt, step)
        with autocast(world.device):
            xt, sigma, ids, target = noisy(d.latents)
            seq, pooled = enc.encode(d.clip, d.t5)
            pred = forward(m["transformer"], xt, sigma, ids, seq, pooled,
                           guidance=torch.ones(len(xt), device=world.device))
            aux, acc = aux_loss(heads, seq, pooled, d.t5_labels, d.pooled_labels)
        flow = flow_loss(pred, target, d.cover, cfg.object_weight)
        loss = flow + cfg.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        world.average_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        if step % cfg.refresh_every == 0:
            pools.refresh(lambda due: world.agree(float(due))[0] > 0)
        if step % cfg.check_every == 0 and world.main:
            row = {"step": step, "flow": round(flow.item(), 5), "aux": round(aux.item(), 5)}
            row |= check.losses(m["transformer"], enc) if check else {}
            history.append(row)
            log(f"base step {step}/{plan.total} flow loss {row['flow']:.4f} aux {row['aux']:.4f} lr "
                f"{plan.rate(step):.2e} scenes made {pools.made()}; check losses {row} ; role heads: "
                f"{_accuracy_line(acc)}")
    return ema, {"base_steps": step, "base_loss": round(flow.item(), 5), "base_aux_loss": round(aux.item(), 5),
                 "base_seconds": round(plan.elapsed(), 1), "scenes_made_rank0": pools.made(),
                 "base_role_accuracy": {k: round(100 * float(v), 1) for k, v in acc.items()},
                 "base_checks": history}
