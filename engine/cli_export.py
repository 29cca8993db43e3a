"""CLI subcommands for engine folders: build, inspect."""

from __future__ import annotations


def add_commands(sub) -> None:
    pass
