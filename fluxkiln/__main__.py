"""``python -m fluxkiln``: the fluxkiln command, for launchers such as ``torchrun -m fluxkiln run ...``."""

from fluxkiln.engine.cli import entry

if __name__ == "__main__":
    entry()
