"""Counting changes to a model's structure: registrations of submodules, parameters and buffers on watched modules.

fluxkiln keeps work that depends on how a model is built — the prompt cache's entries, the precompiled blocks'
checks, recorded CUDA graphs — and must drop it when a module it watches gets a new submodule, parameter or
buffer (an adapter, an fp8 layer, fused projections).  Each :class:`Watch` counts those registrations for the
modules it was given (and for everything later added inside them); a user compares the count with the one it
saw.  One set of torch's global registration hooks serves every watch.

Registrations on other modules do not count: diffusers' VAE decoder slices a ``ModuleList`` in every forward,
which registers its modules into a new list.  Nor do registrations while torch.compile traces: a traced hook
would become a guard on the count and a side effect of the compiled graph, recompiling it at every call.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

_WATCHES: list[Watch] = []
_installed: list[Any] = []


class Watch:
    """A count of the registrations on the modules given to :meth:`watch`."""

    def __init__(self) -> None:
        self.modules: weakref.WeakSet[Any] = weakref.WeakSet()
        self.count = 0
        _WATCHES.append(self)

    def watch(self, modules: Iterable[Any]) -> None:
        """Count registrations on these modules (e.g. ``model.modules()``) from now on."""
        _install()
        self.modules.update(modules)

    def bump(self) -> None:
        """Count a change the hooks cannot see (weights merged in place, say)."""
        self.count += 1

    def _seen(self, parent: Any, value: Any) -> None:
        if parent in self.modules:
            self.count += 1
            if hasattr(value, "modules"):  # a new submodule: what is later added inside it counts too
                self.modules.update(value.modules())


def _on_register(parent: Any, _name: str, value: Any) -> Any:
    import torch

    if not torch.compiler.is_compiling():
        for w in _WATCHES:
            w._seen(parent, value)
    return None  # keep what is being registered


def _install() -> None:
    if _installed:
        return
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    _installed.extend(register(_on_register) for register in (register_module_module_registration_hook,
                                                              register_module_parameter_registration_hook,
                                                              register_module_buffer_registration_hook))
