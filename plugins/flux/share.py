"""Share the text encoders, tokenizers and VAE of one resident FLUX pipeline with another.

FLUX.1 [dev] and [schnell] use the same CLIP-L and T5-XXL text encoders and
the same VAE; only the transformer (and scheduler settings) differ.  A
``load_model`` with ``share = "@other"`` loads just its transformer and
scheduler and takes the other pipeline's modules, so a dev + schnell recipe
holds one copy of them (about 10 GB in bfloat16 for the real models: T5-XXL is most of it).

The residency manager may evict either pipeline.  Freeing a pipeline moves its
modules to the ``meta`` device; a module another live pipeline still uses is
left alone (:func:`keep_alive`), and the borrower's own size leaves out what it
borrowed (:func:`borrowed_names`).
"""

from __future__ import annotations

import weakref
from typing import Any

from fluxkiln.engine import NodeError

SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
_USERS: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def donor_parts(donor: Any, dtype: Any, offload: str) -> dict[str, Any]:
    """The modules to borrow from ``donor``; NodeError when they cannot be shared."""
    if offload != "none" or getattr(donor, "_fluxkiln_offload", "none") != "none":
        raise NodeError("`share` needs offload = \"none\" on both models (offload hooks cannot be shared)",
                        key="share", hint="remove offload, or load the models separately")
    donor_dtype = getattr(donor, "_fluxkiln_dtype", None)
    if donor_dtype is not None and donor_dtype != dtype:
        raise NodeError(f"`share`: the other model is in {str(donor_dtype).replace('torch.', '')}, this one in "
                        f"{str(dtype).replace('torch.', '')}", key="share", hint="give both the same dtype")
    return {name: getattr(donor, name) for name in SHARED}


def check_compatible(own_config: dict[str, Any], donor: Any, ref: str) -> None:
    """The borrowed VAE must be the one this model was trained with (same configuration)."""
    theirs = {k: v for k, v in dict(donor.vae.config).items() if not k.startswith("_")}
    mine = {k: v for k, v in own_config.items() if not k.startswith("_")}
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        raise NodeError(f"`share`: the other model's VAE differs from the one of '{ref}' ({', '.join(differ[:4])})",
                        key="share", hint="share only between FLUX.1 models with the same VAE and text encoders "
                                          "(FLUX.1 dev and schnell do)")


def adopt(pipe: Any, parts: dict[str, Any]) -> None:
    """Record that ``pipe`` uses ``parts`` borrowed from another pipeline."""
    pipe._fluxkiln_borrowed = tuple(parts)
    for module in parts.values():
        if module is not None:
            _users(module).add(pipe)


def _users(module: Any) -> weakref.WeakSet[Any]:
    found = _USERS.get(module)
    if found is None:
        found = _USERS[module] = weakref.WeakSet()
    return found


def borrowed_names(pipe: Any) -> tuple[str, ...]:
    return tuple(getattr(pipe, "_fluxkiln_borrowed", ()))


def keep_alive(pipe: Any, name: str, module: Any) -> bool:
    """True if freeing ``pipe`` must leave ``module`` alone: borrowed by it, or used by another pipeline."""
    if name in borrowed_names(pipe):
        _users(module).discard(pipe)
        return True
    try:
        users = _USERS.get(module)
    except TypeError:  # not weak-referenceable: never shared
        return False
    return bool(users) and any(user is not pipe for user in users)
