"""Training a latent flow for a span [m, n) with any training method of ``methods`` (SFM, Flow Walking, hybrid,
…), then optionally output-level distillation; the settings are ``config.TrainConfig``.

Read top to bottom: ``train_flow`` (lock, checks) -> ``set_up`` (seed, pairs, flow, optimiser, objective) ->
``train_loop``, whose step is ``flow_step_inputs`` or ``distill_step_inputs`` -> ``optimiser_step`` ->
``checkpoint``. DDP wraps the ``Objective`` and AMP wraps its call; neither appears anywhere else.

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
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lft_core.data.corpus import split_rule_of
from lft_core.distributed import Dist, agree, current
from lft_core.errors import LFTError
from lft_core.flow.config import TrainConfig
from lft_core.flow.field import VelocityField
from lft_core.flow.latent import LatentFlow
from lft_core.flow.losses import Noise, path_loss
from lft_core.flow.methods import draw_noise, get_method
from lft_core.flow.pairs import BatchPlan, PairSource, load_pairs, normalisation_stats
from lft_core.flow.store import (flow_lock, flows_dir, has_training_state, load_flow, load_training_state,
                                 read_flow_config, save_checkpoint)
from lft_core.span import Span

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher


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

    ``forward("flow", x0, x1, weight, walk, t, path, path_t)``: the method's loss (``methods.get_method``) on
    normalised pairs with the random times ``walk`` / ``t`` (``losses.Noise``), plus ``waypoints`` × the
    teacher-path term at times ``path_t`` when ``path`` (h_m … h_n, normalised) is given.
    ``forward("distill", ids, h_m, h_n)``: output-level distillation, mean over tokens of
    KL(P_teacher ‖ P_spliced); the spliced model runs ``flow(h_m, k)`` into blocks [n, L) and the LM head
    (``Teacher.logits_from_state``), the teacher's own distribution comes from the cached h_n through the
    same blocks. Only the flow learns (the teacher is a plain attribute, not a sub-module)."""

    def __init__(self, flow: LatentFlow, cfg: TrainConfig, teacher: Teacher | None = None):
        super().__init__()
        self.flow, self.method, self.cfg, self.teacher = flow, get_method(cfg.method), cfg, teacher

    def forward(self, stage: str, *args: Any) -> torch.Tensor:
        return self.flow_loss(*args) if stage == "flow" else self.distill_loss(*args)

    def flow_loss(self, x0: torch.Tensor, x1: torch.Tensor, weight: torch.Tensor | None, walk: torch.Tensor | None,
                  t: torch.Tensor | None, path: torch.Tensor | None = None, path_t: torch.Tensor | None = None
                  ) -> torch.Tensor:
        velocity = self.flow.velocity
        loss = self.method.loss(velocity, x0, x1, Noise(walk, t), k=self.cfg.k, alpha=self.cfg.alpha, weight=weight)
        if path is not None:
            loss = loss + self.cfg.waypoints * path_loss(velocity, path, t=path_t, weight=weight)
        return loss

    def distill_loss(self, ids: torch.Tensor, h_m: torch.Tensor, h_n: torch.Tensor) -> torch.Tensor:
        from lft_core.analysis.metrics import kl_per_token

        assert self.teacher is not None, "distillation needs the teacher"
        n = self.flow.span.n
        with torch.no_grad():
            target = self.teacher.logits_from_state(ids, h_n, n)
        spliced = self.teacher.logits_from_state(ids, self.flow(h_m, k=self.cfg.k), n)
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
    cfg.validate()  # every setting, as a whole, before any model loads
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
        run = set_up(cfg, teacher, name, resume, device, dist, data, verbose and dist.main)
        return train_loop(run, progress, should_stop)


RESUME_MUST_MATCH = ("method", "k", "alpha", "lr", "batch", "seq_len", "windows", "corpus", "loss_weighting",
                     "waypoints", "seed", "weight_decay", "grad_clip", "warmup", "heldout_windows",
                     "init_from_teacher", "normalise", "sink_weight")
