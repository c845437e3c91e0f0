"""What the demo builds (``DemoSettings``), the order of its flows (``flow_plan``) and how it picks its two spans
(``choose_spans``)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.span import Span

DEFAULT_MODEL = "smollm2-135m"  # = loading.DEFAULT_MODEL (not imported: loading imports torch, status must not)
MAX_PAIRS = 4096  # as the CLI's recoupling --pairs: the cost matrix is pairs² float64
FIRST_BLOCK = 1
"""Candidate spans start at block 1 or later: at m = 0 (the embeddings) every token with the same id has the same
x0, so R is near 1 whatever the blocks do (docs/RESULTS.md section 4)."""


@dataclass
class DemoSettings:
    """What the demo builds. The defaults are the app's (app/state.py DEFAULTS, the Span page's 256 token pairs
    with seed 0 and position 0 excluded, its 4 held-out windows for the affine grid) and the default training
    recipe (``train`` empty); ``train`` holds TrainConfig overrides (tests and small machines). Training uses
    ``seq_len`` too unless ``train`` sets its own."""

    model: str = DEFAULT_MODEL
    corpus: str = DEFAULT_CORPUS
    seq_len: int = 128
    windows: int = 16
    pairs: int = 256
    blocks: int = 6
    methods: tuple[str, ...] = ("sfm", "fw")
    affine_heldout_windows: int = 4
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.train = dict(self.train or {})

    def to_json(self) -> dict:
        return {**asdict(self), "methods": list(self.methods), "train": dict(sorted(self.train.items()))}

    @classmethod
    def from_json(cls, data: Any) -> DemoSettings:
        """Settings from a manifest; LFTError if they are not settings."""
        if not isinstance(data, dict):
            raise LFTError("the demo manifest's settings are not an object")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise LFTError(f"the demo manifest's settings are damaged ({e})") from None

    @property
    def total(self) -> int:
        """Number of steps: the length of ``demo_steps(self)`` (cache, two grids, and a flow per method on each
        of the two spans)."""
        from lft_core.run.demo.steps import demo_steps

        return len(demo_steps(self))

    def validate(self) -> None:
        """LFTError naming the first impossible setting (before any work)."""
        for name in ("model", "corpus"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise LFTError(f"the demo's {name} must be a non-empty string")
        for name, least in (("seq_len", 2), ("windows", 1), ("pairs", 2), ("blocks", 1),
                            ("affine_heldout_windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LFTError(f"the demo's {name.replace('_', ' ')} must be an integer of at least {least}, "
                               f"got {value!r}")
        if self.pairs > MAX_PAIRS:
            raise LFTError(f"at most {MAX_PAIRS} token pairs per span, got {self.pairs}")
        available = self.windows * (self.seq_len - 1)
        if self.pairs > available:
            raise LFTError(f"{self.pairs} token pairs per span, but {self.windows} windows x {self.seq_len - 1} "
                           f"positions (position 0 excluded) hold only {available}: use fewer pairs or more windows")
        from lft_core.flow.methods import METHODS

        if not self.methods or len(set(self.methods)) != len(self.methods) or \
                any(m not in METHODS for m in self.methods):
            raise LFTError(f"the demo's methods must be distinct names from {', '.join(METHODS)}, "
                           f"got {list(self.methods)}")
        from dataclasses import fields

        from lft_core.flow.config import TrainConfig

        allowed = {f.name for f in fields(TrainConfig)} - {"model", "corpus", "span", "method", "name", "sweep"}
        unknown = sorted(set(self.train) - allowed)
        if unknown:
            raise LFTError(f"unknown training setting(s) for the demo: {', '.join(unknown)}")
        try:
            cfg = TrainConfig(**{**self.train_kwargs(), "span": (1, 1 + self.blocks), "method": self.methods[0]})
        except (TypeError, ValueError) as e:
            raise LFTError(f"the demo's training settings: {e}") from None
        try:
            cfg.validate()  # LFTError naming a bad value (a batch larger than the windows, ...)
        except TypeError:
            raise LFTError(f"the demo's training settings have a value of the wrong type: {self.train}") from None

    def normalised(self) -> DemoSettings:
        """The same settings with training overrides equal to the default recipe dropped, so ``--steps 400``
        and no flag are one demo (imports the training module)."""
        from dataclasses import fields

        from lft_core.flow.config import TrainConfig

        defaults = {f.name: f.default for f in fields(TrainConfig)}
        train = {k: v for k, v in self.train.items() if not (k in defaults and defaults[k] == v and
                                                             type(defaults[k]) is type(v))}
        if train.get("seq_len") == self.seq_len:
            train.pop("seq_len")
        return DemoSettings(**{**asdict(self), "methods": tuple(self.methods), "train": train})

    def flow_tag(self) -> str:
        """'' for the default demo (default model, corpus, 128-token windows and recipe); else 6 hex digits of a
        hash of what the flows depend on, so flows of other settings never take the default demo's names."""
        recipe = {"model": self.model, "corpus": self.corpus, "seq_len": self.seq_len, **self.train}
        if recipe == {"model": DEFAULT_MODEL, "corpus": DEFAULT_CORPUS, "seq_len": 128}:
            return ""
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:6]

    def flow_name(self, method: str, span: Span | tuple[int, int]) -> str:
        m, n = span
        tag = self.flow_tag()
        return f"demo-{method}-{m}-{n}" + (f"-{tag}" if tag else "")

    def train_kwargs(self) -> dict:
        """TrainConfig keyword arguments common to every demo flow (span, method and name come per flow)."""
        return {"model": self.model, "corpus": self.corpus, "seq_len": self.seq_len, **self.train}


