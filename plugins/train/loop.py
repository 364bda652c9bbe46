"""The LoRA training loop: set up, resume from the newest checkpoint, step, checkpoint, stop safely.

One :class:`Trainer` trains one adapter on the shared FLUX pipeline.  Every
piece of randomness (noise, times, caption dropout) comes from one seeded CPU
generator, and the data order from (seed, epoch), so together with the
optimizer, scheduler and EMA state in a checkpoint a resumed run continues
bit for bit on CPU.  On cancel the current step finishes, a checkpoint is
written, then :class:`Cancelled` is raised.  A non-finite loss stops before the
optimizer step, and no checkpoint holds non-finite weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxkiln.engine import Cancelled, NodeError

from . import adapter as adapters
from . import checkpoint as ckpts
from . import gpu
from .buckets import BatchCursor, build_samples
from .config import TrainConfig
from .ddp import DataParallel
from .data import LatentStore, MaskStore, TextStore
from .flow import flow_loss, preservation_loss
from .optim import EMA, make_optimizer, make_scheduler, resolve_name
from .preview import oom_hint, take_samples


SCRATCH = "scratch"  # the newest checkpoint is not to be resumed
STEP_MARK = "fluxkiln.train_step"  # the profiler range around each step (``fluxkiln bench --train-profile``)


@dataclass
class TrainResult:
    """What training produced: the final weights (EMA when on) under diffusers/PEFT keys, and the record."""

    weights: dict[str, Any]
    history: list[list[float]]
    step: int
    optimizer: str
    layers: list[str]
    resumed_from: int = 0
    samples: list[tuple[str, Path, Any]] = field(default_factory=list)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


class Trainer:
    """Train ``cfg`` on ``items`` (dataset items) with the pipeline of ``model``."""

    def __init__(self, ctx: Any, cfg: TrainConfig, model: Any, items: list[Any], state_dir: Path,
                 logger: Any = None):
        self.ctx, self.cfg, self.model, self.items = ctx, cfg, model, items
        self.state_dir = state_dir
        self.ckpt_dir = state_dir / "checkpoints"
        self.logger = logger
        self.samples: list[tuple[str, Path, Any]] = []
        self.dp = DataParallel()

    # ---------------------------------------------------------------- entry
    def run(self) -> TrainResult:
        import torch

        if self.ctx.device == "cuda":  # training needs the room: other resident pipelines go first
            self.ctx.models.release_kind("inference", keep=(self.model.key,))
        pipe = _pipeline(self.model)
        had_gc = bool(getattr(pipe.transformer, "gradient_checkpointing", False))
        try:
            return self._train(pipe)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(str(exc)) from None
        finally:
            with adapters.guarded(self.model, "removing the training adapter"):
                adapters.detach(pipe, had_gc)

    def _out_of_memory(self, message: str) -> NodeError:
        """Free what training holds and say which settings would fit (call once the exception is handled,
        so its traceback no longer keeps the failed step's activations alive)."""
        self._free()
        return NodeError(f"the GPU ran out of memory while training ({message.splitlines()[0]})",
                         hint=oom_hint(self.cfg, self.model.info))

    def _free(self) -> None:
        import gc

        import torch

        self.__dict__.pop("optimizer", None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- setup
    def _setup(self, pipe: Any) -> None:
        import torch

        cfg, ctx = self.cfg, self.ctx
        self.device = pipe._execution_device
        self.dtype = pipe.transformer.dtype
        self.optimizer_name = resolve_name(cfg.optimizer, "cuda" if self.device.type == "cuda" else "cpu")
        with adapters.guarded(self.model, "switching off the LoRAs of other nodes"):
            adapters.reset_pipeline_state(pipe, self.device.type)
        self.layers = adapters.select_layers(pipe.transformer, cfg.layers_to_optimize_regex)
        self.captions = [cfg.caption(it.caption) for it in self.items]
        # kept[c][i]: caption i with the trigger replaced by class word c (the preservation term's captions)
        self.kept = [[cfg.preserved(c, word) for c in self.captions] for word in cfg.preservation_classes]
        try:
            sizes = [_image_size(Path(it.path)) for it in self.items]
            self.samples_list = build_samples(sizes, cfg.resolution)
        except ValueError as exc:
            raise NodeError(f"a dataset image is too small: {exc}", key="dataset") from exc
        self.masks = (MaskStore(Path(cfg.mask_path), [it.name or Path(it.path).name for it in self.items], sizes,
                                cfg.mask_min_value, 2 * pipe.vae_scale_factor) if cfg.mask_path else None)
        mode = "disk" if cfg.cache_latents_to_disk else "memory" if cfg.cache_latents else "none"
        if mode == "disk" and not self.dp.owner:  # rank 0 alone writes files
            mode = "memory"
        self.latents = LatentStore(pipe.vae, [Path(it.path) for it in self.items], self.device, mode,
                                   self.state_dir / "latents")
        self.texts = TextStore(pipe, self.device, cfg.max_sequence_length, cfg.cache_text_embeddings)
        ctx.progress(0, cfg.steps, message=f"caching {len(self.samples_list)} latents and text embeddings")
        if self.dp.size == 1:
            self.latents.warm(self.samples_list, on_each=lambda i, n: ctx.check_cancelled())
        else:  # several ranks stop together or not at all: a rank leaving alone would strand the others
            self.latents.warm(self.samples_list)
            if self.dp.agree_stop(ctx.cancelled):
                raise Cancelled(f"node '{ctx.node}' cancelled")
        self.texts.warm(self.captions + [c for kept in self.kept for c in kept] +
                        ([""] if cfg.caption_dropout_rate > 0 else []))
        self.parked = gpu.parkable(pipe, self.device, cfg.cache_text_embeddings, mode != "none")
        gpu.transformer_on(pipe, self.device)
        with adapters.guarded(self.model, "adding the training adapter"):
            self.named = adapters.attach(pipe, self.layers, cfg.lora_rank, cfg.alpha, cfg.seed)
        self.master = self.named if all(p.dtype == torch.float32 for p in self.named.values()) else {
            k: torch.nn.Parameter(p.detach().float().clone()) for k, p in self.named.items()}
        self.params = list(self.master.values())
        if self.master is not self.named:  # float32 gradients, filled from the model's each step
            for p in self.params:
                p.grad = torch.zeros_like(p)
        self.optimizer = make_optimizer(self.optimizer_name, self.params, cfg.learning_rate, ctx.log)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.steps)
        self.ema = EMA(self.master, cfg.ema_decay) if cfg.ema else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.cursor = BatchCursor(self.samples_list, cfg.batch_size * self.dp.size, cfg.seed)  # the global batch
        self.history: list[list[float]] = []
        self.elapsed = 0.0
        compiled = gpu.compile_blocks(pipe, self.device, ctx.log)
        if cfg.gradient_checkpointing:
            gpu.checkpointing(pipe.transformer, cfg.gradient_checkpointing_interval, compiled)
        pipe.transformer.train()

    def _from_scratch(self) -> str | None:
        """Why this run ignores its checkpoints (None: it resumes from the newest one, if any)."""
        if self.cfg.resume == "never":
            return 'resume = "never"'
        if self.cfg.resume == "auto" and getattr(self.ctx, "forced", False):
            return 'the node was forced; resume = "always" would continue from the newest checkpoint instead'
        return None

    def _resume(self) -> int:
        def load() -> Any:  # rank 0 decides and reads; every rank gets the same answer
            ckpts.clean_temporaries(self.ckpt_dir)
            why = self._from_scratch()
            if why is not None:
                earlier = ckpts.discard_all(self.ckpt_dir)
                gone = f"; {earlier} earlier checkpoint(s) of this configuration discarded" if earlier else ""
                self.ctx.log(f"training from scratch ({why}){gone}")
                return SCRATCH
            return ckpts.load_latest(self.ckpt_dir, self.cfg.steps, log=self.ctx.log)

        found = self.dp.share_checkpoint(load)
        if found == SCRATCH:
            return 0
        if found is None:
            self.ctx.log("training from scratch (no checkpoint of this configuration yet)")
            return 0
        meta, state, tensors = found.meta, found.state, found.tensors
        names = sorted(k[len("param/"):] for k in tensors if k.startswith("param/"))
        if names != sorted(self.named) or meta.get("optimizer") != self.optimizer_name:
            raise NodeError(f"checkpoint {found.path} was written by a different setup (layers or optimizer "
                            f"'{meta.get('optimizer')}' vs '{self.optimizer_name}')",
                            hint=f"force the node to train from scratch (--force {self.ctx.node}), or set "
                                 f'resume = "never"')
        import torch

        with torch.no_grad():
            for k, p in self.master.items():
                p.copy_(tensors[f"param/{k}"].to(p.device))
        self._sync_model_weights()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        ckpts.set_rng_state(state["rng"])
        if self.ema is not None:
            self.ema.load({k: tensors[f"ema/{k}"] for k in self.master}, int(state["ema_updates"]))
        cur = meta["cursor"]
        self.cursor = BatchCursor(self.samples_list, self.cfg.batch_size * self.dp.size, self.cfg.seed,
                                  cur["epoch"], cur["index"])
        self.history = [list(r) for r in meta.get("history", [])]
        self.elapsed = float(meta.get("elapsed", 0.0))
        self.ctx.log(f"resuming from checkpoint at step {found.step} ({found.path.name}); "
                     f"--force {self.ctx.node} trains from scratch instead")
        return found.step

    # ---------------------------------------------------------------- loop
    def _train(self, pipe: Any) -> TrainResult:
        import torch

        self._setup(pipe)
        with gpu.parked(pipe, self.parked, self.device):
            try:
                return self._loop(pipe)
            except torch.cuda.OutOfMemoryError as exc:
                message = str(exc)
            # memory freed before the parked encoders move back to the GPU
            raise self._out_of_memory(message)

    def _loop(self, pipe: Any) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        start = self._resume()
        ctx.log(f"training {len(self.layers)} layers, rank {cfg.lora_rank}, alpha {cfg.alpha:g}, optimizer "
                f"{self.optimizer_name}, {len(self.samples_list)} samples in "
                f"{len({(s.width, s.height) for s in self.samples_list})} buckets, on {self.device.type}")
        ctx.progress(start, cfg.steps, message=f"resumed at step {start}" if start else "training", resumed=True)
        from torch.profiler import record_function

        t0 = time.perf_counter() - self.elapsed
        for step in range(start + 1, cfg.steps + 1):
            with record_function(STEP_MARK):
                loss, lr = self._step(pipe, step)
            self.elapsed = time.perf_counter() - t0
            self.history.append([step, loss, lr, round(self.elapsed, 3)])
            ctx.progress(step, cfg.steps, metrics={"loss": loss, "lr": lr})
            if self.logger:
                self.logger.log(step, {"train/loss": loss, "train/lr": lr})
            if self.dp.owner and (cfg.sample_at(step, self.logger.sample_interval if self.logger else None) or
                                  (step == cfg.steps and cfg.sample_prompts and cfg.sample_every)):
                self._sample(pipe, step)
            if self.logger and self.logger.save_due(step):
                self.logger.save_lora(step, self.export_weights())
            saved = False
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                self._checkpoint(step)
                saved = True
            if self.dp.agree_stop(ctx.cancelled) and step < cfg.steps:  # every rank stops after the same step
                if not saved:
                    self._checkpoint(step)
                ctx.log(f"stopped at step {step}; checkpoint written, rerun to continue")
                raise Cancelled(f"node '{ctx.node}' cancelled")
        if cfg.steps > start:
            self._checkpoint(cfg.steps)
        return TrainResult(self.export_weights(), self.history, cfg.steps, self.optimizer_name, self.layers,
                           start, self.samples)

    def _step(self, pipe: Any, step: int) -> tuple[float, float]:
        import torch

        cfg = self.cfg
        batch = self.cursor.next()  # the global batch: every rank draws the same batch, dropout and noise
        drop = (torch.rand(len(batch), generator=self.gen) < cfg.caption_dropout_rate).tolist()
        caps = ["" if d else self.captions[s.item] for s, d in zip(batch, drop, strict=True)]
        part = self.dp.part(len(batch))
        latents = self.latents.batch(batch)
        embeds, pooled = self.texts.batch(caps)
        lr = float(self.optimizer.param_groups[0]["lr"])
        with gpu.attention_backends(self.device):
            loss = flow_loss(pipe.transformer, latents, embeds, pooled, self.gen, cfg.timestep_sampling,
                             self.device, self.dtype, part=part if self.dp.size > 1 else None,
                             token_weights=self.masks.batch(batch) if self.masks else None)
            share = len(part) / len(batch)
            if loss is not None:
                (loss * share if share != 1 else loss).backward()  # queued before the loss is read
            kept = (self._preservation(pipe, batch, latents, part, share)
                    if self.kept and step % cfg.preservation_every == 0 else None)
        # read once both graphs are queued: no wait for the GPU between them
        value = float(loss.detach().item()) * share if loss is not None else 0.0
        value += float(kept.item()) if kept is not None else 0.0
        if self.master is not self.named:  # low-precision weights in the model: step the float32 masters
            model = list(self.named.values())
            torch._foreach_copy_([p.grad for p in self.params],
                                 [p.grad if p.grad is not None else torch.zeros_like(p) for p in model])
            for p in model:
                p.grad = None
        value = self.dp.sync(self.params, value)  # several ranks: the gradients of the global batch's mean loss
        if not math.isfinite(value):
            raise NodeError(f"the loss became {value} at step {step}; training stopped (no checkpoint "
                            "was written for this step)", key="learning_rate",
                            hint="lower learning_rate, use max_grad_norm = 1.0, or check the dataset images")
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        if self.master is self.named:
            self.optimizer.zero_grad(set_to_none=True)
        self._sync_model_weights()
        if self.ema is not None:
            self.ema.update(self.master)
        return value, lr

    def _preservation(self, pipe: Any, batch: list[Any], latents: Any, part: range, share: float) -> Any:
        """Backpropagate the preservation term (the batch's captions naming ``preservation_class``, one word drawn
        for each image from a list, the LoRA's prediction pulled to the base model's), after the flow loss's graph
        is freed (one graph's memory at a time); its weighted share of this rank's loss (a detached tensor; None
        for an empty share)."""
        import torch

        cfg = self.cfg
        words = (torch.randint(len(self.kept), (len(batch),), generator=self.gen).tolist() if len(self.kept) > 1
                 else [0] * len(batch))  # one class word: nothing drawn, so such runs keep their noise
        embeds, pooled = self.texts.batch([self.kept[w][s.item] for w, s in zip(words, batch, strict=True)])
        kept = preservation_loss(pipe.transformer, latents, embeds, pooled, self.gen, cfg.timestep_sampling,
                                 self.device, self.dtype, part=part if self.dp.size > 1 else None)
        if kept is None:
            return None
        weighted = kept * (cfg.preservation_weight * share)
        weighted.backward()
        return weighted.detach()

    def _sync_model_weights(self) -> None:
        import torch

        if self.master is not self.named:
            with torch.no_grad():
                torch._foreach_copy_(list(self.named.values()), self.params)

    def _sample(self, pipe: Any, step: int) -> None:
        with gpu.unparked(pipe, self.parked, self.device):
            self.samples = take_samples(self.ctx, pipe, self.cfg, step, self.ctx.node_dir() / "samples")
        if self.logger:
            self.logger.log_samples(step, self.samples)

    def _checkpoint(self, step: int) -> None:
        import torch

        if not self.dp.owner:  # rank 0 alone writes checkpoints
            return
        bad = [k for k, p in self.master.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NodeError(f"weights became non-finite by step {step} ({bad[0]}); no checkpoint written",
                            key="learning_rate", hint="lower learning_rate")
        tensors = {f"param/{k}": p for k, p in self.master.items()}
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.shadow.items()})
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "generator": self.gen.get_state(), "rng": ckpts.rng_state(),
                 "ema_updates": self.ema.updates if self.ema else 0}
        meta = {"cursor": self.cursor.state(), "history": self.history, "optimizer": self.optimizer_name,
                "elapsed": self.elapsed, "layers": len(self.layers), "world_size": self.dp.size}
        try:
            path = ckpts.save(self.ckpt_dir, step, tensors, state, meta, self.cfg.keep_last, log=self.ctx.log)
        except OSError as exc:
            prev = ckpts.complete(self.ckpt_dir)
            kept = f"the checkpoint at step {prev[0][0]} is intact" if prev else "no earlier checkpoint exists"
            raise NodeError(f"could not write the checkpoint at step {step}: {exc}; {kept}",
                            hint=f"free disk space in {self.ckpt_dir.parent} and rerun to resume") from exc
        self.ctx.log(f"checkpoint {path.name} written")

    def export_weights(self) -> dict[str, Any]:
        """The weights to publish (EMA when enabled) under diffusers/PEFT keys, float32 on CPU."""
        src = self.ema.shadow if self.ema is not None else {k: p.detach() for k, p in self.master.items()}
        return {adapters.export_key(k): v.detach().float().cpu().clone() for k, v in src.items()}


def _pipeline(model: Any) -> Any:
    try:
        from fluxkiln.plugins.flux.load import get_pipeline
    except ImportError:
        return model.get()
    return get_pipeline(model)
