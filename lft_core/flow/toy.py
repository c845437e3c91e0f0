"""2-D teaching lab: SFM versus Flow Walking on paired point clouds, in seconds on a CPU.

The same losses (``losses``) and solvers (``solvers``) as the real engine, with a small MLP velocity field.
Each dataset is a *coupling*: point x0_i must travel to its own partner x1_i. Where straight paths cross,
standard flow matching learns the average velocity at the crossing and its flow delivers points to somebody
else's target (recoupling); Flow Walking trains the k-step walk end to end and can keep the pairing.

* ``mirror``:   a disc and its mirror image through the centre, x1 = −x0: every straight path passes through
                the centre at t = ½ (maximal crossing; −x is a rotation by 180°, so a flow can realise it).
* ``rotation``: a ring rotated by 120° about the origin; chords cross each other everywhere.
* ``swap``:     two clusters exchange places, each turning a quarter turn on the way (head-on crossing).
* ``identity``: a translation plus a small smooth gradient displacement, x1 = x0 + c + ε∇φ(x0). For ε < 1
                this is the gradient of a convex function, hence the optimal-transport map: no crossing and a
                data recoupling ratio of exactly 0.

Measured with 1500 steps, k = 3, 256 points, seeds 0-4, fraction of points the flow misroutes (delivers
nearer another point's target than its own), SFM / FW: mirror 0.67 / 0.25, rotation 0.20 / 0.02, swap 0.75 /
0.82, identity 0.002 / 0.001. On swap at k = 3 FW brings each cluster to the right place (endpoint MSE 0.09
against SFM's 2.2) but not each point inside a dense cluster, so its misrouted fraction stays high; at k = 2
(``LAB_DEFAULTS``) the walk evaluates the field at t = ½, where the clusters meet and SFM's averaged velocity
is about zero, and FW wins on both measures (seed 0, 1500 steps: MSE 6.2 / 0.05, misrouted 1.00 / 0.40).
"""
from __future__ import annotations

import csv
import io
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lft_core.errors import LFTError
from lft_core.flow.latent import MAX_K
from lft_core.flow.losses import straight_path
from lft_core.flow.methods import compute_loss, get_method
from lft_core.flow.solvers import Trajectory, integrate, uniform_times


@dataclass
class ToyPairs:
    """A 2-D coupling: x0 shape (n, 2), x1 shape (n, 2), float32; x0[i] travels to x1[i]."""

    x0: Tensor
    x1: Tensor
    name: str

    def __post_init__(self) -> None:
        assert self.x0.shape == self.x1.shape and self.x0.dim() == 2 and self.x0.shape[1] == 2, (
            f"x0 and x1 must both have shape (n, 2), got {tuple(self.x0.shape)} and {tuple(self.x1.shape)}"
        )

    @property
    def n(self) -> int:
        return self.x0.shape[0]


# ---------------------------------------------------------------------------------------------------------
# Datasets: (n, seed) -> ToyPairs


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _pairs(x0: np.ndarray, x1: np.ndarray, name: str) -> ToyPairs:
    return ToyPairs(torch.as_tensor(x0, dtype=torch.float32), torch.as_tensor(x1, dtype=torch.float32), name)


def _turn(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])  # row vectors: p · Rᵀ rotates p by +angle


def mirror(n: int = 256, seed: int = 0) -> ToyPairs:
    """Uniform disc of radius 2.5 about the origin, each point paired with its mirror image x1 = −x0.

    Every straight path passes through the centre at t = ½, where the straight-path velocity field
    −2x / (1 − 2t) is singular: SFM's regression has to average there, Flow Walking learns to steer round it.
    """
    rng = _rng(seed)
    theta = rng.uniform(0, 2 * math.pi, n)
    radius = 2.5 * np.sqrt(rng.uniform(0, 1, n))
    x0 = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    return _pairs(x0, -x0, "mirror")


