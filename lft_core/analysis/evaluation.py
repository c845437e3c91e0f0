"""Held-out evaluation of a latent flow against the teacher and against the baselines.

For every token of the evaluation text: KL(P_teacher || P_model) of next-token distributions (the paper's
"KL of LM logits"), where the model is the LFT (span replaced by the flow, k integration steps) or a baseline
of ``baselines.BASELINES`` (skip-k: k blocks removed; the affine map; ...). Also NMSE of each replacement's end
point against h_n, and perplexities. Every model of an evaluation is a ``Planned`` row with its surgery,
measured in one streamed pass.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch

from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.data.corpus import SPLIT_RULE, load_corpus, make_windows
from lft_core.errors import LFTError
from lft_core.flow.latent import MAX_K, Replacement, check_replaces, replace_on_its_device
from lft_core.analysis.metrics import kl_per_token, nll_per_token, nmse, perplexity
from lft_core.span import Span
from lft_core.model.teacher import Replace, Skip, Surgery

if TYPE_CHECKING:
    from lft_core.analysis.baselines import Prepared
    from lft_core.model.teacher import Teacher


@dataclass
class EvalRow:
    model: str  # "teacher" | "lft" | the name of a baseline (baselines.BASELINES: "skip", "affine", ...)
    k: int
    kl: float
    ppl: float
    nmse: float | None = None
    where: str | None = None  # skip rows: "span" (first k blocks of the span) or "best"
    start: int | None = None  # first skipped block


@dataclass
class EvalResult:
    span: Span
    tokens: int
    teacher_ppl: float
    rows: list[EvalRow] = field(default_factory=list)
    seconds: float = 0.0
    split_rule: str = SPLIT_RULE  # how the evaluated corpus chose its held-out text (corpus.split_rule_of)

    def to_json(self) -> dict:
        return {"span": list(self.span), "tokens": self.tokens, "teacher_ppl": self.teacher_ppl,
                "rows": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.rows],
                "seconds": round(self.seconds, 3), "split_rule": self.split_rule}

    def table(self) -> str:
        lines = [f"span {self.span}  tokens {self.tokens}  teacher ppl {self.teacher_ppl:.3f}",
                 f"{'model':<6} {'k':>3} {'where':<10} {'KL':>8} {'NMSE':>8} {'PPL':>9}"]
        for r in self.rows:
            where = "" if r.where is None else f"{r.where}@{r.start}"
            nm = "" if r.nmse is None else f"{r.nmse:.4f}"
            lines.append(f"{r.model:<6} {r.k:>3} {where:<10} {r.kl:>8.4f} {nm:>8} {r.ppl:>9.3f}")
        return "\n".join(lines)


def row_label(r: EvalRow) -> str:
    """One row's name in tables: "lft k=3", "skip-2 best@16", "skip-2 span@12", "affine"."""
    if r.model == "lft":
        return f"lft k={r.k}"
    if r.model == "skip":
        return f"skip-{r.k} {r.where}@{r.start}" if r.where == "best" else f"skip-{r.k} {r.where}"
    return r.model


def domain_table(results: dict[str, EvalResult]) -> str:
    """One table of KL by domain: a row per model (best-position skip rows name their block per domain), a
    column per domain, and the teacher's perplexity on each domain underneath."""
    names = list(results)
    keys: dict[str, None] = {}
    cells: dict[tuple[str, str], str] = {}
    for name, res in results.items():
        for r in res.rows:
            key = row_label(r) if r.where != "best" else f"skip-{r.k} best"
            keys.setdefault(key, None)
            cells[key, name] = f"{r.kl:.4f}" + (f" @{r.start}" if r.where == "best" else "")
    width = max([12] + [len(n) + 2 for n in names])
    lines = [f"KL(teacher || model) on held-out text, span {next(iter(results.values())).span}",
             f"{'model':<16}" + "".join(f"{n:>{width}}" for n in names)]
    for key in keys:
        lines.append(f"{key:<16}" + "".join(f"{cells.get((key, n), '-'):>{width}}" for n in names))
    lines.append(f"{'teacher ppl':<16}" + "".join(f"{results[n].teacher_ppl:>{width}.2f}" for n in names))
    return "\n".join(lines)


