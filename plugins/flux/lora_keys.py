"""Convert FLUX LoRA key formats: kohya/ComfyUI/ai-toolkit/BFL names <-> diffusers/PEFT names.

The one format diffusers loads without guessing is PEFT's with diffusers module
names: ``transformer.single_transformer_blocks.7.proj_out.lora_A.weight`` (and
``text_encoder.text_model...`` for CLIP).  :func:`to_peft` turns any supported
file into that form, baking each module's ``alpha / rank`` into ``lora_A`` and
splitting the fused projections of the original (BFL) FLUX layout
(``img_attn.qkv``, ``single_blocks.N.linear1``) into diffusers' separate ones.
:func:`peft_to_kohya` is the reverse, for files that load in ComfyUI, Forge and
kohya's scripts.  Pure tensor bookkeeping: no model is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# BFL (original FLUX) module -> diffusers module(s), and the row fractions of a fused output.
DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation.lin": ("norm.linear",),
}
TOP: dict[str, str] = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
FRACTIONS = {"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}
SWAPPED = {"norm_out.linear"}  # BFL orders this modulation (shift, scale); diffusers (scale, shift)
CLIP_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
DIFFUSERS_LEAVES = sorted({leaf for parts in (*DOUBLE.values(), *SINGLE.values()) for leaf in parts})
STRIP_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
UNSUPPORTED_MARKS = ("dora_scale", "hada_", "lokr_", ".diff", "oft_")

_SUFFIXES = ((".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".lora_A.weight", "down"),
             (".lora_B.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))


@dataclass
class Converted:
    """A state dict in diffusers/PEFT form, and what could not be converted."""

    state_dict: dict[str, Any] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    source_format: str = "unknown"

    def modules(self) -> list[str]:
        """The target module names (``transformer.x.y``), in order."""
        return [k[: -len(".lora_A.weight")] for k in self.state_dict if k.endswith(".lora_A.weight")]


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def _underscored(table: Any) -> dict[str, str]:
    return {name.replace(".", "_"): name for name in table}


_DOUBLE_U, _SINGLE_U, _TOP_U = _underscored(DOUBLE), _underscored(SINGLE), _underscored(TOP)
_CLIP_U, _DIFF_U = _underscored(CLIP_LEAVES), _underscored(DIFFUSERS_LEAVES)
_DIFF_TOP_U = _underscored([v for v in TOP.values()] + ["norm_out.linear"])


def _kohya_unet_to_bfl(name: str) -> str | None:
    """``double_blocks_0_img_attn_qkv`` -> ``double_blocks.0.img_attn.qkv`` (None if not a FLUX name)."""
    m = re.fullmatch(r"(double|single)_blocks_(\d+)_(\w+)", name)
    if m:
        table = _DOUBLE_U if m.group(1) == "double" else _SINGLE_U
        leaf = table.get(m.group(3))
        return f"{m.group(1)}_blocks.{m.group(2)}.{leaf}" if leaf else None
    return _TOP_U.get(name)


def _kohya_diffusers_to_dotted(name: str) -> str | None:
    """``single_transformer_blocks_0_proj_out`` -> ``single_transformer_blocks.0.proj_out``."""
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)_(\d+)_(\w+)", name)
    if m:
        leaf = _DIFF_U.get(m.group(3))
        return f"{m.group(1)}.{m.group(2)}.{leaf}" if leaf else None
    return _DIFF_TOP_U.get(name)


def _kohya_clip_to_dotted(name: str) -> str | None:
    m = re.fullmatch(r"text_model_encoder_layers_(\d+)_(\w+)", name)
    leaf = _CLIP_U.get(m.group(2)) if m else None
    return f"text_model.encoder.layers.{m.group(1)}.{leaf}" if leaf else None


def _bfl_targets(name: str) -> tuple[list[str], tuple[int, ...] | None] | None:
    """BFL dotted module -> (diffusers modules, row fractions if the output is fused)."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name)
    if m:
        table, block = (DOUBLE, "transformer_blocks") if m.group(1) == "double" else (SINGLE, "single_transformer_blocks")
        parts = table.get(m.group(3))
        if parts is None:
            return None
        return [f"{block}.{m.group(2)}.{p}" for p in parts], FRACTIONS.get(m.group(3))
    return ([TOP[name]], None) if name in TOP else None


