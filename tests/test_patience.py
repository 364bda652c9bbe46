"""When the VAE decoder is compiled: eager decodes of a shape until the process has made enough of them, unless
the machine compiled that shape before (a marker), `fluxkiln warmup` saved it precompiled or is recording, or
``FLUXKILN_COMPILE_VAE`` says otherwise."""

from __future__ import annotations

import pytest
import torch

from fluxkiln.plugins.flux import patience, precompiled, variantkeys


class Calls:
    def __init__(self) -> None:
        self.log: list[str] = []

    def compiled(self, x):
        self.log.append("compiled")
        return x

    def eager(self, x):
        self.log.append("eager")
        return x


def _decoder(tmp_path, wait=2, calls=None, compiled=None):
    calls = calls or Calls()
    module = torch.nn.Conv2d(4, 3, 1)
    return calls, patience.Patience(module, compiled or calls.compiled, calls.eager, wait, tmp_path / "markers")


def test_a_shape_compiles_after_the_patience_and_the_next_process_compiles_it_at_once(tmp_path):
    calls, decode = _decoder(tmp_path)
    small, large = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 16, 16)
    for x in (small, small, large, small, small):
        decode(x)
    assert calls.log == ["eager", "eager", "eager", "compiled", "compiled"]
    assert len(list((tmp_path / "markers").glob("*.compiled"))) == 1  # only the shape that was compiled
    later, again = _decoder(tmp_path)  # a new process on this machine: the compile cache has that shape
    again(small)
    again(large)
    assert later.log == ["compiled", "eager"]


def test_warmup_recording_and_precompiled_variants_compile_from_the_first_decode(tmp_path):
    x = torch.zeros(1, 4, 8, 8)
    calls, decode = _decoder(tmp_path, wait=5)
    with precompiled.Recording():
        decode(x)
    assert calls.log == ["compiled"]

    calls = Calls()
    module = torch.nn.Conv2d(4, 3, 1)
    key = variantkeys.variant_key(module, variantkeys.call_signature((x,), {}))

    class Saved:
        variants = {key: object()}

        def __call__(self, y):
            calls.log.append("precompiled")
            return y

    decode = patience.Patience(module, Saved(), calls.eager, 5, tmp_path / "other")
    decode(x)
    decode(torch.zeros(1, 4, 9, 9))
    assert calls.log == ["precompiled", "eager"]


def test_an_unwritable_marker_folder_only_means_waiting_again(tmp_path):
    (tmp_path / "markers").write_text("a file where the folder should be")
    calls, decode = _decoder(tmp_path, wait=0)
    decode(torch.zeros(1, 4, 8, 8))
    assert calls.log == ["compiled"]


@pytest.mark.parametrize("value, expected", [(None, patience.PATIENCE), ("", patience.PATIENCE), ("1", 0),
                                             ("on", 0), ("0", None), ("off", None)])
def test_fluxkiln_compile_vae_sets_the_patience(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("FLUXKILN_COMPILE_VAE", raising=False)
    else:
        monkeypatch.setenv("FLUXKILN_COMPILE_VAE", value)
    assert patience.patience() == expected
