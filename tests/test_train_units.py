"""train_lora's building blocks: buckets, data order, FLUX packing, captions, optimizers, EMA, checkpoints."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from fluxkiln.engine import NodeError
from fluxkiln.plugins.train import checkpoint
from fluxkiln.plugins.train.buckets import BatchCursor, bucket_size, build_samples, epoch_batches
from fluxkiln.plugins.train.config import TrainConfig
from fluxkiln.plugins.train.flow import flux_mu, image_ids, pack, sample_times
from fluxkiln.plugins.train.optim import EMA, lr_lambda, make_optimizer, resolve_name


@pytest.mark.parametrize("size,res", [((4000, 3000), 1024), ((1024, 1024), 512), ((300, 900), 768),
                                      ((64, 64), 1024), ((2048, 512), 512), ((17, 33), 64)])
def test_buckets_never_upscale_and_keep_the_aspect_ratio(size, res):
    w, h = bucket_size(*size, res)
    assert w <= size[0] and h <= size[1], "never upscale"
    assert w % 16 == 0 and h % 16 == 0
    assert w * h <= max(res * res, 256)
    if min(size) >= 128:
        assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.2


def test_buckets_examples():
    assert bucket_size(4000, 3000, 1024) == (1152, 832)
    assert bucket_size(1024, 1024, 512) == (512, 512)
    assert bucket_size(64, 64, 1024) == (64, 64)  # small images stay small
    with pytest.raises(ValueError, match="at least 16x16"):
        bucket_size(8, 100, 512)
    samples = build_samples([(64, 64), (2000, 1000)], [512, 768, 1024])
    assert [(s.item, s.width, s.height) for s in samples] == [
        (0, 64, 64), (1, 704, 320), (1, 1024, 512), (1, 1408, 704)]


def test_data_order_depends_only_on_seed_and_epoch():
    samples = build_samples([(64, 64)] * 5 + [(128, 64)] * 3, [64])
    a = epoch_batches(samples, 2, seed=1, epoch=3)
    assert a == epoch_batches(samples, 2, seed=1, epoch=3)
    assert a != epoch_batches(samples, 2, seed=1, epoch=4)
    assert all(len({(s.width, s.height) for s in b}) == 1 for b in a), "a batch holds one bucket"
    key = lambda s: (s.item, s.width, s.height)  # noqa: E731
    assert sorted((s for b in a for s in b), key=key) == sorted(samples, key=key), "each sample once an epoch"
    cur = BatchCursor(samples, 2, seed=1)
    for _ in range(7):  # 7 batches: into the second epoch (5 batches each: 2+2+1 and 2+1)
        cur.next()
    assert cur.state() == {"epoch": 1, "index": 2}
    resumed = BatchCursor(samples, 2, seed=1, **cur.state())
    fresh = BatchCursor(samples, 2, seed=1)
    for _ in range(7):
        fresh.next()
    assert [resumed.next() for _ in range(5)] == [fresh.next() for _ in range(5)]


def test_pack_and_ids_match_the_diffusers_pipeline():
    from diffusers import FluxPipeline

    lat = torch.randn(2, 4, 8, 6)
    assert torch.equal(pack(lat), FluxPipeline._pack_latents(lat, 2, 4, 8, 6))
    assert torch.equal(image_ids(8, 6, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    for method in ("sigmoid", "linear", "shift", "flux_shift"):
        t = sample_times(4000, g, method, 1024)
        assert t.min() > 0 and t.max() < 1
    shifted = sample_times(4000, torch.Generator().manual_seed(0), "shift", 16).mean()
    plain = sample_times(4000, torch.Generator().manual_seed(0), "linear", 16).mean()
    assert shifted > plain + 0.1, "shift pushes times towards noise"
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


def test_timestep_samplers_follow_their_formulas_and_stay_inside_the_open_interval():
    n = 200_000

    def draw(method, seq_len=1024):
        return sample_times(n, torch.Generator().manual_seed(3), method, seq_len)

    u = torch.rand(n, generator=torch.Generator().manual_seed(3))
    logit_normal = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(3)))
    lo, hi = 1e-4, 1 - 1e-4
    assert torch.equal(draw("linear"), u.clamp(lo, hi))
    assert torch.allclose(draw("shift"), (3 * u / (1 + 2 * u)).clamp(lo, hi))
    assert torch.allclose(draw("sigmoid"), logit_normal.clamp(lo, hi))
    for seq_len in (256, 1024, 4096):
        em = math.exp(flux_mu(seq_len))
        assert torch.allclose(draw("flux_shift", seq_len), (em / (em + (1 / logit_normal - 1))).clamp(lo, hi))
    assert draw("flux_shift", 4096).mean() > draw("flux_shift", 256).mean() + 0.05, "more tokens, more noise"
    assert torch.equal(draw("anything else"), draw("sigmoid")), "the default is logit-normal"
    linear = draw("linear")  # 200k uniform draws reach both clamped ends
    assert float(linear.min()) == pytest.approx(lo, rel=1e-3) and float(linear.max()) == pytest.approx(hi, rel=1e-6)
    assert flux_mu(2176) == pytest.approx(0.825)


def test_captions_get_the_trigger_word():
    cfg = TrainConfig(trigger_word="TOK")
    assert cfg.caption("a photo of [trigger] on grass") == "a photo of TOK on grass"
    assert cfg.caption("TOK in the snow") == "TOK in the snow"
    assert cfg.caption("a dog") == "TOK, a dog"
    assert cfg.caption("TOKEN") == "TOK, TOKEN"  # a whole word only
    assert cfg.caption(None) == "TOK"
    assert TrainConfig(trigger_word="").caption("[trigger] a cat") == "a cat"
    assert cfg.with_trigger("portrait of [trigger]") == "portrait of TOK"


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adagrad", "adafactor", "lion"])
def test_optimizers_learn_and_their_state_survives_a_safe_reload(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = make_optimizer(name, [w], lr=0.05)
    first = None
    for _ in range(30):
        loss = (w ** 2).sum()
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float((w.detach() ** 2).sum()) < first
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    w2 = torch.nn.Parameter(w.detach().clone())
    again = make_optimizer(name, [w2], lr=0.05)
    again.load_state_dict(torch.load(buf, weights_only=True))
    for key, value in opt.state_dict()["state"][0].items():
        got = again.state_dict()["state"][0][key]
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(value)), f"{name}: state {key!r} not restored"
    for p, o in ((w, opt), (w2, again)):  # the next step is the same from the reloaded state
        (p ** 2).sum().backward()
        o.step()
    assert torch.equal(w.detach(), w2.detach())


def test_optimizer_choices_that_cannot_run_here():
    assert resolve_name("auto", "cpu") == "adamw"
    if not torch.cuda.is_available():
        with pytest.raises(NodeError, match="needs an NVIDIA GPU"):
            resolve_name("adamw8bit", "cpu")
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        with pytest.raises(NodeError, match="needs the prodigyopt package") as info:
            make_optimizer("prodigy", [torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        assert "pip install prodigyopt" in info.value.hint


def test_lr_schedules():
    assert [lr_lambda("constant", 0, 10)(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    warm = lr_lambda("constant_with_warmup", 4, 10)
    assert [warm(s) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_lambda("linear", 0, 10)(10) == 0.0 and lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decaying_schedules_warm_up_then_decay_to_zero_and_stay_there(kind):
    f = lr_lambda(kind, 2, 10)  # warm-up over steps 0-1, then decay over the 8 steps after it
    assert [f(s) for s in (0, 1, 2, 6, 10, 14)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert f(4) == pytest.approx(0.75 if kind == "linear" else 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_lambda(kind, 10, 10)(11) == 0.0, "warm-up as long as the run: decay in one step"
    assert lr_lambda(kind, 0, 10)(0) == 1.0


def test_constant_schedule_ignores_the_warm_up_and_constant_with_warmup_does_not():
    assert [lr_lambda("constant", 4, 10)(s) for s in (0, 2, 9)] == [1.0, 1.0, 1.0]
    assert [lr_lambda("constant_with_warmup", 4, 10)(s) for s in (0, 2, 30)] == [0.25, 0.75, 1.0]


def test_ema_warms_up_then_uses_the_decay():
    p = torch.zeros(3)
    ema = EMA({"p": p}, decay=0.99)
    p += 1.0
    ema.update({"p": p})
    assert float(ema.shadow["p"][0]) == pytest.approx(0.9)  # decay min(0.99, 1/10) = 0.1 at the first update
    for _ in range(2000):
        ema.update({"p": p})
    assert float(ema.shadow["p"][0]) == pytest.approx(1.0, abs=1e-6)


def test_ema_follows_weights_that_moved_to_another_device():
    # a resumed run loads the average on the CPU while the weights live on the GPU: the average follows them
    # there ("meta" stands in for the other device on a machine without a GPU: shapes only, no values)
    ema = EMA({"p": torch.zeros(3)}, decay=0.5)
    ema.update({"p": torch.ones(3, device="meta")})
    assert ema.shadow["p"].device.type == "meta" and ema.shadow["p"].shape == (3,) and ema.updates == 1
    if torch.cuda.is_available():  # and with values, where there is a GPU
        ema = EMA({"p": torch.zeros(3)}, decay=0.5)
        ema.update({"p": torch.ones(3, device="cuda")})
        assert ema.shadow["p"].is_cuda and float(ema.shadow["p"][0]) == pytest.approx(0.9)


def test_ema_decay_schedule_step_by_step_and_after_a_reload():
    p = torch.ones(2)
    ema = EMA({"p": p}, decay=0.15)
    assert ema.shadow["p"] is not p and ema.updates == 0
    expected = 1.0
    for n, target in enumerate((3.0, -1.0, 2.0)):
        p.fill_(target)
        ema.update({"p": p})
        d = min(0.15, (1 + n) / (10 + n))  # 0.1, then the decay 0.15 from the second update on
        expected = expected * d + target * (1 - d)
        assert float(ema.shadow["p"][0]) == pytest.approx(expected)
    assert ema.updates == 3
    other = EMA({"p": torch.zeros(2)}, decay=0.5)
    other.load({"p": torch.full((2,), 4.0)}, updates=7)
    assert other.updates == 7 and torch.equal(other.shadow["p"], torch.full((2,), 4.0))
    other.update({"p": torch.zeros(2)})  # decay min(0.5, 8/17)
    assert float(other.shadow["p"][1]) == pytest.approx(4.0 * 8 / 17)


def test_checkpoints_are_complete_pruned_and_restore_rng(tmp_path):
    root = tmp_path / "ckpts"
    random.seed(5)
    state = {"optimizer": {"state": {}, "param_groups": []}, "rng": checkpoint.rng_state()}
    expected = [random.random(), float(torch.rand(1))]
    for step in (10, 20, 30):
        checkpoint.save(root, step, {"param/w": torch.full((2, 2), float(step))}, state, {"cursor": {}}, keep_last=2)
    assert [s for s, _ in checkpoint.complete(root)] == [30, 20]
    found = checkpoint.load_latest(root, max_step=25)
    assert found.step == 20 and torch.equal(found.tensors["param/w"], torch.full((2, 2), 20.0))
    checkpoint.set_rng_state(found.state["rng"])
    assert [random.random(), float(torch.rand(1))] == expected
    (root / ".ckpt-000040.tmp-dead").mkdir()
    (root / "ckpt-000050").mkdir()  # a folder without meta.json: never complete
    assert checkpoint.load_latest(root, 100).step == 30
    checkpoint.clean_temporaries(root)
    assert not (root / ".ckpt-000040.tmp-dead").exists()


def test_loss_curve_png(tmp_path):
    from PIL import Image

    from fluxkiln.plugins.train.plot import loss_curve

    path = loss_curve(list(range(1, 51)), [1.0 / s for s in range(1, 51)], tmp_path / "loss.png")
    with Image.open(path) as im:
        assert im.size == (800, 400)
        assert len(im.convert("RGB").getcolors(maxcolors=100_000)) > 3
    loss_curve([], [], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").is_file()


def test_the_published_weights_are_the_ema_ones_when_ema_is_on_else_the_trained_ones():
    from types import SimpleNamespace

    from fluxkiln.plugins.train.loop import Trainer

    name = "transformer_blocks.0.attn.to_q.lora_A.fluxkiln_train.weight"
    trained = torch.full((2, 2), 3.0, dtype=torch.bfloat16)
    ema = EMA({name: torch.zeros(2, 2)}, decay=0.5)
    ema.update({name: trained})  # first update: decay 0.1 -> shadow 2.7
    for owner, expected in ((SimpleNamespace(ema=ema, master={name: trained}), 2.7),
                            (SimpleNamespace(ema=None, master={name: trained}), 3.0)):
        out = Trainer.export_weights(owner)
        assert list(out) == ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
        weight = out["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
        assert weight.dtype == torch.float32 and torch.allclose(weight, torch.full((2, 2), expected))
    assert out["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] is not trained  # a copy, not the live weight
