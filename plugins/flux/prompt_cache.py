"""Remember the text encoders' output for prompts a resident pipeline has already encoded.

A sweep or a watch-mode rerun samples the same prompt again with a new seed,
guidance or step count; the T5-XXL and CLIP encoders would compute the same
embeddings every time (about 0.09 s of a 0.5 s schnell image on an H200).
:func:`embeddings` returns each prompt's ``prompt_embeds`` / ``pooled_prompt_embeds``
from a small per-pipeline LRU cache and runs the encoders only for the prompts it
lacks, in one batch.

An entry is keyed by the prompt, ``max_sequence_length`` and :func:`encoder_state`,
a fingerprint of everything that can change the encoders' output: the encoder and
tokenizer objects and vocabulary sizes; every module of both encoders (identity, type,
hooks, its LoRA adapters' active names, scales, merged and disabled state); every
parameter and buffer (identity, dtype, device, in-place version counter and, without
offload, storage address); a counter bumped whenever a submodule, parameter or buffer
is registered on an encoder module (torch's global registration hooks) or LoRA weights
are fused or unfused (:func:`weights_edited`); the execution device, offload mode and
the global numeric settings (matmul precision, TF32, SDPA backends, autocast).  Any
change gives a new key, so an entry is never served for another state; entries of old
states age out of the LRU.  When a state is new while an earlier one had entries, the
``sample`` log line says what changed (:func:`difference`), e.g. "a tensor was changed in
place in text_encoder.text_model.encoder.layers.0.mlp.fc1".

The cache is off (prompts go through the pipeline as text) with
``FLUXKILN_PROMPT_CACHE=0``, for a pipeline type that takes no prompt embeddings,
and while an encoder module is in training mode (dropout would make each encoding
differ).  It holds at most :data:`MAX_ENTRIES` prompts and :data:`MAX_BYTES` bytes,
where the encoders put their output (the GPU), and is dropped with its pipeline.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from . import fast, registrations

ENV = "FLUXKILN_PROMPT_CACHE"
MAX_ENTRIES = 64  # prompts per pipeline
MAX_BYTES = 256 * 2**20  # 64 dev prompts: 512 T5 tokens x 4096 x bf16 = 4 MiB each
MAX_STATES = 8  # encoder states with entries per pipeline (the oldest state's entries go first)
ATTR = "_fluxkiln_prompt_cache"
ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
EDITS = registrations.Watch()  # registrations on the encoders encoder_state saw, and every LoRA fuse/unfuse


def enabled() -> bool:
    """``FLUXKILN_PROMPT_CACHE=0`` (or false/no/off) turns the cache off; on by default."""
    return not fast.switched_off(ENV)


def weights_edited() -> None:
    """Say that weights may have changed in place without a trace torch can see (LoRA fuse/unfuse)."""
    EDITS.bump()


@dataclass
class Tally:
    """What the cache did over one ``sample`` call (for its log line)."""

    hits: int = 0
    encoded: int = 0
    skipped: str = ""  # why the cache was not used, if it was not
    changed: str = ""  # what made the encoders' state new, when an earlier state had entries

    def message(self) -> str | None:
        if self.hits or self.encoded:
            total = self.hits + self.encoded
            why = f" (the encoders' state is new: {self.changed})" if self.changed else ""
            return (f"prompt cache: {self.hits} of {total} prompt(s) from the cache, {self.encoded} through the "
                    f"text encoders{why}")
        return f"prompt cache: not used ({self.skipped})" if self.skipped else None


@dataclass(frozen=True)
class Entry:
    """One prompt's embeddings (``prompt_embeds`` row and ``pooled_prompt_embeds`` row)."""

    prompt: Any
    pooled: Any

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prompt, self.pooled))


