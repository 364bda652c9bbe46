"""fluxkiln's built-in node plugins.

Each subpackage (and ``ports``) is a plugin found exactly as a third-party
plugin is: through an entry point in group ``fluxkiln``, declared in fluxkiln's
own ``pyproject.toml``.  They implement hooks from ``fluxkiln.engine.hookspecs``
with ``@hookimpl``.  None of them imports torch or diffusers at module level, so
``fluxkiln validate`` stays fast.
"""

import logging as _logging


class _NoTorchvisionNotice(_logging.Filter):
    """Drop transformers' notice that an image processor falls back to its PIL version without torchvision:
    fluxkiln's image processing is PIL-based by design, so the notice is noise on every run that imports
    diffusers or a CLIP/SigLIP processor."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
