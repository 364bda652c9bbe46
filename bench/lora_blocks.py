"""Which of a LoRA's layers and steps carry the word, and which cost the other shapes: the recipe's LoRA read again
with its layers weighted apart (LoRA block weights) and left out of the later steps (a LoRA schedule).

    python bench/lora_blocks.py --model DIR [--seed 42] [--set KEY=VALUE ...] [--prompts 32] [--vocab 64]
                                [--steps 28] [--work DIR] [--json FILE] WEIGHTS [WEIGHTS ...]

It runs ``recipes/train-lora-tiny.toml`` once on the pipeline folder ``DIR`` (``--set`` as ``fluxkiln run --set``;
``--seed`` is the LoRA's training seed, ``lora_scale`` 1), keeps the LoRA under ``--work`` (a later call with the
same settings reuses it), and samples the base's held-out vocabulary prompts without it once.  Then, for each
WEIGHTS, it attaches the LoRA with its layers scaled and reads, as ``concept measure`` does: ``--prompts`` new
prompts with the trigger (the share drawn as the recipe's concept), the same prompts with an ordinary shape
(leakage), and the ``--vocab`` prompts' shape adherence (the cost is the points lost), per shape word too, and how
far their pictures moved (``vocabulary_change``, the mean absolute pixel difference); every
sample ``--steps`` steps at guidance 3.

WEIGHTS is ``all`` (the LoRA as trained) or comma-separated ``REGEX=W`` rules: a layer (its name in the
transformer, e.g. ``single_transformer_blocks.5.proj_mlp``) takes the W of the first rule whose regular
expression it contains, 1 if none; ``*=W`` matches every layer, and a rule that matches none of the LoRA's layers
is refused.  E.g. ``'single_transformer_blocks\\.[4-7]\\.=0'`` leaves out the last four single blocks' LoRA,
``'*=1.15'`` is ``lora_scale`` 1.15.  ``@T`` after the rules (``all@0.5``) lets the LoRA act only while the
sampler's timestep (1 pure noise, 0 the finished picture) is at least T, and leaves it off for the steps after;
each row gives the steps the LoRA acted at (``steps_on`` of ``steps``, and their ``timesteps_on``).  A pattern
cannot hold a comma or an '@' (write ``\\d\\d?``, not ``\\d{1,2}``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "train-lora-tiny.toml"


@dataclass(frozen=True)
class Weights:
    """Rules ``(pattern, weight)``: a layer takes the weight of the first pattern its name contains, else 1; the
    LoRA acts only while the sampler's timestep (1 pure noise, 0 the finished picture) is at least ``above``."""

    rules: tuple[tuple[re.Pattern[str], float], ...] = ()
    above: float = 0.0

    def __call__(self, name: str) -> float:
        return next((w for pattern, w in self.rules if pattern.search(name)), 1.0)

    def acts_at(self, timestep: float) -> bool:
        """Whether the LoRA acts at a step whose timestep (1 pure noise, 0 the finished picture) is ``timestep``."""
        return timestep >= self.above

    def unused(self, names: list[str]) -> list[str]:
        """The patterns that match none of ``names`` (a typo, or a layer the LoRA does not have)."""
        return [pattern.pattern for pattern, _ in self.rules if not any(pattern.search(n) for n in names)]


OFF = Weights(((re.compile(".*"), 0.0),))


def layer_weights(spec: str) -> Weights:
    """The :class:`Weights` of ``spec`` (``all`` or ``REGEX=W,...``, either with ``@T``); ValueError names a bad
    rule."""
    rules_spec, above = spec, 0.0
    if "@" in spec:
        rules_spec, _, time_spec = spec.rpartition("@")
        try:
            above = float(time_spec)
        except ValueError:
            above = -1.0
        if not 0.0 <= above <= 1.0:
            raise ValueError(f"weights {spec!r}: {time_spec!r} after the last '@' is not a timestep from 0 to 1 "
                             "(e.g. 'all@0.5': the LoRA acts over the noisier half of the steps; a pattern cannot "
                             "hold '@')")
    if rules_spec == "all":
        return Weights(above=above)
    rules = []
    for part in rules_spec.split(","):
        pattern, sep, weight = part.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"weights {spec!r}: rule {part!r} is not REGEX=W (e.g. 'single_transformer_blocks=0')")
        try:
            rules.append((re.compile(".*" if pattern == "*" else pattern), float(weight)))
        except (re.error, ValueError) as exc:
            raise ValueError(f"weights {spec!r}: rule {part!r}: {exc}") from exc
    return Weights(tuple(rules), above)


