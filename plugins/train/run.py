"""One train_lora job: train (or take a pretrained LoRA), export the results, publish them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fluxkiln.engine import Lora, NodeError, Text, distributed

from . import export as ex
from .config import TrainConfig, scrub
from .loop import Trainer, TrainResult


class Job:
    """The work of one train_lora node run; holds the secrets only in memory."""

    def __init__(self, ctx: Any, cfg: TrainConfig, model: Any, dataset: Any, secrets: list[str | None]):
        self.ctx, self.cfg, self.model, self.dataset = ctx, cfg, model, dataset
        self._secrets = secrets
        self.out_dir = ctx.node_dir()

    def _recipe_text(self) -> str:
        """The recipe as run: its text plus any ``--set`` overrides (as comments), secrets scrubbed."""
        recipe = getattr(self.ctx, "recipe", None)
        text = getattr(recipe, "text", "") or ""
        overrides = list(getattr(recipe, "overrides", None) or [])
        if overrides:
            text = text.rstrip("\n") + "\n\n# run with overrides:\n" + "".join(f"#   --set {o}\n" for o in overrides)
        return scrub(text, self._secrets)

    # ---------------------------------------------------------------- sources of weights
    def train(self, state_dir: Path, wandb_key: str | None, wandb_args: dict[str, Any]) -> TrainResult:
        if self.dataset is None or not len(self.dataset):
            raise NodeError("train_lora needs a dataset with at least one image", key="dataset",
                            hint='link a dataset node: dataset = "@data" (or give use_pretrained_lora)')
        logger = None
        if wandb_key and distributed.current().owner:  # rank 0 alone logs
            from .wandb_log import WandbLogger

            logger = WandbLogger(key=wandb_key, state_dir=state_dir, log_dir=self.out_dir,
                                 config=self.cfg.public(), **wandb_args)
            logger.start()
        ok = False
        try:
            result = Trainer(self.ctx, self.cfg, self.model, list(self.dataset.items), state_dir, logger).run()
            ok = True
            return result
        finally:
            if logger is not None:
                logger.finish(ok)

    def pretrained(self, path: Path) -> TrainResult:
        weights, file_meta = ex.read_pretrained(path)
        rank = ex.rank_of(weights)
        self.cfg = dataclasses.replace(self.cfg, lora_rank=rank, lora_alpha=float(rank))
        steps = int(file_meta.get("fluxkiln.steps", "0") or 0) if file_meta.get("fluxkiln.steps", "").isdigit() else 0
        self.ctx.log(f"use_pretrained_lora: skipping training, using {path.name} ({len(weights) // 2} layers, "
                     f"rank {rank})")
        return TrainResult(weights, [], steps, "none", sorted({k.rsplit(".lora_", 1)[0] for k in weights}))

    # ---------------------------------------------------------------- outputs
    def export(self, result: TrainResult) -> tuple[Lora, Text]:
        ctx, cfg = self.ctx, self.cfg
        fp = getattr(self.dataset, "fingerprint", "") if self.dataset is not None else ""
        rank = ex.rank_of(result.weights)
        meta = ex.metadata(cfg, self.model, fp, self._recipe_text(), result.step, rank, result.optimizer,
                           len(result.layers), self._secrets)
        main, extra = ex.write_lora(self.out_dir, result.weights, cfg, meta)
        for p in (main, *extra.values()):
            ctx.artifact(p)
        items = list(self.dataset.items) if self.dataset is not None else []
        cap_path, cap_text = ex.write_captions(self.out_dir, items, cfg)
        ctx.artifact(cap_path)
        if result.history:
            for p in ex.write_metrics(self.out_dir, result.history):
                ctx.artifact(p)
            last = result.history[-1]
            ctx.log(f"trained {result.step} steps; final loss {last[1]:.4g}; LoRA written to {main}")
        return Lora(path=main, meta=meta, extra_files=extra), Text(cap_text)

    def publish(self, repo_id: str, private: bool, token: str | None, lora: Lora, result: TrainResult) -> None:
        from . import hub

        images = [(f"images/{p.name}", prompt, p) for prompt, p, _img in result.samples]
        card_text = hub.model_card(repo_id, self.cfg, self.model.ref, lora.meta,
                                   [(prompt, rel) for rel, prompt, _p in images], self._recipe_text(),
                                   "comfyui" in lora.extra_files)
        card = self.out_dir / "README.md"
        card.write_text(scrub(card_text, self._secrets), encoding="utf-8")
        self.ctx.artifact(card)
        plan = hub.plan_upload(repo_id, private, lora.path, lora.extra_files, card,
                               [(rel, p) for rel, _prompt, p in images])
        self.ctx.log(f"uploading {', '.join(plan.files)} to the Hugging Face Hub repo {repo_id} "
                     f"({'private' if private else 'public'})")
        try:
            url = hub.UPLOADER(plan, token or "")
        except Exception as exc:  # noqa: BLE001 - hub client errors vary; report without the token
            raise NodeError(f"upload to {repo_id} failed: {scrub(f'{type(exc).__name__}: {exc}', self._secrets)}",
                            key="hf_repo_id", hint="check the repo id and that the token may write to it; "
                            "the LoRA is saved locally in " + str(self.out_dir)) from None
        self.ctx.log(f"uploaded to {url}")
