"""Errors the engine raises for bad input (the CLI prints them as one line and exits 2), and the one check of a
layer span that every entry point shares."""
from __future__ import annotations


class LFTError(Exception):
    """Base class: a user-facing problem with a clear one-line message."""


def check_span(m: int, n: int, n_layers: int | None = None, where: str = "") -> None:
    """LFTError unless 0 <= m < n (and n <= n_layers when that is known); ``where`` names the model."""
    if not 0 <= m < n or (n_layers is not None and n > n_layers):
        limit = f" <= {n_layers}" if n_layers is not None else ""
        raise LFTError(f"span {m}:{n} is not valid{where}: need 0 <= m < n{limit}")
