"""The settings of a training run: ``TrainConfig``, every field spelt once with its default, help text and how the
command line reads it (``setting``), so that the CLI's ``train`` / ``sweep`` flags, the app's job launcher and
the saved flow's config.json all derive from it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.flow.latent import MAX_K
from lft_core.flow.methods import METHODS, get_method
from lft_core.flow.store import NAME_RE
from lft_core.span import Span

MAX_SEED = 2**63 - 1  # the largest seed every RNG the engine seeds (torch, numpy) takes
LOSS_WEIGHTINGS = ("nmse", "uniform")


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A TrainConfig field: its default, the help text of its CLI flag, and how the CLI reads it (``type``,
    ``choices``, ``positive`` for integers >= 1, ``required``). The CLI parser and the app's job launcher are
    both built from these, so a setting is spelt once."""
    return field(default=default, metadata={"help": help, **cli})


RANGES: dict[str, tuple[float, bool, float | None, str]] = {
    # name: (low, low excluded, high (excluded) or None, in words)
    "lr": (0.0, True, None, "positive"),
    "distill_lr": (0.0, True, None, "positive"),
    "grad_clip": (0.0, True, None, "positive (the gradient norm is clipped to it; 0 or less would stop or reverse "
                                   "training)"),
    "warmup": (0.0, False, 1.0, "at least 0 and below 1 (a share of the steps)"),
    "weight_decay": (0.0, False, None, "0 or more"),
    "alpha": (0.0, False, 1e6, "between 0 and 1e6"),
    "waypoints": (0.0, False, 1e6, "between 0 and 1e6"),
    "sink_weight": (0.0, False, 1e6, "between 0 and 1e6"),
}
"""The float settings' meaningful ranges (every one also finite), checked by ``TrainConfig.validate``."""

_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str, "corpus": str, "method": str, "loss_weighting": str, "name": str, "sweep": str,
    **{n: int for n in ("k", "steps", "batch", "seq_len", "windows", "heldout_windows", "seed", "distill_steps",
                        "distill_batch", "eval_every", "checkpoint_every")},
    **{n: (int, float) for n in RANGES},
    "init_from_teacher": bool, "normalise": bool,
}
_OPTIONAL = ("name", "sweep", "sink_weight")
_LABELS = {"lr": "learning rate (lr)", "distill_lr": "distillation learning rate (distill_lr)",
           "waypoints": "the waypoint weight (waypoints)", "sink_weight": "sink weight (sink_weight)",
           "grad_clip": "gradient clip (grad_clip)", "warmup": "warm-up share (warmup)",
           "weight_decay": "weight decay (weight_decay)", "alpha": "SFM weight (alpha)",
           "distill_batch": "distill batch (distill_batch)"}
_KIND_WORDS = {str: "text", int: "an integer", (int, float): "a number", bool: "true or false"}