class PromptCache:
    """An LRU map from (state token, max_sequence_length, prompt) to :class:`Entry`, bounded in count and bytes.

    A state (the large tuple :func:`encoder_state` makes) is looked up once per call and stands for a small
    token in the entries' keys; at most :data:`MAX_STATES` states are remembered."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[tuple[Any, ...], Entry] = OrderedDict()
        self.states: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self.nbytes = 0
        self._next = 0

    def token(self, state: tuple[Any, ...]) -> tuple[int, tuple[Any, ...] | None]:
        """The small number standing for ``state`` (a new one for a state not seen, or forgotten), and the most
        recently used earlier state when ``state`` is new (None otherwise, or when there was none)."""
        found = self.states.get(state)
        if found is not None:
            self.states.move_to_end(state)
            return found, None
        previous = next(reversed(self.states), None)
        self._next += 1
        self.states[state] = self._next
        while len(self.states) > MAX_STATES:
            _, old = self.states.popitem(last=False)
            for key in [k for k in self.entries if k[0] == old]:
                self.nbytes -= self.entries.pop(key).nbytes
        return self._next, previous

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: tuple[Any, ...]) -> Entry | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: tuple[Any, ...], entry: Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.states.clear()
        self.nbytes = 0


def cache_of(pipe: Any) -> PromptCache:
    """The pipeline's cache (made on first use; it goes with the pipeline object)."""
    found = getattr(pipe, ATTR, None)
    if found is None:
        found = PromptCache()
        object.__setattr__(pipe, ATTR, found)
    return found


def drop(pipe: Any) -> None:
    """Free a pipeline's cached embeddings (when the pipeline is released)."""
    found = getattr(pipe, ATTR, None)
    if found is not None:
        found.clear()


def usable(pipe: Any, run: Any) -> str:
    """Why prompt embeddings cannot be passed to ``run`` for ``pipe``'s encoders ("" when they can)."""
    import inspect

    if not enabled():
        return f"{ENV}=0"
    if not callable(getattr(pipe, "encode_prompt", None)) or any(getattr(pipe, n, None) is None
                                                                 for n in ENCODERS + TOKENIZERS):
        return "the pipeline has no text encoders to skip"
    params = inspect.signature(type(run).__call__).parameters
    if "prompt_embeds" not in params or "pooled_prompt_embeds" not in params:
        return f"{type(run).__name__} takes no prompt embeddings"
    return ""


def embeddings(pipe: Any, prompts: list[str], max_sequence_length: int, tally: Tally) -> tuple[Any, Any] | None:
    """``prompt_embeds`` and ``pooled_prompt_embeds`` with one row per prompt (as ``pipe.encode_prompt`` makes
    them), encoding only the prompts not cached, once each, in one batch; None (and ``tally.skipped`` says why)
    when the encoders' state cannot be keyed."""
    import torch

    state, why = encoder_state(pipe)
    if state is None:
        tally.skipped = why
        return None
    cache = cache_of(pipe)
    token, previous = cache.token(state)
    if previous is not None:
        tally.changed = tally.changed or difference(previous, state, pipe)
    keys = {p: (token, max_sequence_length, p) for p in dict.fromkeys(prompts)}
    found = {p: e for p, k in keys.items() if (e := cache.get(k)) is not None}
    missing = [p for p in keys if p not in found]
    if missing:
        pe, pooled, _ = pipe.encode_prompt(prompt=missing, prompt_2=None, max_sequence_length=max_sequence_length)
        for i, p in enumerate(missing):
            found[p] = Entry(pe[i].clone(), pooled[i].clone())
            cache.put(keys[p], found[p])
    tally.hits += len(keys) - len(missing)
    tally.encoded += len(missing)
    return (torch.stack([found[p].prompt for p in prompts]), torch.stack([found[p].pooled for p in prompts]))


# ------------------------------------------------------------------ the encoders' state
def _adapter_state(module: Any) -> tuple[Any, ...] | None:
    """A PEFT tuner layer's adapter settings (None for other modules)."""
    if "merged_adapters" not in module.__dict__:  # set by peft's BaseTunerLayer (no slow nn.Module __getattr__)
        return None
    scaling = getattr(module, "scaling", {})
    return (tuple(module.active_adapters), tuple(module.merged_adapters), bool(getattr(module, "disable_adapters", False)),
            tuple(sorted(scaling.items())) if isinstance(scaling, dict) else repr(scaling))