def flow_plan(settings: DemoSettings) -> list[tuple[str, str]]:
    """The flows in order: (which span, method), the low-R span's flows first (``demo_steps`` makes one step of
    each)."""
    return [(which, method) for which in ("low", "high") for method in settings.methods]


def choose_spans(matrix, blocks: int) -> dict:
    """The low-R and the high-R span among the spans [m, m + blocks) with m >= 1 and a finite R in ``matrix``
    (shape (L+1, L+1), the recoupling grid): lowest R (ties: the earliest span) and highest R among the others
    (ties: the latest span). LFTError when fewer than two spans qualify. Returns {"low": {"span", "R"}, "high":
    {...}, "rule": why}."""
    import numpy as np

    L = matrix.shape[0] - 1
    candidates = [(float(matrix[m, m + blocks]), m) for m in range(FIRST_BLOCK, L - blocks + 1)
                  if np.isfinite(matrix[m, m + blocks])]
    if len(candidates) < 2:
        raise LFTError(f"spans of {blocks} blocks starting at block {FIRST_BLOCK} or later leave fewer than two "
                       f"spans to choose from in a model of {L} blocks: use fewer blocks")
    low = min(candidates, key=lambda c: (c[0], c[1]))
    high = max((c for c in candidates if c != low), key=lambda c: (c[0], c[1]))
    rule = (f"among the {len(candidates)} spans of {blocks} blocks that start at block {FIRST_BLOCK} or later (at "
            f"m = 0 every token with the same id starts from the same embedding, so R is near 1 whatever the blocks "
            f"do), the lowest recoupling ratio ({Span(low[1], low[1] + blocks)}, R {low[0]:.3f}: straight paths "
            f"agree with the teacher's pairing) and the highest ({Span(high[1], high[1] + blocks)}, R {high[0]:.3f}: "
            f"optimal transport re-pairs the most tokens, so plain flow matching averages over crossing paths); ties "
            f"go to the earliest span for low R and the latest for high R")
    return {"low": {"span": [low[1], low[1] + blocks], "R": low[0]},
            "high": {"span": [high[1], high[1] + blocks], "R": high[0]}, "rule": rule}
