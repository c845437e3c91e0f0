"""Errors the engine raises for bad input: the CLI prints them as one line and exits 2, the app as one line."""
from __future__ import annotations


class LFTError(Exception):
    """Base class: a user-facing problem with a clear one-line message."""