def pixel_change(before: list[Any], after: list[Any]) -> float:
    """Mean absolute difference of the pictures' pixels (0-255): how far the LoRA moves the vocabulary's pictures."""
    import numpy as np

    diffs = [np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean()
             for a, b in zip(before, after, strict=True)]
    return round(float(np.mean(diffs)), 3)


def _fingerprint(model: Path) -> str:
    """What the kept LoRA depends on besides the settings: the recipe file's text and the model folder's files
    (names, sizes, modification times, as load_model reloads on), so a retrained base at the same path trains a
    new LoRA."""
    from fluxkiln.plugins.flux.load import local_model_signature

    files = local_model_signature({"model": str(model)}, model)["model files"]
    return hashlib.sha256("\n".join([RECIPE.read_text(), files]).encode()).hexdigest()


def trained_lora(model: Path, seed: int, overrides: list[str], work: Path, log: Callable[[str], None]) -> Path:
    """The recipe's LoRA on ``model`` with these settings, trained once and kept under ``work``."""
    from fluxkiln.plugins.miniflux.concept import run_recipe

    settings = [f"nodes.base.model={json.dumps(str(model))}", "nodes.styled.lora_scale=1.0", f"nodes.lora.seed={seed}",
                *overrides]
    key = hashlib.sha256("\n".join([_fingerprint(model), *settings]).encode()).hexdigest()[:16]
    folder = work / key
    kept = folder / "lora.safetensors"
    if kept.is_file():
        return kept
    t0 = time.perf_counter()
    result = run_recipe(RECIPE, folder, settings)
    partial = folder / "lora.safetensors.partial"
    partial.write_bytes(Path(result.outputs["lora"]["lora"].path).read_bytes())
    partial.replace(kept)  # whole or not at all: an interrupted copy is never reused
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    log(f"trained in {time.perf_counter() - t0:.1f} s: {kept}")
    return kept


def lora_layers(lora: Path) -> list[str]:
    """The transformer layers a LoRA file adapts, as peft names them (its keys read as apply_lora reads them)."""
    from fluxkiln.plugins.flux.lora import read_lora
    from fluxkiln.plugins.flux.lora_keys import to_peft

    modules = to_peft(read_lora(lora)).modules()
    return sorted({m.removeprefix("transformer.") for m in modules if m.startswith("transformer.")})


def refuse_unused(rules: dict[str, Weights], layers: list[str]) -> None:
    """SystemExit, before any sampling, if a rule's pattern matches none of the LoRA's layers."""
    unused = [pattern for weight in rules.values() for pattern in weight.unused(layers)]
    if unused:
        raise SystemExit(f"the rules {', '.join(map(repr, unused))} match none of the LoRA's layers, whose names "
                         f"are like {', '.join(layers[::max(1, len(layers) // 4)][:4])}")


