"""fluxkiln terminal UI (Textual)."""