"""Settings a resumed run must share with its checkpoint (the span and the model are checked too): each one
changes what the steps already taken meant (their data, batches, times, updates, initialisation, loss or the
held-out NMSE in the history), so continuing with another value would leave a record claiming settings those
steps did not run with. ``batch`` is the global batch, so a run can be resumed with another number of ranks;
``sink_weight`` is compared as resolved (unset = seq_len / 2). Free to change: ``steps`` (more steps continue the
run; each step's learning rate is in the history), ``eval_every`` and ``checkpoint_every`` (when the held-out
NMSE is measured and checkpoints are written: they never change the weights; the record keeps the latest and the
history shows where evaluations happened), ``name`` and ``sweep`` (labels)."""
DISTILL_SETTINGS = ("distill_lr", "distill_batch")
"""Settings that must match only once a run has started distilling (with ``steps``: flow steps cannot be added
after distillation began). ``distill_steps`` is free like ``steps``: a finished flow, distilled or not, is trained
further by resuming with more distillation steps (each step's learning rate is in the history)."""


def more_steps(saved: dict, more: int) -> dict:
    """A saved flow's config with ``more`` steps to train when resumed: flow steps while it has not begun
    distilling, else distillation steps (flow steps cannot follow distillation: ``_check_resume_settings``)."""
    if more <= 0:
        return dict(saved)
    steps, done = int(saved.get("steps") or 0), int(saved.get("steps_done") or 0)
    if done > steps:
        return {**saved, "distill_steps": int(saved.get("distill_steps") or 0) + more}
    return {**saved, "steps": steps + more}


def check_before_loading(cfg: TrainConfig, resume: bool = False) -> None:
    """What the CLI checks before it loads a model: a taken name without ``resume``, every setting
    (``TrainConfig.validate``), and with ``resume`` that the settings match the checkpoint's. ``train_flow``
    checks all of it again, under the flow's lock, with the model."""
    from lft_core.flow.store import NAME_RE

    name = cfg.name or cfg.default_name()
    if NAME_RE.match(name) and (flows_dir() / name).exists() and not resume:
        _check_name(name, cfg, None, resume)
    cfg.validate()
    if resume and NAME_RE.match(name) and (flows_dir() / name).exists():
        _check_resume_settings(name, cfg, read_flow_config(name))


def _check_name(name: str, cfg: TrainConfig, teacher: Teacher | None, resume: bool) -> None:
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
    _check_resume_settings(name, cfg, saved)


def _resolved(saved: dict, key: str) -> Any:
    if key == "sink_weight":  # unset means seq_len / 2
        value = saved.get(key)
        return float(value) if value is not None else saved.get("seq_len", 0) / 2
    return saved[key]


def _check_resume_settings(name: str, cfg: TrainConfig, saved: dict) -> None:
    """The settings part of ``_check_resume`` (needs no model)."""
    done = saved.get("steps_done")
    distilling = isinstance(done, int) and done > saved.get("steps", done)
    mine = {**{f: getattr(cfg, f) for f in RESUME_MUST_MATCH + ("steps", *DISTILL_SETTINGS)},
            "sink_weight": cfg.resolved_sink_weight()}
    for key in RESUME_MUST_MATCH + (("steps", *DISTILL_SETTINGS) if distilling else ()):
        if key not in saved:
            continue
        then = _resolved(saved, key)
        if then != mine[key] or type(then) is bool and then is not mine[key]:
            raise LFTError(f"cannot resume {name}: it was trained with {key} = {then!r}, not "
                           f"{mine[key]!r}; resume with the same settings or train a new flow")
    if isinstance(done, int) and cfg.total_steps < done:
        raise LFTError(f"cannot resume {name} for {cfg.total_steps} steps: {done} are done already (ask for more)")


# ---------------------------------------------------------------------------------------------------------
# The run, top to bottom: set-up, a flow step's inputs, a distillation step's inputs, one optimiser step,
# checkpoints, and the loop that strings them together.


@dataclass
class Run:
    """What one training run holds once set up: the config, the flow's name and folder, the teacher, the pairs,
    the flow with its optimiser and its stream of random times (``gen``, the same on every rank), the step
    ``objective`` (DistributedDataParallel-wrapped under torchrun), the record saved as config.json with every
    checkpoint, the progress history (earlier runs' too when resuming) and the first step to run."""

    cfg: TrainConfig
    name: str
    out_dir: Path
    teacher: Teacher
    data: PairSource
    flow: LatentFlow
    opt: torch.optim.Optimizer
    gen: torch.Generator
    objective: nn.Module
    record: dict
    dist: Dist
    device: str
    verbose: bool
    history: list[dict]
    start_step: int
    plans: dict[str, BatchPlan]


