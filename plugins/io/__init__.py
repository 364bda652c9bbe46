"""Built-in plugin (being written)."""
