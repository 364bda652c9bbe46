"""Log training to Weights & Biases: loss and LR every step, samples and LoRA snapshots at intervals.

Used only when an API key is available (``wandb_api_key = "$VAR"`` or
``WANDB_API_KEY``).  The key is handed to wandb through its settings object,
never put in the run config, the environment or a log line.  ``WANDB_MODE=offline``
works as usual (files only, synced later with ``wandb sync``).  A resumed
training continues the same W&B run (its id is kept in the node's state folder).
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from fluxkiln.engine import NodeError


class WandbLogger:
    """One W&B run for one training configuration."""

    def __init__(self, *, key: str, project: str, run_name: str | None, entity: str | None,
                 sample_interval: int, save_interval: int, state_dir: Path, log_dir: Path,
                 config: dict[str, Any]):
        self.sample_interval = sample_interval
        self.save_interval = save_interval
        self._key = key
        self._args = dict(project=project, name=run_name, entity=entity, config=config)
        self._id_file = state_dir / "wandb_run_id"
        self._log_dir = log_dir
        self.run: Any = None

    def start(self) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise NodeError("W&B logging needs the wandb package", key="wandb_api_key",
                            hint="pip install wandb, or leave wandb_api_key unset") from exc
        run_id = self._id_file.read_text().strip() if self._id_file.is_file() else uuid.uuid4().hex[:12]
        self._id_file.write_text(run_id)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(api_key=self._key, silent=True, console="off", disable_git=True, save_code=False,
                                  x_save_requirements=False, x_disable_stats=True, x_disable_meta=True)
        self.run = wandb.init(id=run_id, resume="allow", dir=str(self._log_dir), settings=settings,
                              reinit="finish_previous", **self._args)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[tuple[str, Path, Any]]) -> None:
        import wandb

        self.run.log({"samples": [wandb.Image(img, caption=prompt) for prompt, _path, img in samples]}, step=step)

    def save_due(self, step: int) -> bool:
        return bool(self.save_interval) and step % self.save_interval == 0

    def save_lora(self, step: int, weights: dict[str, Any]) -> None:
        import wandb
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"lora-step-{step:06d}.safetensors"
            save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})
            art = wandb.Artifact(f"lora-{self.run.id}", type="lora", metadata={"step": step})
            art.add_file(str(path))
            self.run.log_artifact(art, aliases=[f"step-{step}"])

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