class StepSchedule:
    """A forward pre-hook on the transformer: at each step it weighs the LoRA's layers by ``weight`` while the
    step's timestep is at least ``weight.above``, and to nothing after; it records the timesteps of both kinds."""

    def __init__(self, layers: dict[str, Any], trained: dict[str, float]) -> None:
        self.layers, self.trained = layers, trained
        self.weight = Weights()
        self.on: set[float] = set()
        self.off: set[float] = set()

    def start(self, weight: Weights) -> list[str]:
        """Weigh the layers for a new reading; the names of the layers weighed to 0 (see :func:`weigh`)."""
        self.weight, self.on, self.off = weight, set(), set()
        return weigh(self.layers, self.trained, weight)

    def __call__(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from fluxkiln.plugins.flux.modulation import forward_inputs

        t = round(float(forward_inputs(args, kwargs)[1].flatten()[0]), 4)
        acts = self.weight.acts_at(t)
        (self.on if acts else self.off).add(t)
        if self.weight.above > 0:
            weigh(self.layers, self.trained, self.weight if acts else OFF)


def weigh(layers: dict[str, Any], trained: dict[str, float], weight: Weights) -> list[str]:
    """Set each LoRA layer's scaling to its trained value times its weight (peft multiplies the layer's LoRA output
    by it); the names of the layers weighed to 0."""
    for name, module in layers.items():
        module.scaling["concept"] = trained[name] * weight(name)
    return sorted(name for name in layers if weight(name) == 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+", metavar="WEIGHTS")
    parser.add_argument("--model", required=True, help="a mini-flux pipeline folder")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--steps", type=int, default=28, help="sampling steps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-blocks"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        rules = {spec: layer_weights(spec) for spec in args.weights}
    except ValueError as exc:
        parser.error(str(exc))
    args.model = Path(args.model).resolve()
    if not (args.model / "model_index.json").is_file():
        parser.error(f"--model {args.model}: not a pipeline folder (no model_index.json)")
    rows = read(args, rules)
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "seed": args.seed, "overrides": args.overrides,
                                         "rows": rows}, indent=1))
    print(f"\n{'weights':60s} {'steps':7s} {'new':>6s} {'leak':>6s} {'cost':>6s} {'stars':>6s}")
    for r in rows:
        label = r["weights"] if len(r["weights"]) <= 60 else "..." + r["weights"][-57:]
        steps = f"{r['steps_on']}/{r['steps']}"
        print(f"{label:60s} {steps:7s} {r['with_trigger']:6.1f} {r['without_trigger']:6.1f} {r['cost']:6.1f} "
              f"{r['shape_by_word_after'].get('star', float('nan')):6.1f}")
    return 0


def read(args: argparse.Namespace, rules: dict[str, Weights]) -> list[dict[str, Any]]:
    """Each rule's row (see the module's docstring)."""
    from fluxkiln.plugins.miniflux.adherence import checks_of, eval_prompts, generate
    from fluxkiln.plugins.miniflux.concept import concept_share, probe_prompts, recipe_concept, vocabulary_readings
    from fluxkiln.plugins.miniflux.weights import load_folder

    lora = trained_lora(args.model, args.seed, args.overrides, args.work, print)
    refuse_unused(rules, lora_layers(lora))
    shape = recipe_concept(RECIPE, args.overrides).shape
    pipe = load_folder(args.model)
    trigger, without = probe_prompts(args.prompts, shape=shape)
    vocab = eval_prompts(args.vocab)

    def sampled(prompts: list[str]) -> list[Any]:
        return generate(pipe, prompts, steps=args.steps, guidance=3.0)

    plain = sampled(vocab)
    before = checks_of(plain, vocab)
    pipe.load_lora_weights(str(lora), adapter_name="concept")
    pipe.set_adapters(["concept"], adapter_weights=[1.0])
    layers = {name: m for name, m in pipe.transformer.named_modules() if "concept" in getattr(m, "scaling", {})}
    if not layers:
        raise SystemExit(f"the LoRA {lora} loaded onto none of the transformer's layers")
    schedule = StepSchedule(layers, {name: m.scaling["concept"] for name, m in layers.items()})

    def reading(spec: str, weight: Weights) -> dict[str, Any]:
        off = schedule.start(weight)
        t0 = time.perf_counter()
        new = concept_share(sampled(trigger), trigger, shape)
        leak = concept_share(sampled(without), without, shape)
        changed = sampled(vocab)
        after = checks_of(changed, vocab)
        row = {"weights": spec, "layers_off": off, "steps_on": len(schedule.on),
               "steps": len(schedule.on | schedule.off), "timesteps_on": sorted(schedule.on),
               "with_trigger": round(100 * new, 1), "without_trigger": round(100 * leak, 1),
               **vocabulary_readings(before, after, vocab)}
        row["cost"] = round(row["vocabulary_before"]["shape"] - row["vocabulary_after"]["shape"], 1)
        row["vocabulary_change"] = pixel_change(plain, changed)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in row.items() if k not in ("layers_off", "timesteps_on")}), flush=True)
        return row

    hook = pipe.transformer.register_forward_pre_hook(schedule, with_kwargs=True)
    try:
        return [reading(spec, weight) for spec, weight in rules.items()]
    finally:
        hook.remove()


if __name__ == "__main__":
    sys.exit(main())