def rotation(n: int = 256, seed: int = 0, angle_deg: float = 120.0) -> ToyPairs:
    """Ring of radius 2 (radial noise 0.1), each point rotated by angle_deg about the origin."""
    rng = _rng(seed)
    theta = rng.uniform(0, 2 * math.pi, n)
    radius = 2.0 + 0.1 * rng.normal(size=n)
    x0 = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    return _pairs(x0, _turn(x0, math.radians(angle_deg)), "rotation")


def swap(n: int = 256, seed: int = 0, twist_deg: float = 90.0) -> ToyPairs:
    """Clusters at (−2.5, 0.5) and (2.5, −0.5) (std 0.7) exchange places, each turning twist_deg on the way."""
    rng = _rng(seed)
    first = np.arange(n)[:, None] < n // 2
    a, b = np.array([-2.5, 0.5]), np.array([2.5, -0.5])
    offsets = rng.normal(size=(n, 2)) * 0.7
    x0 = np.where(first, a, b) + offsets
    x1 = np.where(first, b, a) + _turn(offsets, math.radians(twist_deg))
    return _pairs(x0, x1, "swap")


def identity(n: int = 256, seed: int = 0, eps: float = 0.3) -> ToyPairs:
    """Uniform square [−2, 2]², x1 = x0 + (0.5, 0.3) + eps·∇φ(x0), φ = sin(x)·cos(y) (no crossing for eps < 1)."""
    x0 = _rng(seed).uniform(-2.0, 2.0, size=(n, 2))
    x, y = x0[:, 0], x0[:, 1]
    grad = np.stack([np.cos(x) * np.cos(y), -np.sin(x) * np.sin(y)], axis=1)
    return _pairs(x0, x0 + np.array([0.5, 0.3]) + eps * grad, "identity")


DATASETS: dict[str, Callable[[int, int], ToyPairs]] = {
    "mirror": mirror,
    "rotation": rotation,
    "swap": swap,
    "identity": identity,
}
"""Built-in couplings by name."""


@dataclass(frozen=True)
class LabDefaults:
    """The teaching lab's k and training steps for one built-in dataset (the page sets them when it is chosen;
    all were measured with 256 points)."""

    k: int
    steps: int


LAB_DEFAULTS: dict[str, LabDefaults] = {
    # Measured (seed 0, 256 points), endpoint MSE / misrouted fraction, SFM vs FW:
    "mirror": LabDefaults(k=3, steps=1500),  # 0.054 / 0.61 vs 0.0067 / 0.24
    "rotation": LabDefaults(k=3, steps=1000),  # 0.0028 / 0.32 vs 0.0002 / 0.02
    "swap": LabDefaults(k=2, steps=1500),  # 6.2 / 1.00 vs 0.049 / 0.40 (at k = 3, 1000 steps: 0.85 vs 0.86)
    "identity": LabDefaults(k=3, steps=1000),  # 0.0001 / 0.00 vs 0.0000 / 0.00: no crossing, nothing to fix
}
"""Per-dataset settings where the lab's lesson shows (FW misroutes fewer points than SFM, or, for identity,
neither misroutes any: without crossings there is nothing for Flow Walking to fix)."""

MAX_CSV_ROWS = 5000
MIN_CSV_ROWS = 4
CSV_COLUMNS = ("x0", "y0", "x1", "y1")
MAX_CSV_BYTES = 2 * 1024 * 1024
"""A pairs CSV is at most 2 MB (the lab's uploader allows 2 MB; 5000 rows of four numbers take about 200 KB)."""
MAX_CSV_FIELD = 100
"""A cell holds at most 100 characters (a number needs about 25; extra columns are read but not kept)."""
MAX_CSV_COLUMNS = 64
MAX_CSV_VALUE = 1e6
"""Coordinates are at most 1e6 in size: beyond that the float32 toy flow's squared distances overflow."""
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_NOT_FINITE = re.compile(r"[+-]?(?:inf|infinity|nan)", re.IGNORECASE)


