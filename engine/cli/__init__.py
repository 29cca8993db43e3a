"""Command-line entry points (`auraflow-edge ...`): the only engine modules that may import export/."""
