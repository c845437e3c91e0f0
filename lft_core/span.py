"""The span [m, n): the blocks m … n−1 of a teacher that one latent flow (or a skip, or a baseline) replaces.

``Span`` is the project's one type for it. It is a named tuple, so ``m, n = span``, ``tuple(span)`` and
``span == (6, 12)`` work, and JSON writes it as ``[m, n]``; everything else a span needs lives here:

* ``Span.parse("6:12")``: the text users type (CLI ``--span``, the URL ``?span=``), checked;
* ``str(span)`` -> ``"6:12"``, ``span.blocks`` -> n − m;
* ``Span.of(value)``: a Span from a Span or a tuple/list of two integers (JSON, session state);
* ``span.check(n_layers)``: the one range check 0 <= m < n <= L, with one message everywhere;
* ``all_spans(L)`` / ``parse_spans("6:12,12:18", L)``: lists of spans;
* ``grid_json`` / ``grid_frame`` / ``lowest_of_length``: a value for every span, as a matrix[m][n] (the
  recoupling grid, the affine-baseline grid).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from lft_core.errors import LFTError

if TYPE_CHECKING:
    import pandas as pd

_SPAN_RE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


class Span(NamedTuple):
    """Blocks m … n−1 of a teacher (0 <= m < n <= L once checked against a model of L blocks)."""

    m: int
    n: int

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Span:
        """``"M:N"`` -> Span(M, N), checked for 0 <= M < N; LFTError naming the expected form otherwise."""
        match = _SPAN_RE.match(str(text))
        if not match:
            raise LFTError(f"span must look like M:N (e.g. 6:12), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2))).check()

    @classmethod
    def of(cls, value: Any) -> Span:
        """A Span from a Span or a pair of integers (tuple, list: JSON and session state); not range-checked
        (call ``check``). LFTError when ``value`` is neither (text goes through ``parse``)."""
        if isinstance(value, Span):
            return value
        if isinstance(value, (str, bytes)):
            raise LFTError(f"span must be two integers [m, n], got {value!r}")
        try:
            m, n = value
        except (TypeError, ValueError):
            raise LFTError(f"span must be two integers [m, n], got {value!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (m, n)):
            raise LFTError(f"span must be two integers [m, n], got {value!r}")
        return cls(int(m), int(n))

    # -- facts ----------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.m}:{self.n}"

    @property
    def blocks(self) -> int:
        """Number of blocks replaced, n − m."""
        return self.n - self.m

    def check(self, n_layers: int | None = None, where: str = "") -> Span:
        """This span if 0 <= m < n (and n <= n_layers when that is known), else LFTError; ``where`` names the
        model (" for gpt2", " for a model of 4 blocks")."""
        if not 0 <= self.m < self.n or (n_layers is not None and self.n > n_layers):
            limit = f" <= {n_layers}" if n_layers is not None else ""
            raise LFTError(f"span {self} is not valid{where} (out of range): span must satisfy 0 <= m < n{limit}")
        return self


def all_spans(n_layers: int) -> list[Span]:
    """Every span of a model of ``n_layers`` blocks, in the order (0, 1), (0, 2), …, (L−1, L)."""
    return [Span(m, n) for m in range(n_layers) for n in range(m + 1, n_layers + 1)]


def parse_spans(text: str | None, n_layers: int) -> list[Span] | None:
    """``all`` / None -> None (every span); else ``M:N,M:N`` each checked against 0 <= M < N <= L."""
    if text is None or text.strip().lower() == "all":
        return None
    return [Span.parse(part).check(n_layers) for part in text.split(",")]


# ---------------------------------------------------------------------------------------------------------
# A value for every span: matrix[m, n], NaN where m >= n or not computed (the recoupling ratio, an NMSE, ...)


def grid_json(matrix: np.ndarray) -> list[list[float | None]]:
    """A span matrix, shape (L+1, L+1), as nested lists with None for NaN (JSON has no NaN)."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def grid_frame(matrix: np.ndarray, value: str) -> pd.DataFrame:
    """One row per computed span: columns m, n, blocks and ``value``."""
    import pandas as pd

    L = matrix.shape[0] - 1
    rows = [{"m": m, "n": n, "blocks": n - m, value: matrix[m, n]}
            for m, n in all_spans(L) if np.isfinite(matrix[m, n])]
    return pd.DataFrame(rows, columns=["m", "n", "blocks", value])


def lowest_of_length(matrix: np.ndarray, blocks: int) -> tuple[Span, float] | None:
    """Among spans of ``blocks`` blocks, the one with the lowest finite value (None when none is computed)."""
    L = matrix.shape[0] - 1
    values = [(matrix[m, m + blocks], Span(m, m + blocks)) for m in range(0, L - blocks + 1)]
    values = [(v, s) for v, s in values if np.isfinite(v)]
    if not values:
        return None
    value, span = min(values)
    return span, float(value)
