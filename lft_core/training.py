"""Training a latent flow for a span [m, n): standard flow matching, Flow Walking, or the hybrid.

Data: pairs (x0, x1) = (h_m, h_n) of whole windows, shape (batch, seq_len, d), read from the activation cache
(train split) and a held-out cache (held-out split, never trained on) for NMSE during training.

Optimisation: AdamW, linear warm-up then cosine decay, gradient clipping, seeded. CUDA with bf16 autocast when
available, else CPU in float32. ``progress(event)`` gets a dict per step (step, steps, loss, lr,
tokens_per_s, eta_s, and heldout_nmse on evaluation steps); ``should_stop()`` is checked before every step.
Checkpoints (``cache/flows/<name>/``: model.safetensors + config.json, plus training_state.safetensors/.json
for resuming) are written every ``checkpoint_every`` steps and at the end, atomically, by ``store``. Every
setting is a field of ``TrainConfig``; the CLI flags and the app's job launcher are derived from it.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .activations import ensure_activations
from .corpus import SPLIT_RULE, load_corpus
from .errors import LFTError
from .field import VelocityField
from .flow import MAX_K, LatentFlow
from .losses import LOSSES, check_method, compute_loss
from .span import Span
from .store import (NAME_RE, flow_lock, flows_dir, has_training_state, load_flow, load_training_state,
                    read_flow_config, save_checkpoint)

if TYPE_CHECKING:
    from .teacher import Teacher

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
    """Everything that defines a training run. The defaults give a useful flow in minutes on 2 CPU cores."""

    model: str = setting("smollm2-135m", "smollm2-135m (embedded), an HF id or a folder")
    corpus: str = setting("builtin", "builtin, a .txt/.jsonl file or folder, hf:NAME")
    span: Span = setting(Span(6, 12), "M:N, the blocks M..N-1 to replace", required=True)
    method: str = setting("fw", "training objective", choices=METHODS)
    k: int = setting(3, "integration steps (Flow Walking walks k steps)", type=int)
    alpha: float = setting(0.1, "weight of the SFM term in hybrid")
    steps: int = setting(300, "optimiser steps", positive=True)
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
    eval_every: int = setting(50, "held-out NMSE every this many steps", positive=True)
    checkpoint_every: int = setting(100, "checkpoint every this many steps", positive=True)
    name: str | None = setting(None, "flow name (default: derived from the settings)", type=str)

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
        if self.sink_weight is not None and not (0 <= self.sink_weight < 1e6):
            raise LFTError(f"sink weight must be between 0 and 1e6, got {self.sink_weight}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise LFTError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}")
        if self.name is not None and not NAME_RE.match(self.name):
            raise LFTError(f"flow name {self.name!r}: use letters, digits, '-', '_' or '.' (at most 80)")

    def resolved_sink_weight(self) -> float:
        """Position 0's loss weight: as given, or seq_len / 2 (the sink weighs as much as half the window)."""
        return float(self.sink_weight) if self.sink_weight is not None else self.seq_len / 2

    def default_name(self) -> str:
        """``<model>-<m>-<n>-<method>-k<k>-s<steps>``, made a valid flow name whatever the model spec is
        (other characters become '_', at most 80 characters)."""
        m, n = self.span
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.model.rstrip("/")).name).lstrip("._-") or "model"
        tail = f"-{m}-{n}-{self.method}-k{self.k}-s{self.steps}"
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
class PairData:
    """Training and held-out pairs in memory, float32: x0/x1 shape (windows, seq_len, d)."""

    x0: torch.Tensor
    x1: torch.Tensor
    held_x0: torch.Tensor
    held_x1: torch.Tensor
    train_key: str
    heldout_key: str


def load_pairs(teacher: Teacher, cfg: TrainConfig, progress: bool = True) -> PairData:
    """Cache (if needed) and read h_m, h_n for the train and held-out windows of the config's corpus.

    An entry deleted between caching and reading (another session's Delete on the Setup page) is computed
    again, once; a second failure is one LFTError line."""
    m, n = cfg.span
    corpus = load_corpus(cfg.corpus)
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    for attempt in range(2):
        train = ensure_activations(teacher, corpus, cfg.seq_len, cfg.windows, [m, n], "train", progress=progress)
        held = ensure_activations(teacher, corpus, cfg.seq_len, cfg.heldout_windows, [m, n], "heldout",
                                  progress=progress)
        try:
            return PairData(f(train.layer(m)), f(train.layer(n)), f(held.layer(m)), f(held.layer(n)), train.key,
                            held.key)
        except (OSError, ValueError, LFTError) as e:
            if attempt:
                raise LFTError(f"the cached hidden states of the training data could not be read ({e})") from None
    raise AssertionError("unreachable")


