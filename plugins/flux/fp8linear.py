"""fluxkiln's two float8 linear layers: the one ``go_fast`` swaps into the transformer blocks (computed in fp8,
see :func:`fast.fp8_apply`) and the one ``quantize = "fp8"`` stores the blocks' weights in (computed in the
model's dtype, see :func:`store_fp8`).

A module of its own, importing torch, so the classes have importable names: precompiled blocks
(:mod:`.precompiled`) pickle the modules they call by reference, which a class made inside a function defeats.
"""

from __future__ import annotations

import torch

from .fast import FP8_MAX

# torch._scaled_mm's ``use_fast_accum``: let Hopper's fp8 tensor cores keep their partial sums in their own
# accumulator instead of promoting them to float32 every few steps (as torchao's float8 inference does).  2 x H200,
# FLUX's 1024^2 block linears 5-14 % faster (kernel probe), go_fast 2.99 -> 2.84 s (dev, 28 steps) and 0.472 ->
# 0.452 s (schnell, 4 steps); the random-weight transformer's difference from bf16 unchanged (0.0040-0.0043), and
# mini-flux's adherence on 64 held-out prompts no worse (docs/performance.md).
FAST_ACCUM = True


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (2-D) in float8_e4m3fn, each row scaled so its largest magnitude is fp8's largest value; returns the
    fp8 tensor and the float32 scales (one a row, shape ``(rows, 1)``) that multiply it back."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(torch.nn.Module):
    """A linear layer computed in float8: weights quantized per output row once, activations per row
    on the fly, both scales applied by ``torch._scaled_mm`` (CPU: the same arithmetic, emulated)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight_fp8, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight_fp8, persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous(), persistent=False)
        self.original = linear  # the exact bf16 layer, restored by fp8_restore
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.original.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.original.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, x_scale = quantize_rows(x2)
        if x2.is_cuda:
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=x.dtype, use_fast_accum=FAST_ACCUM)
        else:
            out = ((xq.float() * x_scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()).to(x.dtype)
        if self.original.bias is not None:
            out = out + self.original.bias
        return out.reshape(*shape[:-1], self.out_features)


FP8_STORAGE = "fluxkiln fp8 storage (float8_e4m3fn scaled per output row, computed in {dtype})"


@torch.library.custom_op("fluxkiln::fp8_stored_matmul", mutates_args=())
def fp8_stored_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scale).T`` for a frozen fp8 ``weight`` with per-row ``scale``.

    An operator of its own, opaque to torch.compile: the dequantized weight lives only inside it.  Traced
    into a compiled training block as plain operations, the partitioner kept every block's dequantized copy
    from the forward to the backward pass (47 GiB at 1024² where eager training peaks at 18.5).  Its backward
    saves the fp8 weight and dequantizes it again; ``x`` is not saved (the weight gets no gradient).
    """
    return x @ (weight.to(x.dtype) * scale).t()


@fp8_stored_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup(ctx, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    _x, weight, scale = inputs
    ctx.save_for_backward(weight, scale)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    weight, scale = ctx.saved_tensors
    return grad @ (weight.to(grad.dtype) * scale), None, None


fp8_stored_matmul.register_autograd(_backward, setup_context=_setup)


class Fp8StoredLinear(torch.nn.Linear):
    """A frozen linear layer whose weight waits in float8_e4m3fn, scaled per output row (as :class:`Fp8Linear`
    quantizes it, so weights far below fp8's smallest normal number keep their precision), and is dequantized
    to the activations' dtype inside :func:`fp8_stored_matmul` for each matmul.  No hooks and no casting of
    parameters in place, so blocks made of it compile and train (LoRA adapters wrap it like any ``nn.Linear``)."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        stored, scale = quantize_rows(linear.weight.detach())
        self.weight = torch.nn.Parameter(stored, requires_grad=False)
        self.register_buffer("weight_scale", scale.to(dtype), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = fp8_stored_matmul(x2, self.weight, self.weight_scale.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def store_fp8(transformer: torch.nn.Module, dtype: torch.dtype) -> str:
    """Store the weights of every linear layer in the transformer blocks, but their normalisation layers' and
    loaded LoRA adapters' own, as :class:`Fp8StoredLinear` (about 8.6 B of FLUX.1's 11.9 B parameters: half
    their memory); returns how."""
    from .fast import blocks

    for block in blocks(transformer):
        for name, module in list(block.named_modules()):
            parts = name.split(".")
            if type(module) is not torch.nn.Linear or any("norm" in p or "lora_" in p for p in parts):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, Fp8StoredLinear(module, dtype))
    return FP8_STORAGE.format(dtype=str(dtype).replace("torch.", ""))