def set_up(cfg: TrainConfig, teacher: Teacher, name: str, resume: bool, device: str | None, dist: Dist,
           data: PairSource | None, verbose: bool) -> Run:
    """Seed, open the pairs, build the flow (or load the checkpoint to resume), the optimiser and the objective."""
    out_dir = flows_dir() / name
    device = device or dist.device()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # the random times; the same stream on every rank
    resuming = resume and out_dir.exists()
    data = data or load_pairs(teacher, cfg, progress=verbose)
    history: list[dict] = []
    if resuming:
        flow, saved = load_flow(out_dir)
        history = saved.get("history", [])
    else:
        flow = new_flow(cfg, teacher, data, dist)
    flow.to(device)
    opt = torch.optim.AdamW(flow.field.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = load_training_state(out_dir, opt, gen) if resuming else 0
    objective: nn.Module = Objective(flow, cfg, teacher)
    if dist.active:
        objective = DistributedDataParallel(objective, device_ids=[device] if device.startswith("cuda") else None)
    plans = {"flow": BatchPlan(data.windows, cfg.batch, cfg.seed),
             "distill": BatchPlan(data.windows, cfg.distill_batch, cfg.seed)}
    return Run(cfg, name, out_dir, teacher, data, flow, opt, gen, objective, flow_record(cfg, name, teacher, data, flow,
               dist, device), dist, device, verbose, history, start_step, plans)


def new_flow(cfg: TrainConfig, teacher: Teacher, data: PairSource, dist: Dist) -> LatentFlow:
    """A fresh flow for the span: the teacher's field shape, optionally block m's weights, and the pairs'
    per-dimension standardisation (computed once, on rank 0, and sent to the others)."""
    flow = LatentFlow(VelocityField(teacher.field_spec()), span=cfg.span)
    if cfg.init_from_teacher:
        flow.field.init_from_block(teacher.block_weights(cfg.span.m))
    if cfg.normalise:
        stats = agree(lambda: tuple(t.tolist() for t in normalisation_stats(data.x0, data.x1)), dist)
        flow.set_normalisation(*(torch.tensor(v) for v in stats))
    return flow


def flow_record(cfg: TrainConfig, name: str, teacher: Teacher, data: PairSource, flow: LatentFlow, dist: Dist,
                device: str = "cpu") -> dict:
    """The flow's config.json: every setting, and what the weights were trained for and on (the device of the
    latest run: ``distributed.device_label``)."""
    from lft_core.distributed import device_label

    return {
        **{k: v for k, v in asdict(cfg).items() if k != "name"},
        "span": list(cfg.span),
        "name": name,
        "model": teacher.model_id,
        "weights_hash": teacher.weights_hash,
        "n_layers": teacher.n_layers,
        "data_key": data.train_key,
        "heldout_key": data.heldout_key,
        "split_rule": split_rule_of(cfg.corpus),
        "teacher_span_params": teacher.span_params(*cfg.span),
        "params": sum(p.numel() for p in flow.field.parameters()),
        "world_size": dist.world,
        "device": device_label(device),
        "global_batch": cfg.batch,
        "batch_plan": "epochs of permutation(windows) seeded by (seed, epoch); rank r of W takes rows r::W",
    }


def flow_step_inputs(run: Run, step: int) -> tuple:
    """This rank's share of flow step ``step``: normalised x0, x1 (and the teacher path with waypoints), the loss
    weights, and the method's random times, drawn for the whole global batch so every world size trains alike."""
    cfg, flow, dist = run.cfg, run.flow, run.dist
    use_path = cfg.waypoints > 0
    mine = BatchPlan.positions(dist.rank, dist.world, cfg.batch)
    noise = draw_noise(cfg.method, cfg.batch, cfg.k, run.gen, path=use_path).rows(mine)
    index = run.plans["flow"].global_batch(step)[mine]
    path = None
    if use_path:
        raw = run.data.path(index).to(run.device)
        x0_raw, x1_raw, path = raw[0], raw[-1], flow.normalise(raw)
    else:
        x0_raw, x1_raw = (a.to(run.device) for a in run.data.batch(index))
    weight = loss_weight(flow, x1_raw, cfg.loss_weighting, cfg.resolved_sink_weight())
    return flow.normalise(x0_raw), flow.normalise(x1_raw), weight, noise.walk, noise.t, path, noise.path


def distill_step_inputs(run: Run, step: int) -> tuple:
    """This rank's share of distillation step ``step`` (counted from the first distillation step): token ids,
    h_m and h_n of its windows."""
    cfg, dist = run.cfg, run.dist
    index = run.plans["distill"].global_batch(step)[BatchPlan.positions(dist.rank, dist.world, cfg.distill_batch)]
    h_m, h_n = run.data.batch(index)
    return run.data.token_ids(index).to(run.device), h_m.to(run.device), h_n.to(run.device)


def optimiser_step(run: Run, stage: str, inputs: tuple, lr: float) -> float:
    """One step of AdamW on the loss of ``stage`` ("flow" / "distill") at learning rate ``lr``: bf16 autocast on
    CUDA, gradients averaged over the ranks by DDP, clipped. Returns the loss averaged over the ranks; a
    non-finite loss saves a "failed" checkpoint and is an LFTError."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.startswith("cuda")):
        loss = run.objective(stage, *inputs)
    value = run.dist.mean(float(loss.detach()))
    if not math.isfinite(value):
        raise _Diverged(value)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.flow.field.parameters(), run.cfg.grad_clip)
    run.opt.step()
    return value


class _Diverged(Exception):
    def __init__(self, loss: float):
        self.loss = loss


def checkpoint(run: Run, step: int, status: str) -> None:
    """Rank 0 saves the flow, its record (with ``steps_done``, ``status`` and the history) and the training state."""
    if run.dist.main:
        save_checkpoint(run.out_dir, run.flow, {**run.record, "steps_done": step, "status": status,
                                                "history": run.history}, run.opt, step, run.gen)


HISTORY_FIELDS = ("step", "loss", "lr", "tokens_per_s", "heldout_nmse", "elapsed_s")


def step_timing_op(cfg: TrainConfig, stage: str, device: str) -> str:
    """The ``timings`` name of one training step's duration: what its cost depends on (the model, the device, the
    method's k, the batch and window length; a distillation step also runs blocks n … L − 1)."""
    where = "cuda" if str(device).startswith("cuda") else "cpu"
    if stage == "flow":
        return f"flow step {cfg.model} {where} {cfg.method} k{cfg.k} {cfg.batch}x{cfg.seq_len}"
    return f"distill step {cfg.model} {where} k{cfg.k} {cfg.distill_batch}x{cfg.seq_len} from block {cfg.span.n}"


@dataclass(frozen=True)
class TrainingEstimate:
    """What a run of ``cfg`` will do before it starts: its steps, and seconds per step measured on this machine
    (None until a run of the same kind was timed here)."""

    steps: int
    distill_steps: int
    flow_step_s: float | None
    distill_step_s: float | None

    @property
    def total_steps(self) -> int:
        return self.steps + self.distill_steps

    @property
    def seconds(self) -> float | None:
        need = [(self.steps, self.flow_step_s), (self.distill_steps, self.distill_step_s)]
        if any(n > 0 and per is None for n, per in need):
            return None
        return sum(n * per for n, per in need if n > 0)

    def line(self) -> str:
        """``402 steps in all (2 flow steps + 400 distillation steps), about 14 min here`` (or "no estimate yet")."""
        parts = f"{self.steps} flow step{'s' * (self.steps != 1)}"
        if self.distill_steps:
            parts += f" + {self.distill_steps} distillation step{'s' * (self.distill_steps != 1)}"
        secs = self.seconds
        if secs is None:
            when = "no time estimate yet (none of these steps was timed on this machine)"
        elif secs < 90:
            when = f"about {secs:.0f} s on this machine"
        else:
            when = f"about {secs / 60:.0f} min on this machine"
        return f"{self.total_steps} steps in all ({parts}), {when}"


def training_estimate(cfg: TrainConfig, device: str | None = None) -> TrainingEstimate:
    """The steps of ``cfg`` and their cost here, from the step durations earlier runs recorded (``timings``)."""
    from lft_core.run import timings

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TrainingEstimate(cfg.steps, cfg.distill_steps, timings.estimate(step_timing_op(cfg, "flow", device)),
                            timings.estimate(step_timing_op(cfg, "distill", device)))


def train_loop(run: Run, progress: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None
               ) -> TrainResult:
    """Steps ``run.start_step`` … ``cfg.total_steps``: the flow steps, then the distillation steps; a progress
    event per step, held-out NMSE every ``eval_every`` steps, a checkpoint every ``checkpoint_every`` steps and
    at the end ("complete", or "stopped" when ``should_stop()`` said so)."""
    from tqdm import tqdm

    cfg, dist, data = run.cfg, run.dist, run.data
    total = cfg.total_steps
    t0 = time.perf_counter()
    elapsed0 = float(run.history[-1].get("elapsed_s", 0.0)) if run.history else 0.0  # earlier runs' wall time
    loss_value, stopped, step = float("nan"), False, run.start_step
    spent: dict[str, list[float]] = {"flow": [], "distill": []}  # step durations, for estimates of later runs
    bar = tqdm(total=total, initial=run.start_step, desc=f"{cfg.method} {cfg.span.m}:{cfg.span.n}",
               disable=not run.verbose)
    with bar:  # closed also when a step fails, so that the error line stays the last line on stderr
        run.flow.train()
        for step in range(run.start_step, total):
            if dist.any(should_stop is not None and dist.main and bool(should_stop())):
                stopped = True
                break
            step_start = time.perf_counter()
            stage = "flow" if step < cfg.steps else "distill"
            inputs = flow_step_inputs(run, step) if stage == "flow" else distill_step_inputs(run, step - cfg.steps)
            lr = lr_at(step, cfg)
            try:
                loss_value = optimiser_step(run, stage, inputs, lr)
            except _Diverged as e:
                checkpoint(run, step, "failed")
                raise LFTError(f"training diverged at step {step} (loss {e.loss}); try a lower learning "
                               f"rate") from None
            spent[stage].append(time.perf_counter() - step_start)
            tokens = (cfg.batch if stage == "flow" else cfg.distill_batch) * cfg.seq_len
            event = {"step": step + 1, "steps": total, "stage": stage, "loss": loss_value, "lr": lr,
                     "tokens_per_s": tokens / max(time.perf_counter() - step_start, 1e-9),
                     "eta_s": (time.perf_counter() - t0) / (step + 1 - run.start_step) * (total - step - 1)}
            if dist.main and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
                run.flow.eval()
                event["heldout_nmse"] = heldout_nmse(run.flow, data.held_x0, data.held_x1, cfg.k)
                run.flow.train()
            event["elapsed_s"] = elapsed0 + time.perf_counter() - t0  # training wall time so far (compare at equal time)
            run.history.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in event.items()
                                if k in HISTORY_FIELDS or (k == "stage" and v != "flow")})
            if progress is not None and dist.main:
                progress(event)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", stage=stage)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                checkpoint(run, step + 1, "running")
        else:
            step = total
    if dist.main:
        from lft_core.run import timings

        for stage, durations in spent.items():
            if len(durations) >= 3:  # the first step of a stage pays for warm-up: the median of the rest
                timings.record(step_timing_op(cfg, stage, run.device), float(np.median(durations[1:])))
    run.flow.eval()
    nmse_value = agree(lambda: heldout_nmse(run.flow, data.held_x0, data.held_x1, cfg.k), dist)
    if run.history and run.history[-1].get("heldout_nmse") is None:  # stopped between evaluations: keep the last
        run.history[-1]["heldout_nmse"] = round(nmse_value, 6)
    checkpoint(run, step, "stopped" if stopped else "complete")
    dist.barrier()  # no rank reports the run done before rank 0's checkpoint is written
    return TrainResult(
        name=run.name, dir=str(run.out_dir), span=cfg.span, method=cfg.method, steps=step, final_loss=loss_value,
        heldout_nmse=nmse_value, seconds=time.perf_counter() - t0, device=run.device, params=run.record["params"],
        teacher_span_params=run.record["teacher_span_params"], stopped=stopped, history=run.history,
    )
