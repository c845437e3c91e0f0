"""The training data of a flow: pairs (x0, x1) = (h_m, h_n) of whole windows, and which windows each step reads.

``PairSource`` streams batches from the activation cache's float16 memmaps (train split) and holds the held-out
windows (held-out split, never trained on) for the NMSE during training; ``load_pairs`` caches what is missing
and opens them. ``normalisation_stats`` gives the per-dimension standardisation a new flow starts from.
``BatchPlan`` is the rule for the windows of each optimiser step (seeded epochs), shared out over
data-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from lft_core.data.activations import ensure_activations
from lft_core.data.corpus import load_corpus
from lft_core.errors import LFTError

if TYPE_CHECKING:
    from lft_core.flow.config import TrainConfig
    from lft_core.model.teacher import Teacher


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