def _is_diffusers_module(name: str) -> bool:
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", name)
    return (m.group(3) in DIFFUSERS_LEAVES) if m else name in TOP.values()


def _targets(module: str) -> tuple[str, list[str], tuple[int, ...] | None, str] | None:
    """Classify one source module name: (component, target modules, fractions, format) or None."""
    if module.startswith("lora_unet_"):
        bfl = _kohya_unet_to_bfl(module[len("lora_unet_"):])
        found = _bfl_targets(bfl) if bfl else None
        return ("transformer", found[0], found[1], "kohya") if found else None
    if module.startswith("lora_transformer_"):
        dotted = _kohya_diffusers_to_dotted(module[len("lora_transformer_"):])
        return ("transformer", [dotted], None, "kohya-diffusers") if dotted else None
    if module.startswith("lora_te1_") or module.startswith("lora_te_"):
        dotted = _kohya_clip_to_dotted(module.split("_", 2)[2])
        return ("text_encoder", [dotted], None, "kohya") if dotted else None
    if module.startswith("text_encoder."):
        rest = module[len("text_encoder."):]
        ok = re.fullmatch(r"text_model\.encoder\.layers\.\d+\.(.+)", rest)
        return ("text_encoder", [rest], None, "diffusers") if ok and ok.group(1) in CLIP_LEAVES else None
    name = module
    for prefix in STRIP_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    if _is_diffusers_module(name):
        return "transformer", [name], None, "diffusers"
    found = _bfl_targets(name)
    return ("transformer", found[0], found[1], "bfl") if found else None


def _group(state_dict: dict[str, Any], result: Converted) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if any(mark in key for mark in UNSUPPORTED_MARKS):
            result.unsupported.append(key)
            continue
        split = _split_suffix(key)
        if split is None:
            result.unknown.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
    return groups


def to_peft(state_dict: dict[str, Any]) -> Converted:
    """Convert a FLUX LoRA state dict (any supported format) to diffusers/PEFT keys with alpha baked in."""
    result = Converted()
    formats: set[str] = set()
    for module, parts in _group(state_dict, result).items():
        target = _targets(module)
        if target is None or "down" not in parts or "up" not in parts:
            result.unknown.extend(f"{module}.{kind}" for kind in parts)
            continue
        component, names, fractions, fmt = target
        formats.add(fmt)
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().reshape(-1)[0]) if hasattr(parts["alpha"], "float") else float(parts["alpha"])
            down = down * (alpha / rank)
        ups = _split_rows(up, fractions) if fractions else [up]
        if ups is None:
            result.unknown.extend(f"{module}.{kind}" for kind in parts)
            continue
        for name, part_up in zip(names, ups, strict=True):
            if fractions and not bool(part_up.any()):
                continue  # a fused part this LoRA leaves untouched
            if name in SWAPPED:
                part_up = _swap_halves(part_up)
            result.state_dict[f"{component}.{name}.lora_A.weight"] = down.clone().contiguous()
            result.state_dict[f"{component}.{name}.lora_B.weight"] = part_up.clone().contiguous()
    result.source_format = "+".join(sorted(formats)) if formats else "unknown"
    return result


def _split_rows(up: Any, fractions: tuple[int, ...]) -> list[Any] | None:
    total = sum(fractions)
    if up.shape[0] % total:
        return None
    unit = up.shape[0] // total
    return list(up.split([unit * f for f in fractions], dim=0))


def _swap_halves(t: Any) -> Any:
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# ------------------------------------------------------------------ reverse
def _diffusers_to_bfl() -> dict[str, tuple[str, int]]:
    """diffusers leaf (per block kind) -> (BFL leaf, index within a fused group)."""
    out: dict[str, tuple[str, int]] = {}
    for kind, table in (("transformer_blocks", DOUBLE), ("single_transformer_blocks", SINGLE)):
        for bfl, parts in table.items():
            for i, part in enumerate(parts):
                out[f"{kind}|{part}"] = (bfl, i)
    return out


_REVERSE = _diffusers_to_bfl()
_REVERSE_TOP = {v: k for k, v in TOP.items()}


