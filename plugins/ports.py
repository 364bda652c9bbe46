"""Built-in plugin: registers the engine's built-in port types (images, model, lora, dataset, text, prompts)."""

from collections.abc import Callable

from fluxkiln.engine import PortType, hookimpl
from fluxkiln.engine.ports import BUILTIN_PORT_TYPES


@hookimpl
def register_port_types(register: Callable[[PortType], None]) -> None:
    for port_type in BUILTIN_PORT_TYPES:
        register(port_type)