def _check_ks(ks: Sequence[int]) -> None:
    for k in ks:
        if not 1 <= k <= MAX_K:
            raise LFTError(f"k must be between 1 and {MAX_K}, got {k}")


def _check_skips(teacher: Teacher, skips: Sequence[int]) -> None:
    for k in skips:
        if not 1 <= k <= teacher.n_layers:
            raise LFTError(f"skip k must be between 1 and {teacher.n_layers}, got {k}")


def _batched_logits(teacher: Teacher, ids: torch.Tensor, batch: int, surgery: Surgery | None = None) -> torch.Tensor:
    return torch.cat([teacher.logits(ids[s : s + batch], surgery) for s in range(0, len(ids), batch)])


def stream_metrics(teacher: Teacher, ids: torch.Tensor, models: Sequence[Surgery | None], batch: int = 8,
                   progress: Callable[[str], None] | None = None) -> list[tuple[float, float]]:
    """(mean KL(teacher ‖ model), perplexity) of each model (a surgery; None: the teacher itself) on ``ids``
    (windows, seq_len), streamed: one batch's teacher logits and one model's logits are alive at a time, so
    memory does not grow with the number of windows (a vocabulary of 49k makes that 25 MB per 128-token
    window). Means are over every token (KL) and every next-token prediction (NLL)."""
    kl_sum = [0.0] * len(models)
    nll_sum = [0.0] * len(models)
    tokens = predictions = 0
    say = progress or (lambda s: None)
    for start in range(0, len(ids), batch):
        say(f"windows {start + 1}-{min(start + batch, len(ids))} of {len(ids)}")
        part = ids[start : start + batch]
        ref = teacher.logits(part)
        for j, surgery in enumerate(models):
            logits = ref if surgery is None else teacher.logits(part, surgery)
            kl_sum[j] += float(kl_per_token(ref, logits).double().sum())
            nll_sum[j] += float(nll_per_token(logits, part).double().sum())
            del logits
        tokens += part.numel()
        predictions += part.shape[0] * (part.shape[1] - 1)
        del ref
    return [(kl / tokens, float(np.exp(nll / predictions))) for kl, nll in zip(kl_sum, nll_sum)]


def best_skip_start(teacher: Teacher, ids: torch.Tensor, ref_logits: torch.Tensor, k: int,
                    batch: int = 8) -> tuple[int, float]:
    """The start position whose k-block skip has the lowest mean KL on ``ids`` (searched over all positions)."""
    best = (0, float("inf"))
    for start in range(0, teacher.n_layers - k + 1):
        logits = _batched_logits(teacher, ids, batch, Skip(start, k))
        kl = float(kl_per_token(ref_logits, logits).mean())
        if kl < best[1]:
            best = (start, kl)
    return best