def normalisation_stats(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the pooled x0 and x1 tokens, shape (d,) each (float64 accumulation)."""
    pooled = torch.cat([x0.reshape(-1, x0.shape[-1]), x1.reshape(-1, x1.shape[-1])]).double()
    return pooled.mean(0).float(), pooled.std(0).float()


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
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_nmse(flow: LatentFlow, x0: torch.Tensor, x1: torch.Tensor, k: int, batch: int = 8) -> float:
    """Mean over held-out tokens of ||x̂_1 - x1||² / ||x1||² with a k-step Euler walk (original units)."""
    from .metrics import nmse

    device = next(flow.parameters()).device
    preds = []
    for s in range(0, len(x0), batch):
        preds.append(flow(x0[s : s + batch].to(device), k=k).float().cpu())
    return float(nmse(torch.cat(preds), x1))


def train_flow(
    cfg: TrainConfig,
    teacher: Teacher | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    device: str | None = None,
    verbose: bool = True,
) -> TrainResult:
    """Train (or resume) a latent flow for ``cfg.span``; returns the result and leaves a checkpoint.

    Only one process trains a given flow name at a time (a file lock); a second gets a clear error."""
    from .loading import load_teacher

    teacher = teacher or load_teacher(cfg.model)
    cfg.validate(teacher.n_layers)
    name = cfg.name or cfg.default_name()
    with flow_lock(name, f"flow {name!r} is being trained by another job; pick another name"):
        return _train_locked(cfg, teacher, name, progress, should_stop, resume, device, verbose)


RESUME_MUST_MATCH = ("method", "k", "alpha", "lr", "batch", "seq_len", "windows", "corpus", "loss_weighting")
"""Settings a resumed run must share with its checkpoint (the span and the model are checked too)."""


def _check_resume(name: str, cfg: TrainConfig, teacher: Teacher, saved: dict) -> None:
    """LFTError naming the first setting in which ``cfg`` differs from the checkpoint it would continue."""
    if saved.get("model") != teacher.model_id or tuple(saved.get("span", ())) != cfg.span:
        raise LFTError(f"cannot resume {name}: it was trained for another model or span "
                       f"({saved.get('model')}, span {saved.get('span')})")
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != getattr(cfg, key):
            raise LFTError(f"cannot resume {name}: it was trained with {key} = {saved[key]!r}, not "
                           f"{getattr(cfg, key)!r}; resume with the same settings or train a new flow")
    done = saved.get("steps_done")
    if isinstance(done, int) and cfg.steps < done:
        raise LFTError(f"cannot resume {name} for {cfg.steps} steps: {done} are done already (ask for more)")


def _train_locked(cfg: TrainConfig, teacher: Teacher, name: str, progress, should_stop, resume: bool, device: str | None,
                  verbose: bool) -> TrainResult:
    from tqdm import tqdm

    out_dir = flows_dir() / name
    if out_dir.exists() and not resume:
        raise LFTError(f"a flow named {name!r} exists already: continue it with --resume, or delete it first "
                       f"with `python -m lft_core flows --delete {name}`")
    if resume and out_dir.exists() and not has_training_state(out_dir):
        raise LFTError(f"flow {name!r} has no training state to resume from (damaged, or saved by another tool)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    saved: dict = {}
    if resume and out_dir.exists():
        saved = read_flow_config(name)
        _check_resume(name, cfg, teacher, saved)
    data = load_pairs(teacher, cfg, progress=verbose)
    m, n = cfg.span
    start_step, history = 0, []
    if saved:
        flow, saved = load_flow(out_dir)
        history = saved.get("history", [])
    else:
        field_spec = teacher.field_spec()
        flow = LatentFlow(VelocityField(field_spec), span=cfg.span)
        if cfg.init_from_teacher:
            flow.field.init_from_block(teacher.block_weights(m))
        if cfg.normalise:
            flow.set_normalisation(*normalisation_stats(data.x0, data.x1))
    flow.to(device)
    opt = torch.optim.AdamW(flow.field.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved:
        start_step = load_training_state(out_dir, opt, gen)

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
    }

    def checkpoint(step: int, status: str) -> None:
        save_checkpoint(out_dir, flow, {**config, "steps_done": step, "status": status, "history": history}, opt,
                        step, gen)

    use_amp = device.startswith("cuda")
    tokens_per_step = cfg.batch * cfg.seq_len
    t0 = time.perf_counter()
    loss_value, stopped, step = float("nan"), False, start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.method} {m}:{n}", disable=not verbose)
    flow.train()
    for step in range(start_step, cfg.steps):
        if should_stop is not None and should_stop():
            stopped = True
            break
        step_start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(data.x0), (cfg.batch,), generator=gen)
        x0 = flow.normalise(data.x0[idx].to(device))
        x1_raw = data.x1[idx].to(device)
        x1 = flow.normalise(x1_raw)
        weight = loss_weight(flow, x1_raw, cfg.loss_weighting, cfg.resolved_sink_weight())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = compute_loss(cfg.method, flow.velocity, x0, x1, cfg.k, cfg.alpha, gen, weight=weight)
        if not torch.isfinite(loss):
            checkpoint(step, "failed")
            raise LFTError(f"training diverged at step {step} (loss {loss.item()}); try a lower learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.field.parameters(), cfg.grad_clip)
        opt.step()
        loss_value = float(loss.detach())
        elapsed = time.perf_counter() - step_start
        event = {"step": step + 1, "steps": cfg.steps, "loss": loss_value, "lr": lr,
                 "tokens_per_s": tokens_per_step / max(elapsed, 1e-9),
                 "eta_s": (time.perf_counter() - t0) / (step + 1 - start_step) * (cfg.steps - step - 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            flow.eval()
            event["heldout_nmse"] = heldout_nmse(flow, data.held_x0, data.held_x1, cfg.k)
            flow.train()
        history.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in event.items()
                        if k in ("step", "loss", "lr", "tokens_per_s", "heldout_nmse")})
        if progress is not None:
            progress(event)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1, "running")
    else:
        step = cfg.steps
    bar.close()
    flow.eval()
    nmse_value = heldout_nmse(flow, data.held_x0, data.held_x1, cfg.k)
    checkpoint(step, "stopped" if stopped else "complete")
    return TrainResult(
        name=name, dir=str(out_dir), span=cfg.span, method=cfg.method, steps=step, final_loss=loss_value,
        heldout_nmse=nmse_value, seconds=time.perf_counter() - t0, device=device, params=config["params"],
        teacher_span_params=config["teacher_span_params"], stopped=stopped, history=history,
    )
