"""fluxkiln's engine: recipe language, graph, fingerprints and caches, runner, events,
model residency, plugin manager, CLI and watcher.

It knows nothing of FLUX and never imports textual, torch or diffusers at import
time.  The names below are the public API for plugin authors and front-ends.
"""

from .commands import CommandParsers
from .context import RunContext
from .errors import Cancelled, NodeError, PluginError, Problem, RecipeInvalid
from .events import Event
from .hookspecs import hookimpl
from .nodes import FilePath, InputFile, NodeType, ParamSpec, Secret, node
from .ports import Dataset, DatasetItem, ImageItem, Images, Lora, Model, PortType, Prompts, Text
from .recipe import Link, Recipe

__all__ = [
    "Cancelled", "CommandParsers", "Dataset", "DatasetItem", "Event", "FilePath", "ImageItem", "Images", "InputFile", "Link", "Lora",
    "Model", "NodeError", "NodeType", "ParamSpec", "PluginError", "PortType", "Problem", "Prompts",
    "Recipe", "RecipeInvalid", "RunContext", "Secret", "Text", "hookimpl", "node",
]
