"""The opt-in step cache of ``sample`` (``cache_threshold``): first-block caching, lossy.

At each denoising step the first transformer block runs; when its output residual changed by less than
``cache_threshold`` (relative mean absolute change against the last step that ran every block), the other
blocks are skipped and the residual they added on that last full step is reused.  Diffusers' First Block Cache
hooks do the work (``transformer.enable_cache(FirstBlockCacheConfig(threshold))``); this module turns them on
for one call and off again afterwards (the resident pipeline is shared, so it is never left changed), and
counts the steps that ran every block and those that reused the cache.

Nothing here imports torch or diffusers at module level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

HEAD_HOOK = "fbc_leader_block_hook"  # diffusers' name for the first block's hook


@dataclass
class StepCount:
    """How many transformer calls ran every block (``computed``) and how many reused the cache (``skipped``)."""

    computed: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"cache_computed_steps": self.computed, "cache_skipped_steps": self.skipped}


def _head_block(transformer: Any) -> Any:
    from .fast import blocks

    found = blocks(transformer)
    if len(found) < 2:
        raise ValueError("the step cache needs a transformer with at least two blocks")
    return found[0]


@contextlib.contextmanager
def step_cache(transformer: Any, threshold: float) -> Iterator[StepCount]:
    """First-block caching on ``transformer`` for the ``with`` body (nothing at all when ``threshold`` is 0)."""
    count = StepCount()
    if threshold <= 0:
        yield count
        return
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    head = _head_block(transformer)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=float(threshold)))
    try:
        hook = HookRegistry.check_if_exists_or_initialize(head).get_hook(HEAD_HOOK)
        decide = hook._should_compute_remaining_blocks

        @torch.compiler.disable
        def counted(residual: Any) -> bool:
            compute = decide(residual)
            if compute:
                count.computed += 1
            else:
                count.skipped += 1
            return compute

        hook._should_compute_remaining_blocks = counted
        yield count
    finally:
        transformer.disable_cache()
