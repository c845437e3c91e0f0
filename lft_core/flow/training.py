"""Training a latent flow for a span [m, n): standard flow matching, Flow Walking, or the hybrid.

Data: pairs (x0, x1) = (h_m, h_n) of whole windows, shape (batch, seq_len, d), streamed batch by batch from the
activation cache's memmaps (train split; ``PairSource``) and a held-out cache (held-out split, never trained
on) for NMSE during training. Which windows a step reads is ``BatchPlan``'s rule (seeded epochs).

Data-parallel: under torchrun every rank runs ``train_flow``; the global batch is split evenly over the ranks,
DistributedDataParallel averages the gradients, rank 0 alone writes; see ``distributed``.

Optimisation: AdamW, linear warm-up then cosine decay, gradient clipping, seeded. CUDA with bf16 autocast when
available, else CPU in float32. ``progress(event)`` gets a dict per step (step, steps, loss, lr,
tokens_per_s, eta_s, elapsed_s, and heldout_nmse on evaluation steps); ``should_stop()`` is checked before every step.
Checkpoints (``cache/flows/<name>/``: model.safetensors + config.json, plus training_state.safetensors/.json
for resuming) are written every ``checkpoint_every`` steps and at the end, atomically, by ``store``. Every
setting is a field of ``TrainConfig``; the CLI flags and the app's job launcher are derived from it.
"""
from __future__ import annotations

import math
import re
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lft_core.data.activations import ensure_activations
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.data.corpus import SPLIT_RULE, load_corpus
from lft_core.errors import LFTError
from lft_core.flow.field import VelocityField
from lft_core.flow.latent import MAX_K, LatentFlow
from lft_core.distributed import Dist, agree, current
from lft_core.flow.losses import LOSSES, Noise, check_method, compute_loss, draw_noise, path_loss
from lft_core.span import Span
from lft_core.flow.store import (NAME_RE, flow_lock, flows_dir, has_training_state, load_flow, load_training_state,
                    read_flow_config, save_checkpoint)

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