def pairs_from_csv(source: str | Path | IO[str] | IO[bytes], name: str = "csv") -> ToyPairs:
    """Read a coupling from CSV with a header naming columns x0, y0, x1, y1 (any order, extra columns ignored).

    Bounded before it is parsed: at most ``MAX_CSV_BYTES`` bytes, ``MAX_CSV_COLUMNS`` columns and
    ``MAX_CSV_FIELD`` characters a cell, between ``MIN_CSV_ROWS`` and ``MAX_CSV_ROWS`` rows; cells of the four
    columns are plain decimal numbers (``1.5``, ``-2e3``; not ``1_000``, ``0x10`` or other scripts' digits),
    finite and at most ``MAX_CSV_VALUE`` in size. Any problem, whatever the bytes, is one LFTError naming the
    row, never another exception."""
    if hasattr(source, "read"):
        raw = source.read(MAX_CSV_BYTES + 1)  # type: ignore[union-attr]
        label = getattr(source, "name", name)
        label = label if isinstance(label, str) else name
    else:
        path = Path(source)  # type: ignore[arg-type]
        if not path.is_file():
            raise LFTError(f"CSV file not found: {path}")
        if path.stat().st_size > MAX_CSV_BYTES:
            raise LFTError(f"{path}: the CSV is {path.stat().st_size:,} bytes; at most {MAX_CSV_BYTES:,}")
        with open(path, "rb") as f:
            raw = f.read(MAX_CSV_BYTES + 1)
        label = str(path)
    if len(raw) > MAX_CSV_BYTES:
        raise LFTError(f"{label}: the CSV is larger than {MAX_CSV_BYTES // (1024 * 1024)} MB; at most "
                       f"{MAX_CSV_ROWS} rows of x0,y0,x1,y1 are read")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise LFTError(f"{label}: not a UTF-8 text file") from None
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")  # any line ends (Windows, old Mac)
    if "\x00" in raw:
        raise LFTError(f"{label}: the CSV holds NUL bytes (a binary file?)")
    for number, text in enumerate(raw.splitlines(), 1):  # before the csv module, whose own limit is 128 KiB
        if len(text) > MAX_CSV_COLUMNS * (MAX_CSV_FIELD + 3):
            raise LFTError(f"{label}: line {number} has {len(text):,} characters; a row holds at most "
                           f"{MAX_CSV_COLUMNS} cells of at most {MAX_CSV_FIELD} characters")
    rows, n_rows = [], 0  # the rows kept (header and at most MAX_CSV_ROWS + 1 more), and all non-blank rows
    reader = csv.reader(io.StringIO(raw))
    try:
        for row in reader:
            if len(row) > MAX_CSV_COLUMNS:
                raise LFTError(f"{label}: line {reader.line_num} has {len(row)} cells; at most {MAX_CSV_COLUMNS}")
            long = next((cell for cell in row if len(cell) > MAX_CSV_FIELD), None)
            if long is not None:
                raise LFTError(f"{label}: line {reader.line_num} has a cell of {len(long):,} characters; at most "
                               f"{MAX_CSV_FIELD}")
            if any(cell.strip() for cell in row):
                n_rows += 1
                if len(rows) <= MAX_CSV_ROWS + 1:
                    rows.append(row)
    except csv.Error as e:
        raise LFTError(f"{label}: not a CSV this lab can read (line {reader.line_num}: {e})") from None
    if not rows:
        raise LFTError(f"{label}: the CSV is empty; expected a header x0,y0,x1,y1 and at least {MIN_CSV_ROWS} rows")
    header = [cell.strip().lower() for cell in rows[0]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        found = ",".join(cell.strip()[:20] for cell in rows[0][:8]) + (",…" if len(rows[0]) > 8 else "")
        raise LFTError(
            f"{label}: the first row must be a header with columns x0,y0,x1,y1; missing {', '.join(missing)} "
            f"(found {found})"
        )
    twice = [c for c in CSV_COLUMNS if header.count(c) > 1]
    if twice:
        raise LFTError(f"{label}: the header names column {twice[0]} more than once")
    cols = [header.index(c) for c in CSV_COLUMNS]
    body = rows[1:]
    if len(body) < MIN_CSV_ROWS:
        raise LFTError(f"{label}: need at least {MIN_CSV_ROWS} data rows, got {len(body)}")
    if n_rows - 1 > MAX_CSV_ROWS:
        raise LFTError(f"{label}: at most {MAX_CSV_ROWS} data rows, got {n_rows - 1}")
    values = np.empty((len(body), 4), dtype=np.float64)
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        for j, c in enumerate(cols):
            cell = row[c].strip() if c < len(row) else ""
            where = f"{label}: row {line}, column {CSV_COLUMNS[j]}"
            if _NOT_FINITE.fullmatch(cell):
                raise LFTError(f"{where}: {cell!r} is not finite")
            if not _NUMBER.fullmatch(cell):
                raise LFTError(f"{where}: {cell!r} is not a number")
            values[r, j] = float(cell)
            if not math.isfinite(values[r, j]):
                raise LFTError(f"{where}: {cell!r} is not finite")
            if abs(values[r, j]) > MAX_CSV_VALUE:
                raise LFTError(f"{where}: {cell!r} is larger than {MAX_CSV_VALUE:g} in size")
    return _pairs(values[:, :2], values[:, 2:], name)


# ---------------------------------------------------------------------------------------------------------
# The toy velocity field


class MLPField(nn.Module):
    """u_θ(x, t) for 2-D points: an MLP on [x, t, sin(2πjt), cos(2πjt) for j = 1 … n_freq].

    x: shape (batch, 2); t: shape (batch,) -> velocity, shape (batch, 2). 3 linear layers, SiLU, hidden 128.
    """

    def __init__(self, hidden: int = 128, n_freq: int = 4):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32))
        self.net = nn.Sequential(
            nn.Linear(2 + 1 + 2 * n_freq, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        assert x.dim() == 2 and x.shape[1] == 2, f"x must have shape (batch, 2), got {tuple(x.shape)}"
        assert t.shape == (x.shape[0],), f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}"
        angles = t[:, None] * self.freqs[None]
        return self.net(torch.cat([x, t[:, None], angles.sin(), angles.cos()], dim=1))


# ---------------------------------------------------------------------------------------------------------
# Training and metrics


@dataclass
class ToyResult:
    """One toy run: the trained field, its k-step endpoints, and the metrics shown on the page.

    data_recoupling_ratio: fraction of pairs the exact OT assignment of {x0} to {x1} moves (data property).
    endpoint_mse: mean ‖x̂_1 − x1‖² over points, x̂_1 from k uniform Euler steps.
    flow_recoupled_fraction: fraction of points whose x̂_1 is strictly nearer another target than their own.
    seconds: wall time of training plus evaluation. losses: training loss at every step.
    """

    dataset: str
    method: str
    k: int
    steps: int
    alpha: float
    seed: int
    data_recoupling_ratio: float
    endpoint_mse: float
    flow_recoupled_fraction: float
    seconds: float
    losses: list[float]
    pairs: ToyPairs = dc_field(repr=False)
    field: MLPField = dc_field(repr=False)
    x_hat: Tensor = dc_field(repr=False)  # shape (n, 2)
    recoupled: np.ndarray = dc_field(repr=False)  # shape (n,), bool

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "method": self.method,
            "k": self.k,
            "steps": self.steps,
            "alpha": self.alpha,
            "seed": self.seed,
            "n_points": self.pairs.n,
            "data_recoupling_ratio": round(self.data_recoupling_ratio, 6),
            "endpoint_mse": round(self.endpoint_mse, 6),
            "flow_recoupled_fraction": round(self.flow_recoupled_fraction, 6),
            "seconds": round(self.seconds, 4),
            "final_loss": round(self.losses[-1], 6) if self.losses else None,
        }


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread, restoring the previous setting.

    The toy's matrices are tiny, so a second thread only adds synchronisation; on this 2-core machine with
    another busy process, 2 threads made a 1500-step run take 60-140 s instead of 1-3 s.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_toy(
    pairs: ToyPairs,
    method: str = "sfm",
    steps: int = 1500,
    k: int = 3,
    alpha: float = 0.1,
    lr: float = 1e-2,
    batch: int = 256,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    eval_k: int | None = None,
) -> ToyResult:
    """Train an MLPField on ``pairs`` with ``method`` ("sfm", "fw" or "hybrid"), then measure it.

    Adam at ``lr`` with cosine decay to 2% of it; minibatches of ``batch`` pairs (full batch when n <= batch).
    ``progress(step, steps, loss)`` is called every 25 steps and at the end. Evaluation walks k uniform Euler
    steps (``eval_k`` overrides k). The default lr was chosen by measurement: at 3e-3 Flow Walking is still
    far from converged after 1500 steps (its loss keeps falling with more steps), at 1e-2 all methods are.
    """
    get_method(method)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LFTError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise LFTError(f"k must be an integer between 1 and {MAX_K}, got {k!r}")
    from lft_core.analysis.recoupling import recoupling_ratio
    from lft_core.analysis.crossings import flow_recoupled

    start = time.perf_counter()
    with _one_thread():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MLPField()
        gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / steps)))
        x0, x1 = pairs.x0.float(), pairs.x1.float()
        full = pairs.n <= batch
        losses: list[float] = []
        for step in range(steps):
            if full:
                b0, b1 = x0, x1
            else:
                idx = torch.randint(0, pairs.n, (batch,), generator=gen)
                b0, b1 = x0[idx], x1[idx]
            loss = compute_loss(method, model, b0, b1, k=k, alpha=alpha, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise LFTError(f"toy training diverged at step {step + 1} (loss {losses[-1]}); try a lower learning rate")
            if progress is not None and ((step + 1) % 25 == 0 or step + 1 == steps):
                progress(step + 1, steps, losses[-1])

        model.eval()
        with torch.no_grad():
            x_hat = integrate(model, x0, eval_k or k)
    recoupled = np.asarray(flow_recoupled(x_hat.numpy(), x1.numpy()), dtype=bool)
    ratio = float(recoupling_ratio(x0.numpy(), x1.numpy()).ratio)
    return ToyResult(
        dataset=pairs.name, method=method, k=eval_k or k, steps=steps, alpha=alpha, seed=seed,
        data_recoupling_ratio=ratio,
        endpoint_mse=float((x_hat - x1).pow(2).sum(1).mean()),
        flow_recoupled_fraction=float(recoupled.mean()),
        seconds=time.perf_counter() - start, losses=losses,
        pairs=pairs, field=model, x_hat=x_hat, recoupled=recoupled,
    )


@torch.no_grad()
def flow_paths(field: nn.Module, x0: Tensor, k: int, fine_steps: int = 32) -> Trajectory:
    """The k-step Euler walk of ``field`` from x0 (shape (n, 2)), sampled at fine_steps+1 uniform times.

    An Euler walk moves in a straight line within each step, so the frames are exact positions on the
    piecewise-linear path (for animation). For the continuous flow of the field, pass a large k.
    Returns states shape (fine_steps+1, n, 2) and times shape (fine_steps+1,).
    """
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or fine_steps < 1:
        raise LFTError(f"fine_steps must be an integer >= 1, got {fine_steps!r}")
    walk = integrate(field, x0.float(), k, return_path=True)
    assert isinstance(walk, Trajectory)
    nodes = uniform_times(k)
    times = uniform_times(fine_steps)
    frames = []
    for t in times.tolist():
        i = min(int(t * k), k - 1)  # the Euler step containing t
        s = (t - float(nodes[i])) * k  # fraction of the way through step i, in [0, 1]
        frames.append(walk.states[i] + s * (walk.states[i + 1] - walk.states[i]))
    return Trajectory(states=torch.stack(frames), times=times)


def run_toy(
    dataset: str,
    method: str,
    steps: int,
    k: int = 3,
    n_points: int = 256,
    seed: int = 0,
    alpha: float = 0.1,
    progress: Callable[[int, int, float], None] | None = None,
) -> ToyResult:
    """Build a built-in dataset and train on it (what ``python -m lft_core toy`` and the toy page call)."""
    if dataset not in DATASETS:
        raise LFTError(f"unknown toy dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    get_method(method)
    if isinstance(n_points, bool) or not isinstance(n_points, int) or not MIN_CSV_ROWS <= n_points <= MAX_CSV_ROWS:
        raise LFTError(f"n_points must be an integer in [{MIN_CSV_ROWS}, {MAX_CSV_ROWS}], got {n_points!r}")
    return train_toy(DATASETS[dataset](n_points, seed), method=method, steps=steps, k=k, alpha=alpha, seed=seed,
                     progress=progress)


def crossing_marks(x0: np.ndarray, x1: np.ndarray, top: int = 300) -> np.ndarray:
    """Where the ``top`` most crossing pairs (largest saving of a swap) come closest: for each pair (i, j) the
    midpoint of the two straight-path points at their t*. x0, x1 shape (n, 2) with n <= 2000 (crossings
    examines every pair; no marks above that); returns shape (c, 2), c <= top."""
    from lft_core.analysis.crossings import MAX_CROSSING_TOKENS, crossings

    if len(x0) > MAX_CROSSING_TOKENS:
        return np.zeros((0, 2))
    cross = crossings(x0, x1)
    best = np.argsort(-cross.delta)[:top]
    if not len(best):
        return np.zeros((0, 2))
    i, j = cross.pairs[best, 0], cross.pairs[best, 1]
    t = torch.from_numpy(cross.t_star[best])
    a0, a1 = torch.from_numpy(np.asarray(x0, dtype=np.float64)), torch.from_numpy(np.asarray(x1, dtype=np.float64))
    p_i, p_j = straight_path(a0[i], a1[i], t), straight_path(a0[j], a1[j], t)
    return ((p_i + p_j) / 2).numpy()


@dataclass
class LabRun:
    """What the teaching lab draws for one trained toy flow.

    x0, x1: shape (n, 2); frames: shape (f, n, 2), the k-step walk sampled at ``times`` (shape (f,));
    recoupled: shape (n,), bool; marks: shape (c, 2), where crossing straight paths come closest;
    metrics: ``ToyResult.to_json()``; losses: the training loss at every step.
    """

    x0: np.ndarray
    x1: np.ndarray
    frames: np.ndarray
    times: np.ndarray
    recoupled: np.ndarray
    marks: np.ndarray
    metrics: dict[str, Any]
    losses: list[float]


def lab_run(result: ToyResult, frames_per_step: int = 8) -> LabRun:
    """The lab's view of a finished toy run: animation frames along its k-step walk, crossing marks, metrics."""
    x0, x1 = result.pairs.x0.numpy(), result.pairs.x1.numpy()
    path = flow_paths(result.field, result.pairs.x0, result.k, fine_steps=frames_per_step * result.k)
    return LabRun(x0=x0, x1=x1, frames=path.states.numpy(), times=path.times.numpy(),
                  recoupled=np.asarray(result.recoupled, dtype=bool), marks=crossing_marks(x0, x1),
                  metrics=result.to_json(), losses=list(result.losses))
