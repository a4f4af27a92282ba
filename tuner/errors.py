"""Errors the CLI turns into exit code 2 with one readable line."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad command-line use or configuration (not a space-file problem)."""