METHODS = tuple(LOSSES)  # "sfm", "fw", "hybrid"
MAX_SEED = 2**63 - 1  # the largest seed every RNG the engine seeds (torch, numpy) takes
LOSS_WEIGHTINGS = ("nmse", "uniform")


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A TrainConfig field: its default, the help text of its CLI flag, and how the CLI reads it (``type``,
    ``choices``, ``positive`` for integers >= 1, ``required``). The CLI parser and the app's job launcher are
    both built from these, so a setting is spelt once."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything that defines a training run. The defaults are the project's default recipe (docs/RESULTS.md
    section 1): 400 Flow Walking steps on 256 windows x 128 tokens of the everyday-English corpus, then 200 steps of
    output-level distillation; about 10 minutes for a 6-block span of the embedded model on 2 CPU cores."""

    model: str = setting("smollm2-135m", "smollm2-135m (embedded), an HF id or a folder")
    corpus: str = setting(DEFAULT_CORPUS, "english (default), builtin (Python docs), a .txt/.jsonl file or folder, "
                                          "hf:NAME")
    span: Span = setting(Span(6, 12), "M:N, the blocks M..N-1 to replace", required=True)
    method: str = setting("fw", "training objective", choices=METHODS)
    k: int = setting(3, "integration steps (Flow Walking walks k steps)", type=int)
    alpha: float = setting(0.1, "weight of the SFM term in hybrid")
    steps: int = setting(400, "flow-matching optimiser steps", positive=True)
    batch: int = setting(8, "windows per step", positive=True)
    seq_len: int = setting(128, "tokens per window", positive=True)
    windows: int = setting(256, "training windows", positive=True)
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
        self.span.check(n_layers)
        check_method(self.method)
        if not 1 <= self.k <= MAX_K:
            raise LFTError(f"k must be between 1 and {MAX_K}, got {self.k}")
        for name in ("steps", "batch", "seq_len", "windows", "heldout_windows"):
            if getattr(self, name) < 1:
                raise LFTError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch > self.windows:
            raise LFTError(f"batch ({self.batch}) cannot exceed the number of windows ({self.windows})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise LFTError(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LFTError(f"learning rate must be positive, got {self.lr}")
        if not (0 <= self.waypoints < 1e6):
            raise LFTError(f"the waypoint weight must be between 0 and 1e6, got {self.waypoints}")
        if self.distill_steps < 0:
            raise LFTError(f"distill steps must be 0 or more, got {self.distill_steps}")
        if not (self.distill_lr > 0 and math.isfinite(self.distill_lr)):
            raise LFTError(f"distillation learning rate must be positive, got {self.distill_lr}")
        if self.distill_batch < 1:
            raise LFTError(f"distill batch must be at least 1, got {self.distill_batch}")
        if self.distill_steps and self.distill_batch > self.windows:
            raise LFTError(f"distill batch ({self.distill_batch}) cannot exceed the number of windows ({self.windows})")
        if self.sink_weight is not None and not (0 <= self.sink_weight < 1e6):
            raise LFTError(f"sink weight must be between 0 and 1e6, got {self.sink_weight}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise LFTError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}")
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


@dataclass
class TrainResult:
    name: str
    dir: str
    span: Span
    method: str
    steps: int
    final_loss: float
    heldout_nmse: float
    seconds: float
    device: str
    params: int
    teacher_span_params: int
    stopped: bool = False
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["span"] = list(self.span)
        d.pop("history")
        return d


@dataclass
class PairSource:
    """Training and held-out pairs (x0, x1) = (h_m, h_n), read batch by batch from the activation cache's
    float16 memmaps (shape (windows, seq_len, d)), so a run over any number of tokens holds one batch in RAM,
    not the data. ``in_memory()`` gives the same pairs loaded whole (the old way, kept for the benchmark)."""

    x0: np.ndarray
    x1: np.ndarray
    held_x0: np.ndarray
    held_x1: np.ndarray
    train_key: str
    heldout_key: str
    between: tuple[np.ndarray, ...] = ()
    """The teacher path's inner states h_{m+1} … h_{n−1} of the training windows (only for the waypoint term)."""
    tokens: np.ndarray | None = None
    """Token ids of the training windows, (windows, seq_len) (only for distillation)."""

    @property
    def windows(self) -> int:
        return len(self.x0)

    def _rows(self, arrays: Sequence[np.ndarray], index: np.ndarray, dtype=np.float32) -> list[torch.Tensor]:
        order = np.argsort(index, kind="stable")  # read the file forwards; give the rows back in asked order
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        rows = np.asarray(index)[order]
        return [torch.from_numpy(np.asarray(a[rows], dtype=dtype)[inverse]) for a in arrays]

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x0, x1 of the windows ``index`` (in that order), float32 tensors of shape (len(index), seq_len, d)."""
        x0, x1 = self._rows((self.x0, self.x1), index)
        return x0, x1

    def path(self, index: np.ndarray) -> torch.Tensor:
        """The teacher path h_m, h_{m+1}, …, h_n of the windows ``index``: shape (n−m+1, len(index), seq_len, d)."""
        return torch.stack(self._rows((self.x0, *self.between, self.x1), index))

    def token_ids(self, index: np.ndarray) -> torch.Tensor:
        """Token ids of the windows ``index``, int64, shape (len(index), seq_len)."""
        assert self.tokens is not None, "these pairs were opened without their tokens"
        return self._rows((self.tokens,), index, np.int64)[0]

    def in_memory(self) -> PairSource:
        """Every pair read into RAM as float32 (what training did before it streamed)."""
        f = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        return PairSource(f(self.x0), f(self.x1), f(self.held_x0), f(self.held_x1), self.train_key, self.heldout_key,
                          tuple(f(a) for a in self.between),
                          None if self.tokens is None else np.asarray(self.tokens))


def load_pairs(teacher: Teacher, cfg: TrainConfig, progress: bool = True) -> PairSource:
    """Cache (if needed) and open h_m, h_n of the train and held-out windows of the config's corpus as memmaps.

    Under torchrun the caching itself is split across ranks (``activations.ensure_activations``). An entry
    deleted between caching and reading (another session's Delete on the Setup page) is computed again,
    once; a second failure is one LFTError line."""
    m, n = cfg.span
    corpus = load_corpus(cfg.corpus)
    inner = list(range(m + 1, n)) if cfg.waypoints > 0 else []
    for attempt in range(2):
        train = ensure_activations(teacher, corpus, cfg.seq_len, cfg.windows, [m, *inner, n], "train",
                                   progress=progress)
        held = ensure_activations(teacher, corpus, cfg.seq_len, cfg.heldout_windows, [m, n], "heldout",
                                  progress=progress)
        try:
            return PairSource(train.layer(m), train.layer(n), held.layer(m), held.layer(n), train.key, held.key,
                              tuple(train.layer(i) for i in inner), train.tokens)
        except (OSError, ValueError, LFTError) as e:
            if attempt:
                raise LFTError(f"the cached hidden states of the training data could not be read ({e})") from None
    raise AssertionError("unreachable")


STATS_CHUNK_TOKENS = 16384  # tokens per chunk of the streamed normalisation statistics


def normalisation_stats(x0, x1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (unbiased) of the pooled x0 and x1 tokens, shape (d,) each.

    x0, x1: arrays or memmaps of shape (windows, seq_len, d), read a chunk of windows at a time and combined
    in float64 (Chan et al.'s pairwise update), so the data never has to fit in memory."""
    d = x0.shape[-1]
    count, mean, m2 = 0, np.zeros(d), np.zeros(d)
    rows = max(1, STATS_CHUNK_TOKENS // max(1, int(np.prod(x0.shape[1:-1]))))
    for a in (x0, x1):
        for s in range(0, len(a), rows):
            chunk = np.asarray(a[s : s + rows], dtype=np.float64).reshape(-1, d)
            c_mean = chunk.mean(0)
            c_m2 = ((chunk - c_mean) ** 2).sum(0)
            c = len(chunk)
            delta = c_mean - mean
            total = count + c
            mean = mean + delta * (c / total)
            m2 = m2 + c_m2 + delta**2 * (count * c / total)
            count = total
    std = np.sqrt(m2 / max(1, count - 1))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


class BatchPlan:
    """Which windows each optimiser step reads: epochs of a seeded permutation, cut into global batches.

    Epoch e is ``permutation(windows)`` seeded by (seed, e); step s reads the global batch at positions
    [j·B, (j+1)·B) of its epoch (j = s mod steps-per-epoch, B = the global batch; a remainder of fewer than
    B windows waits for a later epoch). Data-parallel rank r of W takes the positions r, r+W, r+2W, … of that
    batch, so over an epoch its shard is ``perm[r::W]``: deterministic, disjoint from the other ranks', and
    together they cover the batch a single process would read. The same seed therefore trains the same
    flow at any world size (up to float rounding in the averaged gradients)."""

    def __init__(self, windows: int, batch: int, seed: int):
        self.windows, self.batch, self.seed = windows, batch, seed
        self.per_epoch = max(1, windows // batch)
        self._epoch, self._perm = -1, np.arange(0)

    def global_batch(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows)
        return self._perm[j * self.batch : (j + 1) * self.batch]

    @staticmethod
    def positions(rank: int, world: int, batch: int) -> slice:
        """The rows of a global batch that rank ``rank`` of ``world`` trains on."""
        return slice(rank, batch, world)


def loss_weight(flow: LatentFlow, x1_raw: torch.Tensor, how: str, sink_weight: float = 1.0) -> torch.Tensor | None:
    """Weights that turn the normalised-space squared error into the NMSE of the original units.

    The flow works on x = (h − mu) / sigma, so an error e in normalised units is sigma·e in the residual
    stream. ``nmse`` weights dimension j by sigma_j² · d / ||x1||² per token, making the Flow Walking loss
    exactly mean over tokens of ||x̂_1 − x1||² / ||x1||² (the held-out metric) and SFM's the same relative
    error of the velocity. Without it, the few huge dimensions of the residual stream are under-weighted by
    the per-dimension normalisation and the end point drifts in exactly the directions that matter.

    ``sink_weight`` multiplies position 0. The first token of a window becomes the attention sink: between
    layers 6 and 12 of SmolLM2 its norm grows ~25x (to ~2.4e4), and with equal weight the flow leaves it at
    95% relative error, which alone doubles the spliced model's KL (measured: 0.76 -> 0.36 when only the
    sink is made exact). Weight 64 (= seq_len / 2 for 128-token windows, the default rule) brings its error
    to ~5% at no visible cost to the other tokens. A fixed 64 on 32-token windows made Flow Walking diverge
    (held-out NMSE 0.38 -> 46 within 60 steps) while 16 (= 32 / 2) trained normally, hence the rule.
    Shape (batch, seq, d); None for ``uniform`` with no sink weight.
    """
    if how == "uniform" and sink_weight == 1.0:
        return None
    d = x1_raw.shape[-1]
    if how == "uniform":
        per_token = torch.ones_like(x1_raw[..., :1])
        weight = per_token.expand_as(x1_raw).clone()
    else:
        per_token = d / x1_raw.float().pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        weight = flow.sigma.pow(2) * per_token
    if sink_weight != 1.0:
        weight[:, :1] = weight[:, :1] * sink_weight
    return weight


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 10% of the peak; the distillation
    steps that follow get the same shape of schedule of their own, peaking at ``distill_lr``."""
    if step >= cfg.steps:
        return _warm_cosine(step - cfg.steps, cfg.distill_steps, cfg.distill_lr, cfg.warmup)
    return _warm_cosine(step, cfg.steps, cfg.lr, cfg.warmup)


def _warm_cosine(step: int, steps: int, peak: float, warmup: float) -> float:
    warm = max(1, int(warmup * steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_nmse(flow: LatentFlow, x0, x1, k: int, batch: int = 8) -> float:
    """Mean over held-out tokens of ||x̂_1 - x1||² / ||x1||² with a k-step Euler walk (original units).

    x0, x1: arrays, memmaps or tensors of shape (windows, seq_len, d), read ``batch`` windows at a time."""
    from lft_core.analysis.metrics import nmse

    device = next(flow.parameters()).device
    preds, targets = [], []
    for s in range(0, len(x0), batch):
        h = torch.as_tensor(np.asarray(x0[s : s + batch], dtype=np.float32))
        preds.append(flow(h.to(device), k=k).float().cpu())
        targets.append(torch.as_tensor(np.asarray(x1[s : s + batch], dtype=np.float32)))
    return float(nmse(torch.cat(preds), torch.cat(targets)))


class Objective(nn.Module):
    """The loss of one optimiser step as a module, so that ``DistributedDataParallel`` can wrap it: its forward
    runs every evaluation of the flow the step needs (Flow Walking's k of them too) and returns the scalar loss.

    ``forward("flow", x0, x1, weight, walk, t, path, path_t)``: the method's loss on normalised pairs, plus
    ``waypoints`` × the teacher-path term when ``path`` (h_m … h_n, normalised) is given.
    ``forward("distill", ids, h_m, h_n)``: output-level distillation, mean over tokens of
    KL(P_teacher ‖ P_spliced); the spliced model runs ``flow(h_m, k)`` into blocks [n, L) and the LM head
    (``Teacher.logits_from_state``), the teacher's own distribution comes from the cached h_n through the
    same blocks. Only the flow learns (the teacher is a plain attribute, not a sub-module)."""

    def __init__(self, flow: LatentFlow, cfg: TrainConfig, teacher: Teacher | None = None):
        super().__init__()
        self.flow, self.method, self.k, self.alpha, self.waypoints = flow, cfg.method, cfg.k, cfg.alpha, cfg.waypoints
        self.teacher = teacher

    def forward(self, stage: str, *args: torch.Tensor | None) -> torch.Tensor:
        return self.flow_loss(*args) if stage == "flow" else self.distill_loss(*args)

    def flow_loss(self, x0: torch.Tensor, x1: torch.Tensor, weight: torch.Tensor | None, walk: torch.Tensor | None,
                  t: torch.Tensor | None, path: torch.Tensor | None = None, path_t: torch.Tensor | None = None
                  ) -> torch.Tensor:
        loss = compute_loss(self.method, self.flow.velocity, x0, x1, self.k, self.alpha, weight=weight,
                            noise=Noise(walk, t))
        if path is not None:
            loss = loss + self.waypoints * path_loss(self.flow.velocity, path, t=path_t, weight=weight)
        return loss

    def distill_loss(self, ids: torch.Tensor, h_m: torch.Tensor, h_n: torch.Tensor) -> torch.Tensor:
        from lft_core.analysis.metrics import kl_per_token

        assert self.teacher is not None, "distillation needs the teacher"
        n = self.flow.span.n
        with torch.no_grad():
            target = self.teacher.logits_from_state(ids, h_n, n)
        spliced = self.teacher.logits_from_state(ids, self.flow(h_m, k=self.k), n)
        return kl_per_token(target, spliced).mean()


def train_flow(
    cfg: TrainConfig,
    teacher: Teacher | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    device: str | None = None,
    verbose: bool = True,
    data: PairSource | None = None,
) -> TrainResult:
    """Train (or resume) a latent flow for ``cfg.span``; returns the result and leaves a checkpoint.

    ``data``: the pairs to train on (default: ``load_pairs``, the config's corpus through the cache).

    Only one process trains a given flow name at a time (a file lock); a second gets a clear error. Under
    torchrun (``distributed.init_from_env``) every rank calls this: the global batch ``cfg.batch`` is split
    evenly over the ranks (``BatchPlan``), gradients are averaged by DistributedDataParallel, and rank 0 alone
    holds the lock and writes checkpoints and progress; ``resume`` continues a checkpoint at any world size."""
    from lft_core.model.loading import load_teacher

    dist = current()
    teacher = teacher or load_teacher(cfg.model)
    cfg.validate(teacher.n_layers)
    for what, size in (("global batch", cfg.batch), ("distill batch", cfg.distill_batch if cfg.distill_steps else 0)):
        if size % dist.world:
            raise LFTError(f"the {what} ({size}) must be a multiple of the number of ranks ({dist.world})")
    name = cfg.name or cfg.default_name()
    with ExitStack() as held:
        def preflight() -> None:  # rank 0 checks; every rank gets its verdict
            held.enter_context(flow_lock(name, f"flow {name!r} is being trained by another job; pick another name"))
            _check_name(name, cfg, teacher, resume)

        agree(preflight, dist)
        return _train_locked(cfg, teacher, name, progress, should_stop, resume, device, verbose, dist, data)


RESUME_MUST_MATCH = ("method", "k", "alpha", "lr", "batch", "seq_len", "windows", "corpus", "loss_weighting",
                     "waypoints")
"""Settings a resumed run must share with its checkpoint (the span and the model are checked too). ``batch`` is
the global batch, so a run can be resumed with another number of ranks."""
DISTILL_SETTINGS = ("distill_steps", "distill_lr", "distill_batch")
"""Settings that must match only once a run has started distilling: a finished flow can be resumed with
distillation steps added (its flow steps and their schedule do not depend on them)."""


def _check_name(name: str, cfg: TrainConfig, teacher: Teacher, resume: bool) -> None:
    """LFTError unless training ``name`` may start (a new name) or continue (``resume`` of a matching run)."""
    out_dir = flows_dir() / name
    if out_dir.exists() and not resume:
        raise LFTError(f"a flow named {name!r} exists already: continue it with --resume, or delete it first "
                       f"with `python -m lft_core flows --delete {name}`")
    if resume and out_dir.exists():
        if not has_training_state(out_dir):
            raise LFTError(f"flow {name!r} has no training state to resume from (damaged, or saved by another tool)")
        _check_resume(name, cfg, teacher, read_flow_config(name))


def _check_resume(name: str, cfg: TrainConfig, teacher: Teacher, saved: dict) -> None:
    """LFTError naming the first setting in which ``cfg`` differs from the checkpoint it would continue."""
    if saved.get("model") != teacher.model_id or tuple(saved.get("span", ())) != cfg.span:
        raise LFTError(f"cannot resume {name}: it was trained for another model or span "
                       f"({saved.get('model')}, span {saved.get('span')})")
    done = saved.get("steps_done")
    distilling = isinstance(done, int) and done > saved.get("steps", done)
    for key in RESUME_MUST_MATCH + (("steps", *DISTILL_SETTINGS) if distilling else ()):
        if key in saved and saved[key] != getattr(cfg, key):
            raise LFTError(f"cannot resume {name}: it was trained with {key} = {saved[key]!r}, not "
                           f"{getattr(cfg, key)!r}; resume with the same settings or train a new flow")
    if isinstance(done, int) and cfg.total_steps < done:
        raise LFTError(f"cannot resume {name} for {cfg.total_steps} steps: {done} are done already (ask for more)")


def _train_locked(cfg: TrainConfig, teacher: Teacher, name: str, progress, should_stop, resume: bool, device: str | None,
                  verbose: bool, dist: Dist, data: PairSource | None) -> TrainResult:
    from tqdm import tqdm

    out_dir = flows_dir() / name
    device = device or dist.device()
    verbose = verbose and dist.main
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # the random times; the same stream on every rank

    resuming = resume and out_dir.exists()
    data = data or load_pairs(teacher, cfg, progress=verbose)
    m, n = cfg.span
    start_step, history = 0, []
    if resuming:
        flow, saved = load_flow(out_dir)
        history = saved.get("history", [])
    else:
        field_spec = teacher.field_spec()
        flow = LatentFlow(VelocityField(field_spec), span=cfg.span)
        if cfg.init_from_teacher:
            flow.field.init_from_block(teacher.block_weights(m))
        if cfg.normalise:  # computed once, on rank 0, and sent to the others
            stats = agree(lambda: tuple(t.tolist() for t in normalisation_stats(data.x0, data.x1)), dist)
            flow.set_normalisation(*(torch.tensor(v) for v in stats))
    flow.to(device)
    opt = torch.optim.AdamW(flow.field.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resuming:
        start_step = load_training_state(out_dir, opt, gen)
    objective: nn.Module = Objective(flow, cfg, teacher)
    if dist.active:
        objective = DistributedDataParallel(objective, device_ids=[device] if device.startswith("cuda") else None)

    config = {
        **{k: v for k, v in asdict(cfg).items() if k != "name"},
        "span": [m, n],
        "name": name,
        "model": teacher.model_id,
        "weights_hash": teacher.weights_hash,
        "n_layers": teacher.n_layers,
        "data_key": data.train_key,
        "heldout_key": data.heldout_key,
        "split_rule": SPLIT_RULE,
        "teacher_span_params": teacher.span_params(m, n),
        "params": sum(p.numel() for p in flow.field.parameters()),
        "world_size": dist.world,
        "global_batch": cfg.batch,
        "batch_plan": "epochs of permutation(windows) seeded by (seed, epoch); rank r of W takes rows r::W",
    }

    def checkpoint(step: int, status: str) -> None:
        if dist.main:
            save_checkpoint(out_dir, flow, {**config, "steps_done": step, "status": status, "history": history}, opt,
                            step, gen)

    plan = BatchPlan(data.windows, cfg.batch, cfg.seed)
    distill_plan = BatchPlan(data.windows, cfg.distill_batch, cfg.seed)
    use_path = cfg.waypoints > 0
    use_amp = device.startswith("cuda")
    total = cfg.total_steps

    def step_loss(step: int) -> torch.Tensor:
        """This rank's loss of ``step``: a flow step, or (after ``cfg.steps``) a distillation step."""
        if step >= cfg.steps:
            index = distill_plan.global_batch(step - cfg.steps)[BatchPlan.positions(dist.rank, dist.world,
                                                                                   cfg.distill_batch)]
            h_m, h_n = data.batch(index)
            return objective("distill", data.token_ids(index).to(device), h_m.to(device), h_n.to(device))
        mine = BatchPlan.positions(dist.rank, dist.world, cfg.batch)
        noise = draw_noise(cfg.method, cfg.batch, cfg.k, gen, path=use_path).rows(mine)  # for the global batch
        index = plan.global_batch(step)[mine]
        if use_path:
            raw = data.path(index).to(device)
            x0_raw, x1_raw, path = raw[0], raw[-1], flow.normalise(raw)
        else:
            x0_raw, x1_raw = (a.to(device) for a in data.batch(index))
            path = None
        weight = loss_weight(flow, x1_raw, cfg.loss_weighting, cfg.resolved_sink_weight())
        return objective("flow", flow.normalise(x0_raw), flow.normalise(x1_raw), weight, noise.walk, noise.t, path,
                         noise.path)

    t0 = time.perf_counter()
    elapsed0 = float(history[-1].get("elapsed_s", 0.0)) if history else 0.0  # wall time of earlier runs (resume)
    loss_value, stopped, step = float("nan"), False, start_step
    bar = tqdm(total=total, initial=start_step, desc=f"{cfg.method} {m}:{n}", disable=not verbose)
    flow.train()
    for step in range(start_step, total):
        if dist.any(should_stop is not None and dist.main and bool(should_stop())):
            stopped = True
            break
        step_start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = step_loss(step)
        global_loss = dist.mean(float(loss.detach()))
        if not math.isfinite(global_loss):
            checkpoint(step, "failed")
            raise LFTError(f"training diverged at step {step} (loss {global_loss}); try a lower learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients arrive averaged over the ranks
        torch.nn.utils.clip_grad_norm_(flow.field.parameters(), cfg.grad_clip)
        opt.step()
        loss_value = global_loss
        elapsed = time.perf_counter() - step_start
        stage = "flow" if step < cfg.steps else "distill"
        tokens = (cfg.batch if stage == "flow" else cfg.distill_batch) * cfg.seq_len
        event = {"step": step + 1, "steps": total, "stage": stage, "loss": loss_value, "lr": lr,
                 "tokens_per_s": tokens / max(elapsed, 1e-9),
                 "eta_s": (time.perf_counter() - t0) / (step + 1 - start_step) * (total - step - 1)}
        if dist.main and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
            flow.eval()
            event["heldout_nmse"] = heldout_nmse(flow, data.held_x0, data.held_x1, cfg.k)
            flow.train()
        event["elapsed_s"] = elapsed0 + time.perf_counter() - t0  # training wall time so far (compare at equal time)
        history.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in event.items()
                        if k in ("step", "loss", "lr", "tokens_per_s", "heldout_nmse", "elapsed_s")
                        or (k == "stage" and v != "flow")})
        if progress is not None and dist.main:
            progress(event)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", stage=stage)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            checkpoint(step + 1, "running")
    else:
        step = total
    bar.close()
    flow.eval()
    nmse_value = agree(lambda: heldout_nmse(flow, data.held_x0, data.held_x1, cfg.k), dist)
    if history and history[-1].get("heldout_nmse") is None:  # stopped between evaluations: keep the last NMSE
        history[-1]["heldout_nmse"] = round(nmse_value, 6)
    checkpoint(step, "stopped" if stopped else "complete")
    dist.barrier()  # no rank reports the run done before rank 0's checkpoint is written
    return TrainResult(
        name=name, dir=str(out_dir), span=cfg.span, method=cfg.method, steps=step, final_loss=loss_value,
        heldout_nmse=nmse_value, seconds=time.perf_counter() - t0, device=device, params=config["params"],
        teacher_span_params=config["teacher_span_params"], stopped=stopped, history=history,
    )