def _walk(encoder: Any, addresses: bool) -> tuple[Any, ...]:
    """Each module's identity, type, hooks and adapter settings, and its own tensors' identity, dtype, device,
    version counter (and storage address)."""
    out = []
    modules = list(encoder.modules())
    EDITS.watch(modules)
    for m in modules:
        if m.training:
            raise _Untracked("is in training mode")
        tensors = tuple((id(t), t.dtype, t.device, t._version, t.data_ptr() if addresses else None)
                        for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
        out.append((id(m), type(m), len(m._forward_hooks), len(m._forward_pre_hooks), _adapter_state(m), tensors))
    return tuple(out)


class _Untracked(Exception):
    """An encoder state that cannot be fingerprinted (the message says why)."""


def _numerics() -> tuple[Any, ...]:
    """Global settings that change the encoders' arithmetic."""
    import torch

    sdp = getattr(torch._C, "_get_sdp_priority_order", None)
    flags = [getattr(torch._C, f"_get_{n}_sdp_enabled", None) for n in ("cudnn", "flash", "mem_efficient", "math")]
    return (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            tuple(sdp()) if sdp else None, tuple(f() if f else None for f in flags),
            torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))


def encoder_state(pipe: Any) -> tuple[tuple[Any, ...] | None, str]:
    """(a hashable fingerprint of what decides the encoders' output, "") or (None, why it cannot be keyed)."""
    offload = getattr(pipe, "_fluxkiln_offload", "none")
    addresses = offload == "none"  # offload hooks move the weights (new storage) on every call
    parts: list[Any] = []
    for name in ENCODERS:
        encoder = getattr(pipe, name)
        try:
            parts.append((weakref.ref(encoder), _walk(encoder, addresses)))
        except _Untracked as exc:
            return None, f"{name} {exc}"
        except RuntimeError:  # inference tensors keep no version counter: in-place changes would go unseen
            return None, f"{name} holds inference-mode tensors"
    tokenizers = tuple((weakref.ref(t) if _weak(t) else id(t), len(t)) for t in (getattr(pipe, n) for n in TOKENIZERS))
    return (EDITS.count, tuple(parts), tokenizers, _execution_device(pipe, offload), offload, _numerics()), ""


def _execution_device(pipe: Any, offload: str) -> str:
    """Where the encoders run.  Without offload that is where their tensors are, which the walk already records;
    diffusers' ``_execution_device`` would walk every module of every component for offload hooks (3-7 ms for a
    full-size FLUX pipeline, while the GPU waits for the first step)."""
    return "" if offload == "none" else str(getattr(pipe, "_execution_device", ""))


_PARTS = {0: "a weight edit or a new parameter, buffer or module on an encoder (LoRA fuse/unfuse, new layers)",
          2: "the tokenizers", 3: "the execution device", 4: "the offload mode",
          5: "the numerics settings (TF32, reduced-precision matmuls, attention backends, autocast)"}
_TENSOR = ("a parameter or buffer was replaced", "a dtype changed", "a device changed", "a tensor was changed in place",
           "a tensor moved in memory")


def difference(old: tuple[Any, ...], new: tuple[Any, ...], pipe: Any) -> str:
    """What differs between two :func:`encoder_state` fingerprints, in words (the first difference found)."""
    for i, label in _PARTS.items():
        if i == 2 and old[1] != new[1]:
            return _encoder_difference(old[1], new[1], pipe)
        if old[i] != new[i]:
            return label
    return _encoder_difference(old[1], new[1], pipe)


def _encoder_difference(old: tuple[Any, ...], new: tuple[Any, ...], pipe: Any) -> str:
    for name, (ref_a, walk_a), (ref_b, walk_b) in zip(ENCODERS, old, new, strict=True):
        if ref_a != ref_b or len(walk_a) != len(walk_b):
            return f"{name} was replaced or its modules changed"
        for j, (a, b) in enumerate(zip(walk_a, walk_b, strict=True)):
            if a == b:
                continue
            where = f"{name}.{next(itertools.islice(getattr(pipe, name).named_modules(), j, None))[0]}".rstrip(".")
            if a[:2] != b[:2] or len(a[5]) != len(b[5]):
                return f"{where} was replaced"
            if a[2:4] != b[2:4]:
                return f"hooks were added to or removed from {where}"
            if a[4] != b[4]:
                return f"{where}'s adapter settings changed"
            field = next(k for ta, tb in zip(a[5], b[5], strict=True) for k in range(5) if ta[k] != tb[k])
            return f"{_TENSOR[field]} in {where}"
    return "an unknown part"


def _weak(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True
