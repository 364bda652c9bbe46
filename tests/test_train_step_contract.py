"""The training step's contract, observed in what it computes (the losses, the exported weights) rather than
in the settings echoed into metadata: caption dropout, timestep sampling, gradient clipping, a non-finite loss,
gradients cleared between steps, float32 master weights for a low-precision model, and data-parallel ranks
that add up to one process.  Plain SGD is used where a scale matters (Adam hides it)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import failure, load_weights, losses, run, solid_dataset, write_recipe

from fluxkiln.engine.runner import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SGD = dict(optimizer="sgd", learning_rate=0.05, caption_dropout_rate=0.0, batch_size=1)


def _weights(result) -> dict[str, torch.Tensor]:
    assert result.ok, (result.status, result.nodes)
    return load_weights(result.outputs["lora"]["lora"].path)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine for the module (the tiny pipeline stays hot); each run has its own recipe values."""
    return Engine(cache_dir=tmp_path_factory.mktemp("step-cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return solid_dataset(tmp_path_factory.mktemp("step-data"), n=2)


def _train(engine, tmp_path: Path, data: Path, tag: str, **values):
    recipe = write_recipe(tmp_path / f"{tag}.toml", data, **{"steps": 3, **values})
    return engine.run(recipe, output=tmp_path / "out" / tag)


def test_each_timestep_sampling_draws_other_times(engine, tmp_path, data):
    seen = {}
    for method in ("sigmoid", "linear", "shift", "flux_shift"):
        result = _train(engine, tmp_path, data, method, timestep_sampling=method, caption_dropout_rate=0.0)
        assert result.ok, result.nodes
        seen[method] = tuple(losses(result))
    assert len(set(seen.values())) == 4, seen


def test_caption_dropout_trains_on_the_empty_caption(engine, tmp_path, data):
    kept = _train(engine, tmp_path, data, "kept", caption_dropout_rate=0.0)
    dropped = _train(engine, tmp_path, data, "dropped", caption_dropout_rate=1.0)
    assert losses(kept) != losses(dropped)
    assert not _same(_weights(kept), _weights(dropped))


def test_max_grad_norm_clips_the_gradient_and_zero_turns_it_off(engine, tmp_path, data):
    off = _weights(_train(engine, tmp_path, data, "off", max_grad_norm=0.0, **SGD))
    loose = _weights(_train(engine, tmp_path, data, "loose", max_grad_norm=1e6, **SGD))
    tight = _weights(_train(engine, tmp_path, data, "tight", max_grad_norm=1e-3, **SGD))
    assert _same(off, loose), "max_grad_norm = 0 must train exactly as a bound the gradient never reaches"
    assert not _same(off, tight), "max_grad_norm = 0.001 must clip the gradient"
    assert any(bool(w.abs().sum()) for k, w in off.items() if "lora_B" in k), "max_grad_norm = 0 trained nothing"


def test_a_non_finite_loss_stops_with_the_step_the_key_and_a_hint(engine, tmp_path, data):
    result = _train(engine, tmp_path, data, "nan", steps=4, learning_rate=1e30, max_grad_norm=0.0,
                    optimizer="sgd")
    err = failure(result)
    assert err["error"].startswith("the loss became ") and "at step " in err["error"], err
    assert "no checkpoint was written for this step" in err["error"]
    assert err["key"] == "learning_rate" and "lower learning_rate" in err["hint"], err


def test_the_loss_is_a_mean_over_the_batch_not_a_sum(engine, tmp_path):
    """At the first step the LoRA adds nothing yet (lora_B starts at zero): a batch of four identical images
    gives about the loss of a batch of one, not a multiple of it."""
    data = solid_dataset(tmp_path / "four", n=4)
    first = {b: losses(_train(engine, tmp_path, data, f"batch{b}", **{**SGD, "batch_size": b}))[0]
             for b in (1, 4)}
    assert 1 / 1.5 < first[4] / first[1] < 1.5, first


def test_gradients_are_cleared_between_steps(tmp_path, data):
    """Five steps straight equal three and then two more after a resume (fresh gradients)."""
    recipe = write_recipe(tmp_path / "r.toml", data, steps=3, **SGD)
    cache = tmp_path / "cache"
    first = run(recipe, cache, tmp_path / "out")
    assert first.ok and len(losses(first)) == 3
    resumed = run(recipe, cache, tmp_path / "out", overrides=["nodes.lora.steps=5"])
    straight = run(recipe, tmp_path / "cache-2", tmp_path / "out-2", overrides=["nodes.lora.steps=5"])
    assert losses(straight)[3:] == losses(resumed)
    assert _same(_weights(straight), _weights(resumed))


def test_a_bfloat16_model_trains_float32_masters_like_a_float32_model(tmp_path, data):
    def train(dtype: str, tag: str):
        recipe = write_recipe(tmp_path / f"{tag}.toml", data, steps=3, **SGD)
        text = recipe.read_text().replace('model = "builtin:tiny-flux"',
                                          f'model = "builtin:tiny-flux"\ndtype = "{dtype}"', 1)
        recipe.write_text(text)
        return _weights(run(recipe, tmp_path / f"cache-{tag}", tmp_path / f"out-{tag}"))

    half, full = train("bfloat16", "bf16"), train("float32", "fp32")
    assert half.keys() == full.keys()
    moved_half = torch.cat([w.flatten().float() for k, w in sorted(half.items()) if "lora_B" in k])
    moved_full = torch.cat([w.flatten().float() for k, w in sorted(full.items()) if "lora_B" in k])
    assert moved_full.abs().sum() > 0 and moved_half.abs().sum() > 0, "the bfloat16 model trained nothing"
    cosine = torch.nn.functional.cosine_similarity(moved_half, moved_full, dim=0)
    assert cosine > 0.95, f"bfloat16 training went elsewhere (cosine {cosine:.3f} to the float32 update)"


def _cli_cache(path: Path) -> Path:
    path.mkdir(parents=True)
    builtin = Path(os.environ["FLUXKILN_CACHE"]) / "builtin"
    builtin.mkdir(parents=True, exist_ok=True)
    (path / "builtin").symlink_to(builtin, target_is_directory=True)
    return path


def _csv_losses(path: Path) -> list[float]:
    with path.open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")
@pytest.mark.timeout(600)  # four fresh CLI processes (two of them two-rank runs) on a CPU
def test_two_ranks_add_up_to_one_process_also_for_a_batch_one_rank_sits_out(tmp_path):
    """Three images and a global batch of two: every epoch ends with a batch of one, where rank 1 has no
    sample.  With SGD, any wrong weighting of a rank's share shows in the weights, and in the losses."""
    data = solid_dataset(tmp_path / "data", n=3)
    recipe = write_recipe(tmp_path / "r.toml", data, steps=4, **{**SGD, "batch_size": 2})
    ones, wa = _one_process(recipe, tmp_path)
    two = _two_ranks(recipe, tmp_path, "two")
    assert two.returncode == 0, two.stderr[-3000:]
    twos = _csv_losses(tmp_path / "two" / "lora" / "metrics.csv")
    assert len(ones) == len(twos) == 4 and len(set(ones)) > 1
    assert ones == pytest.approx(twos, rel=1e-4)
    wb = load_weights(tmp_path / "two" / "lora" / "lora.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-4), k
    # A bfloat16 model on two ranks: the idle rank has no gradients to hand to its float32 masters.
    half = _two_ranks(recipe, tmp_path, "half", "nodes.base.dtype=bfloat16")
    assert half.returncode == 0, half.stderr[-3000:]
    wh = load_weights(tmp_path / "half" / "lora" / "lora.safetensors")
    moved_half = torch.cat([wh[k].flatten().float() for k in sorted(wa) if "lora_B" in k])
    moved_full = torch.cat([wa[k].flatten().float() for k in sorted(wa) if "lora_B" in k])
    assert torch.nn.functional.cosine_similarity(moved_half, moved_full, dim=0) > 0.95


def _one_process(recipe: Path, tmp_path: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The losses and weights of one process on the device the ranks use: the CPU.  On a GPU host this process
    would train in bfloat16 with compiled blocks while the gloo ranks train in float32 on the CPU (1 % apart in
    the losses, on an H200), so there the reference is a CLI process with the GPU hidden too."""
    if not torch.cuda.is_available():
        one = run(recipe, tmp_path / "cache-1", tmp_path / "one")  # in this process
        return losses(one), _weights(one)
    done = _cpu_run(recipe, tmp_path, "one")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "one" / "lora"
    return _csv_losses(folder / "metrics.csv"), load_weights(folder / "lora.safetensors")


def _two_ranks(recipe: Path, tmp_path: Path, tag: str, *sets: str) -> subprocess.CompletedProcess:
    args = [a for v in ("nodes.lora.batch_size=1", *sets) for a in ("--set", v)]
    return _cpu_run(recipe, tmp_path, tag, "--gpus", "2", *args)


def _cpu_run(recipe: Path, tmp_path: Path, tag: str, *args: str) -> subprocess.CompletedProcess:
    """`fluxkiln run` in a process of its own, the GPU hidden, with a cache of its own; output in ``tmp_path/tag``."""
    env = dict(os.environ, FLUXKILN_CACHE=str(_cli_cache(tmp_path / f"cache-{tag}")), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(recipe), "--output",
                           str(tmp_path / tag), *args], env=env, capture_output=True, text=True, timeout=300)