def reference_logits(teacher: Teacher, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The teacher's logits for ``ids`` (windows, seq_len) -> (windows, seq_len, vocab), float32 (for a few
    windows: the best-skip search probes on two)."""
    return _batched_logits(teacher, ids, batch)


def end_point_nmse(teacher: Teacher, replacements: Sequence[tuple[Replacement, Sequence[int]]], ids: torch.Tensor,
                   batch: int = 8) -> list[dict[int, float]]:
    """NMSE of each replacement's end point against h_n, for each of its k, over every token of ``ids``: one
    hidden-state pass per batch serves them all (they replace the same span)."""
    spans = {tuple(r.span) for r, _ in replacements}
    assert len(spans) == 1, f"end_point_nmse takes replacements of one span, got {sorted(spans)}"
    m, n = spans.pop()
    sums = [dict.fromkeys(ks, 0.0) for _, ks in replacements]
    count = 0
    for start in range(0, len(ids), batch):
        hs = teacher.hidden_states(ids[start : start + batch], [m, n])
        tokens = hs[m].shape[0] * hs[m].shape[1]
        with torch.no_grad():
            for (replacement, ks), acc in zip(replacements, sums):
                for k in ks:
                    acc[k] += nmse(replace_on_its_device(replacement, hs[m], k).float(), hs[n]) * tokens
        count += tokens
    return [{k: v / count for k, v in acc.items()} for acc in sums]


@dataclass(frozen=True)
class PlanContext:
    """What a baseline needs to plan its rows of one evaluation (``baselines.Baseline.plan``): the teacher, the
    span, the held-out windows ``ids`` (windows, seq_len), the batch size, a progress callback, and the skip-k
    settings (the k to skip, whether to search the best position, on how many windows)."""

    teacher: Teacher
    span: Span
    ids: torch.Tensor
    batch: int = 8
    progress: Callable[[str], None] | None = None
    skips: Sequence[int] = (1, 2, 3)
    best_skip: bool = True
    search_windows: int = 2


@dataclass(frozen=True)
class Planned:
    """One model of an evaluation: its row (KL / PPL still 0), its surgery on the teacher, and the replacement of
    the span whose end-point NMSE is measured at ``row.k`` (None for a model that replaces nothing)."""

    row: EvalRow
    surgery: Surgery
    replacement: Replacement | None = None


def _lft_plan(flow: Replacement, ks: Sequence[int], model: str) -> list[Planned]:
    return [Planned(EvalRow(model, k, 0.0, 0.0), Replace(flow, k), flow) for k in ks]


def _measured(teacher: Teacher, ids: torch.Tensor, planned: Sequence[Planned], batch: int,
              progress: Callable[[str], None] | None) -> list[EvalRow]:
    """The planned rows with KL and PPL from one streamed pass over ``ids``, and, for those that replace the
    span, the end-point NMSE from one hidden-state pass."""
    metrics = stream_metrics(teacher, ids, [p.surgery for p in planned], batch, progress)
    rows = [replace(p.row, kl=kl, ppl=ppl) for p, (kl, ppl) in zip(planned, metrics)]
    ends = [i for i, p in enumerate(planned) if p.replacement is not None]
    if ends:
        errors = end_point_nmse(teacher, [(planned[i].replacement, (planned[i].row.k,)) for i in ends], ids, batch)
        for i, error in zip(ends, errors):
            rows[i] = replace(rows[i], nmse=error[rows[i].k])
    return rows


def lft_rows(teacher: Teacher, flow: Replacement, ids: torch.Tensor, ks: Sequence[int] = (1, 2, 3),
             batch: int = 8, progress: Callable[[str], None] | None = None, model: str = "lft") -> list[EvalRow]:
    """KL / PPL / NMSE of the teacher with ``flow.span`` replaced by ``flow`` (an LFT, or any ``Replacement``:
    ``model`` labels the rows, e.g. "affine") for each k."""
    teacher.check_span(*flow.span)
    _check_ks(ks)
    return _measured(teacher, ids, _lft_plan(flow, ks, model), batch, progress)


def skip_rows(teacher: Teacher, span: Span | tuple[int, int], ids: torch.Tensor, skips: Sequence[int] = (1, 2, 3),
              best_skip: bool = True, batch: int = 8, search_windows: int = 2,
              progress: Callable[[str], None] | None = None) -> list[EvalRow]:
    """KL / PPL of skip-k (``baselines.SkipBaseline``): the first k blocks of the span ("span") and, with
    ``best_skip``, the k blocks whose removal hurts least anywhere in the model ("best", searched on the first
    ``search_windows`` windows)."""
    from lft_core.analysis.baselines import get_baseline

    _check_skips(teacher, skips)
    ctx = PlanContext(teacher, Span.of(span), ids, batch, progress, skips, best_skip, search_windows)
    return _measured(teacher, ids, get_baseline("skip").plan(ctx, None), batch, progress)


def evaluate(
    teacher: Teacher,
    flow: Replacement | None,
    span: Span | tuple[int, int] | None,
    ids: torch.Tensor,
    ks: Sequence[int] = (1, 2, 3),
    skips: Sequence[int] = (1, 2, 3),
    best_skip: bool = True,
    batch: int = 8,
    progress: Callable[[str], None] | None = None,
    baselines: Sequence[Prepared] = (),
) -> EvalResult:
    """Rows of KL / NMSE / PPL for the LFT at each k, skip-k (in the span, and at the best position; ``skips``
    empty: none) and each of ``baselines`` (``baselines.Prepared``: a registered baseline fitted to this span),
    from one streamed pass over the windows (memory does not grow with their number).

    ``ids`` shape (windows, seq_len), held-out text. ``flow`` is a LatentFlow (or None for baseline rows only);
    ``span`` defaults to the flow's (or the first baseline's replacement's) and must agree with them when given.
    Non-finite results are an LFTError, never a row of NaN.
    """
    from lft_core.analysis.baselines import get_baseline

    start_time = time.perf_counter()
    replacements = [(flow, "the flow")] + [(b.replacement, f"the {b.baseline.name} map") for b in baselines]
    if span is None:
        given = [r for r, _ in replacements if r is not None]
        if not given:
            raise LFTError("evaluate needs a flow or a span")
        span = given[0].span
    span = teacher.check_span(*span)
    for replacement, label in replacements:
        if replacement is not None:
            check_replaces(replacement, span, label)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LFTError("evaluation needs token windows of at least 2 tokens")
    _check_ks(ks)  # before any forward pass
    _check_skips(teacher, skips)
    ctx = PlanContext(teacher, span, ids, batch, progress, skips, best_skip)
    planned = [Planned(EvalRow("teacher", 0, 0.0, 0.0), None)]
    if flow is not None:
        planned += _lft_plan(flow, ks, "lft")
    for prepared in baselines:
        if prepared.baseline.name != "skip":  # skip-k is planned from ``skips``, once
            planned += prepared.plan(ctx)
    planned += get_baseline("skip").plan(ctx, None)
    teacher_row, *rows = _measured(teacher, ids, planned, batch, progress)
    result = EvalResult(span=span, tokens=int(ids.numel()), teacher_ppl=teacher_row.ppl, rows=rows,
                        seconds=time.perf_counter() - start_time)
    broken = [f"{r.model} k={r.k}" for r in result.rows
              if not all(np.isfinite(v) for v in (r.kl, r.ppl) + ((r.nmse,) if r.nmse is not None else ()))]
    if broken or not np.isfinite(result.teacher_ppl):
        raise LFTError(f"the evaluation gave non-finite KL / PPL / NMSE for {', '.join(broken) or 'the teacher'}: "
                       "the model or the flow produces inf or NaN on this text")
    return result


def eval_windows(teacher: Teacher, corpus_spec: str | None = None, text: str | None = None, windows: int = 16,
                 seq_len: int = 128) -> torch.Tensor:
    """Held-out token windows (windows, seq_len) from a corpus, or one window of a given text (1, T)."""
    if seq_len > teacher.max_positions:
        raise LFTError(f"seq_len {seq_len} is longer than the model's context ({teacher.max_positions} tokens)")
    if text is not None:
        ids = teacher.encode(text, max_tokens=min(seq_len * windows, teacher.max_positions))
        return ids.cpu()
    corpus = load_corpus(corpus_spec or DEFAULT_CORPUS)
    return torch.from_numpy(make_windows(corpus, teacher.tokenizer, seq_len, windows, "heldout").astype(np.int64))


@dataclass
class TokenKL:
    """Per-token view of one text for the KL page: tokens, KL of each model, top-5 next tokens."""

    tokens: list[str]
    kl: dict[str, np.ndarray]  # model label -> (T,) KL(teacher || model) for the prediction at each position
    top: dict[str, list[list[tuple[str, float]]]]  # label -> per position [(token, prob)] * 5
    ppl: dict[str, float]


@torch.no_grad()
def token_kl(teacher: Teacher, ids: torch.Tensor, models: Mapping[str, Surgery], top_k: int = 5) -> TokenKL:
    """KL per token for several models on one text, ``ids`` shape (1, T).

    ``models`` maps a label to the surgery of that model (``Replace(flow, k)`` or ``Skip(start, k)``); the
    teacher itself is always included as ``"teacher"``.
    """
    ref = teacher.logits(ids)
    decode = teacher.decode_tokens
    out_kl, out_top, out_ppl = {}, {}, {}
    for label, surgery in {"teacher": None, **models}.items():
        logits = ref if surgery is None else teacher.logits(ids, surgery)
        out_kl[label] = kl_per_token(ref, logits)[0].numpy()
        probs = torch.softmax(logits[0].float(), -1)
        p, i = probs.topk(top_k, dim=-1)
        out_top[label] = [list(zip(decode(ii), (float(b) for b in pp))) for ii, pp in zip(i, p)]
        out_ppl[label] = perplexity(logits, ids)
    return TokenKL(decode(ids[0]), out_kl, out_top, out_ppl)