@dataclass
class TrainConfig:
    """Everything that defines a training run. The defaults are the project's default recipe (docs/RESULTS.md
    section 1): 400 Flow Walking steps on 1024 windows x 128 tokens of the default corpus (the mixture), then 200
    steps of output-level distillation; about 10 minutes for a 6-block span of the embedded model on 2 CPU cores."""

    model: str = setting("smollm2-135m", "smollm2-135m (embedded), an HF id or a folder")
    corpus: str = setting(DEFAULT_CORPUS, "mix (default: the broad human-written mixture), mix:PART, english, "
                                          "builtin (Python docs), a .txt/.jsonl file or folder, hf:NAME")
    span: Span = setting(Span(6, 12), "M:N, the blocks M..N-1 to replace", required=True)
    method: str = setting("fw", "training method (a name of methods.METHODS)", choices=lambda: tuple(METHODS))
    k: int = setting(3, "integration steps (Flow Walking walks k steps)", type=int)
    alpha: float = setting(0.1, "weight of the SFM term in hybrid")
    steps: int = setting(400, "flow-matching optimiser steps", positive=True)
    batch: int = setting(8, "windows per step", positive=True)
    seq_len: int = setting(128, "tokens per window", positive=True)
    windows: int = setting(1024, "training windows", positive=True)
    heldout_windows: int = setting(16, "held-out windows for the NMSE during training", positive=True)
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup: float = setting(0.05, "share of the steps spent warming the learning rate up")
    grad_clip: float = setting(1.0, "gradient norm clip")
    seed: int = setting(0, "seed of the initialisation, batches and times", type=int)
    init_from_teacher: bool = setting(False, "initialise from block M of the teacher")
    normalise: bool = setting(True, "standardise x0/x1 per dimension")
    loss_weighting: str = setting("nmse", "nmse: per-token relative error in original units; uniform: plain MSE",
                                  choices=LOSS_WEIGHTINGS)
    sink_weight: float | None = setting(None, "loss weight of position 0, the attention sink (default: seq_len / 2)",
                                        type=float)
    waypoints: float = setting(0.0, "weight of the teacher-path term: flow matching along the piecewise-linear "
                                    "path through h_{M+1}..h_{N-1} (0: off)")
    distill_steps: int = setting(200, "steps of output-level distillation after the flow steps: minimise "
                                    "KL(teacher || spliced model) through blocks N.. and the LM head (0: off)",
                                    type=int)
    distill_lr: float = setting(1e-4, "peak learning rate of the distillation steps")
    distill_batch: int = setting(4, "windows per distillation step", positive=True)
    eval_every: int = setting(50, "held-out NMSE every this many steps", positive=True)
    checkpoint_every: int = setting(100, "checkpoint every this many steps", positive=True)
    name: str | None = setting(None, "flow name (default: derived from the settings)", type=str)
    sweep: str | None = setting(None, "the sweep this flow belongs to (set by `python -m lft_core sweep`)", type=str)

    def __post_init__(self) -> None:
        self.span = Span.of(self.span)
        for name in RANGES:  # -0.0 is 0.0 (the record and resume comparisons see one zero)
            value = getattr(self, name)
            if isinstance(value, float) and value == 0:
                setattr(self, name, 0.0)

    def cli_args(self) -> list[str]:
        """The ``python -m lft_core train`` flags that reproduce this config (every setting, spelt once)."""
        args: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif value is not None:
                args += [flag, str(value)]
        return args

    def validate(self, n_layers: int | None = None) -> None:
        """LFTError (one line, naming the setting) unless every setting has the right type and a meaningful value,
        and the settings make sense together. Needs no model (``n_layers``, when known, also checks the span), so
        callers run it before any model loads. Ranges (``RANGES``): every float finite; lr, distill_lr and
        grad_clip > 0; 0 <= warmup < 1; weight_decay, alpha, waypoints, sink_weight >= 0; the learning rates
        times weight_decay < 1 (AdamW's decoupled decay multiplies the weights by 1 - lr * weight_decay each
        step: at 1 or more it flips or zeroes them)."""
        for name, kind in _TYPES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            ok = isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)
            if not ok:
                raise LFTError(f"{_LABELS.get(name, name)} must be {_KIND_WORDS[kind]}, got {value!r}")
        self.span.check(n_layers)
        get_method(self.method)
        if not 1 <= self.k <= MAX_K:
            raise LFTError(f"k must be between 1 and {MAX_K}, got {self.k}")
        for name in ("steps", "batch", "seq_len", "windows", "heldout_windows", "distill_batch", "eval_every",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise LFTError(f"{_LABELS.get(name, name)} must be at least 1, got {getattr(self, name)}")
        if self.batch > self.windows:
            raise LFTError(f"batch ({self.batch}) cannot exceed the number of windows ({self.windows})")
        if not 0 <= self.seed <= MAX_SEED:
            raise LFTError(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed!r}")
        for name, (low, low_open, high, what) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value):
                raise LFTError(f"{_LABELS[name]} must be a finite number, got {value}")
            if value < low or (low_open and value == low) or (high is not None and value >= high):
                raise LFTError(f"{_LABELS[name]} must be {what}, got {value}")
        if self.distill_steps < 0:
            raise LFTError(f"distill steps must be 0 or more, got {self.distill_steps}")
        if self.distill_steps and self.distill_batch > self.windows:
            raise LFTError(f"distill batch ({self.distill_batch}) cannot exceed the number of windows ({self.windows})")
        for rate in ("lr", "distill_lr"):
            if getattr(self, rate) * self.weight_decay >= 1:
                raise LFTError(f"{rate} ({getattr(self, rate)}) x weight_decay ({self.weight_decay}) must be below 1: "
                               f"AdamW shrinks the weights by that share every step")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise LFTError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}")
        if not self.model.strip():
            raise LFTError("model must be named (smollm2-135m, an HF id or a folder)")
        if not self.corpus.strip():
            raise LFTError("corpus must be named (english, builtin, a file or folder, hf:NAME)")
        if self.name is not None and not NAME_RE.match(self.name):
            raise LFTError(f"flow name {self.name!r}: use letters, digits, '-', '_' or '.' (at most 80)")

    @property
    def total_steps(self) -> int:
        """Flow steps, then distillation steps."""
        return self.steps + self.distill_steps

    def resolved_sink_weight(self) -> float:
        """Position 0's loss weight: as given, or seq_len / 2 (the sink weighs as much as half the window)."""
        return float(self.sink_weight) if self.sink_weight is not None else self.seq_len / 2

    def default_name(self) -> str:
        """``<model>-<m>-<n>-<method>-k<k>-s<steps>[-wp<waypoints>][-kl<distill steps>]``, made a valid flow name
        whatever the model spec is (other characters become '_', at most 80 characters)."""
        m, n = self.span
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.model.rstrip("/")).name).lstrip("._-") or "model"
        tail = f"-{m}-{n}-{self.method}-k{self.k}-s{self.steps}"
        tail += f"-wp{self.waypoints:g}" if self.waypoints else ""
        tail += f"-kl{self.distill_steps}" if self.distill_steps else ""
        return model[: 80 - len(tail)] + tail
