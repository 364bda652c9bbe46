"""Built-in plugin: the ``fluxkiln bench`` command, which times fluxkiln's real recipe paths (``load_model ->
sample``, ``train_lora``) against stock diffusers/peft on this machine and guards the fast paths' quality.

Without weights the full-size FLUX.1-dev and -schnell architectures are built from their configs with random
weights directly on the GPU (the two transformers share their blocks); a config-only folder stands for each model,
and the pipeline is put into the Engine's residency under exactly the key ``load_model`` computes for that folder,
so the recipes run unchanged through :class:`~fluxkiln.engine.runner.Engine`.  ``--tiny`` runs the same code on
the tiny built-in model (CI).  One module per job: ``session`` (pipelines, Engine, results, timing helpers),
``sampling``, ``training``, ``guard`` (quality), ``kernels`` and ``profile`` (what the GPU does), ``models``
(the random-weight pipelines), ``report`` (targets and table), ``cli``; ``e2e`` and ``e2e_worker`` (``--e2e``:
fresh processes of ``fluxkiln run`` and stock diffusers), ``quality`` (the quality guard on mini-flux) and
``overhead`` (the engine's time outside the pipeline call, by phase).
"""

from __future__ import annotations

from fluxkiln.engine import hookimpl


@hookimpl
def register_commands(register):
    from .cli import HELP, main

    register("bench", HELP, main)