def _peft_modules(state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    modules: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        split = _split_suffix(key)
        if split is None or split[1] == "alpha":
            if split is None:
                raise ValueError(f"peft_to_kohya: key {key!r} is not a lora_A/lora_B weight")
            continue
        name = split[0]
        for prefix in ("base_model.model.", "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        modules.setdefault(name, {})[split[1]] = value
    return modules


def peft_to_kohya(state_dict: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Convert a diffusers/PEFT FLUX LoRA (trained with ``alpha``) to kohya/ComfyUI keys.

    Separate q/k/v (and single-block ``proj_mlp``) LoRAs are joined into the
    fused BFL projection as one LoRA of the summed rank (down weights stacked,
    up weights block-diagonal; missing parts contribute zero rows), with alpha
    scaled so every part keeps its ``alpha / rank`` strength.  Text-encoder
    (CLIP) modules become ``lora_te1_*``.  Raises ValueError for a module this
    mapping does not know.
    """
    import torch

    fused: dict[str, dict[int, dict[str, Any]]] = {}
    out: dict[str, Any] = {}
    for name, parts in _peft_modules(state_dict).items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"peft_to_kohya: module {name!r} lacks lora_A or lora_B")
        if name.startswith("text_encoder."):
            _put(out, "lora_te1_" + name[len("text_encoder."):].replace(".", "_"), parts["down"], parts["up"], alpha)
            continue
        m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", name)
        if m and f"{m.group(1)}|{m.group(3)}" in _REVERSE:
            bfl_leaf, index = _REVERSE[f"{m.group(1)}|{m.group(3)}"]
            block = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
            fused.setdefault(f"{block}.{m.group(2)}.{bfl_leaf}", {})[index] = parts
        elif name in _REVERSE_TOP:
            up = _swap_halves(parts["up"]) if name in SWAPPED else parts["up"]
            _put(out, "lora_unet_" + _REVERSE_TOP[name].replace(".", "_"), parts["down"], up, alpha)
        else:
            raise ValueError(f"peft_to_kohya: no kohya name for FLUX module {name!r}")
    for bfl, members in fused.items():
        leaf = bfl.split(".", 2)[2]
        fractions = FRACTIONS.get(leaf)
        if fractions is None:
            (parts,) = members.values()
            _put(out, "lora_unet_" + bfl.replace(".", "_"), parts["down"], parts["up"], alpha)
            continue
        down, up, rank_alpha = _join(members, fractions, alpha, torch)
        _put(out, "lora_unet_" + bfl.replace(".", "_"), down, up, rank_alpha)
    return out


def _put(out: dict[str, Any], name: str, down: Any, up: Any, alpha: float) -> None:
    import torch

    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(alpha))


def _join(members: dict[int, dict[str, Any]], fractions: tuple[int, ...], alpha: float, torch: Any) -> tuple[Any, Any, float]:
    """Fuse part LoRAs into one: stacked downs, block-diagonal ups; returns (down, up, alpha)."""
    first = next(iter(members.values()))
    unit_rows = {i: p["up"].shape[0] // fractions[i] for i, p in members.items()}
    unit = next(iter(unit_rows.values()))
    if any(u != unit for u in unit_rows.values()):
        raise ValueError("peft_to_kohya: q/k/v LoRA parts of one block have inconsistent sizes")
    ranks = {i: p["down"].shape[0] for i, p in members.items()}
    total_rank = sum(ranks.values())
    same_rank = len(set(ranks.values())) == 1
    dtype, device = first["up"].dtype, first["up"].device
    up = torch.zeros(unit * sum(fractions), total_rank, dtype=dtype, device=device)
    downs, col, row = [], 0, 0
    for i, f in enumerate(fractions):
        rows = unit * f
        if i in members:
            r = ranks[i]
            scale = 1.0 if same_rank else (alpha / r)
            up[row:row + rows, col:col + r] = members[i]["up"] * scale
            downs.append(members[i]["down"])
            col += r
        row += rows
    r0 = next(iter(ranks.values()))
    new_alpha = alpha * total_rank / r0 if same_rank else float(total_rank)
    return torch.cat(downs, dim=0), up, new_alpha
