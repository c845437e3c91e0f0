"""What a flow is judged against: one class per baseline, in one registry.

A baseline is a way to get a model without the span's blocks and without training a flow. Each class owns
its name (``--baselines`` on the CLI, rows of ``eval`` / ``baselines``, the app's menus), a label and a colour
and marker for figures, how it is fitted to a span (``fit``; nothing for a training-free one), and the rows
it adds to an evaluation (``plan``: each row a surgery on the teacher, measured in the same streamed pass as
the flow). Everything that offers or draws a baseline reads ``BASELINES``; an unknown name is one ``LFTError``.

* ``SkipBaseline`` ("skip"): k blocks removed, the first k of the span ("span") and the k whose removal hurts
  least anywhere ("best"); its k are the evaluation's ``skips``.
* ``AffineBaseline`` ("affine"): the span replaced by one affine map fitted in closed form (``affine``).

A fitted baseline that can save its fit (``state`` / ``restore``) is fitted once per teacher, span and text and
kept in ``cache/baselines/<key>.safetensors`` (``fit_key``, written atomically); ``prepare`` reads it back in any
session or process, and the zoo ships the fits of its flows' spans (``lft_core/zoo/baselines``). ``slow_fit``
says when a fit would first have to compute hidden states (tens of seconds or more): the app then fits in a
background job.

Adding a baseline is one subclass and one ``register`` call (``tests/test_registries.py`` adds a toy one).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping, Sequence

from lft_core.analysis.evaluation import EvalRow, Planned, PlanContext, best_skip_start, reference_logits
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.model.teacher import Replace, Skip
from lft_core.registry import Registry
from lft_core.span import Span

if TYPE_CHECKING:
    from torch import Tensor

    from lft_core.flow.latent import Replacement
    from lft_core.model.teacher import Teacher


@dataclass(frozen=True)
class FitData:
    """The text a fitted baseline learns its span's map from: the flow's own training data when it stands beside
    a flow (``of_flow``), so that both saw the same windows."""

    corpus: str = DEFAULT_CORPUS
    seq_len: int = 128
    windows: int = 256
    heldout_windows: int = 16
    sink_weight: float | None = None

    @classmethod
    def of_flow(cls, config: Mapping) -> FitData:
        """The training data of a saved flow (its config.json)."""
        from lft_core.flow.store import trained_on

        return cls(trained_on(config), int(config.get("seq_len", 128)), int(config.get("windows", 256)),
                   int(config.get("heldout_windows", 16)), config.get("sink_weight"))

    def cli_args(self) -> list[str]:
        """The ``baselines`` command's flags that fit on this data."""
        args = ["--corpus", self.corpus, "--seq-len", str(self.seq_len), "--fit-windows", str(self.windows),
                "--heldout-windows", str(self.heldout_windows)]
        return args + (["--sink-weight", repr(float(self.sink_weight))] if self.sink_weight is not None else [])


class Baseline:
    """A what-if model of a span without its blocks. ``fit`` gives the span's replacement (None when the baseline
    needs none); ``plan`` gives the evaluation's rows, each with its surgery (and the replacement whose end point
    NMSE is measured)."""

    name: ClassVar[str]
    label: ClassVar[str]
    """For legends and menus ("affine replacement")."""
    colour: ClassVar[str]
    symbol: ClassVar[str] = "x"
    """The plotly marker of its points."""
    help: ClassVar[str] = ""
    note: ClassVar[str] = ""
    """A few words after a point's name in a figure's hover ("closed form")."""
    fitted: ClassVar[bool] = False
    """It learns from data (``fit``), so it is offered beside a flow and fitted on the flow's training data."""
    keeps_fits: ClassVar[bool] = False
    """Its fits are kept on disk (``state`` / ``restore``); one that keeps none is fitted at each use."""

    def fit(self, teacher: Teacher, span: Span, data: FitData, progress: bool = True) -> Replacement | None:
        return None

    def fit_summary(self, replacement: Replacement | None) -> dict:
        """What the fit chose, for the JSON of ``baselines`` (e.g. the ridge strength)."""
        return {}

    def slow_fit(self, teacher: Teacher, span: Span, data: FitData) -> bool:
        """True when fitting here would first compute hidden states (~45 s for 1,024 windows of 128 tokens on 2
        CPU cores), False when the fit reads what is cached (seconds)."""
        return False

    def state(self, replacement: Replacement) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The fit as tensors and string metadata, to be kept on disk; None: not kept (fitted every time)."""
        return None

    def restore(self, span: Span, tensors: dict[str, Tensor], meta: dict[str, str]) -> Replacement:
        """The replacement that ``state`` saved."""
        raise NotImplementedError(f"the {self.name} baseline does not keep its fits")

    def plan(self, ctx: PlanContext, replacement: Replacement | None) -> list[Planned]:
        """Default: the replacement spliced into the span, one row at k = 1."""
        assert replacement is not None, f"the {self.name} baseline must be fitted before it is evaluated"
        return [Planned(EvalRow(self.name, 1, 0.0, 0.0), Replace(replacement, 1), replacement)]


class SkipBaseline(Baseline):
    """Skip-k: the first k blocks of the span removed ("span", when k fits in it) and, with ``best_skip``, the k
    consecutive blocks whose removal gives the lowest KL anywhere in the model ("best", searched on the first
    ``search_windows`` windows)."""

    name, label, colour, symbol = "skip", "skip-k", "#8c564b", "circle"
    help = "k blocks removed: the first k of the span, and the k that hurt least anywhere (--skip sets k)"

    def plan(self, ctx: PlanContext, replacement: Replacement | None = None) -> list[Planned]:
        m, n = ctx.span
        say = ctx.progress or (lambda s: None)
        planned = []
        probe = ctx.ids[: max(1, min(len(ctx.ids), ctx.search_windows))]
        probe_ref = reference_logits(ctx.teacher, probe, ctx.batch) if ctx.best_skip and ctx.skips else None
        for k in ctx.skips:
            if k <= n - m:
                planned.append(Planned(EvalRow("skip", k, 0.0, 0.0, where="span", start=m), Skip(m, k)))
            if ctx.best_skip:
                say(f"searching the best position to skip {k} block(s)")
                start, _ = best_skip_start(ctx.teacher, probe, probe_ref, k, ctx.batch)
                planned.append(Planned(EvalRow("skip", k, 0.0, 0.0, where="best", start=start), Skip(start, k)))
        return planned


class AffineBaseline(Baseline):
    """The span replaced by h_n ≈ h_m + ((h_m − mu) / sigma) W + b, fitted by ridge least squares (``affine``)."""

    name, label, colour, symbol = "affine", "affine replacement", "#bcbd22", "x"
    help = "the span replaced by one affine map fitted in closed form on the flow's training windows"
    note = "closed form"
    fitted = keeps_fits = True

    def fit(self, teacher: Teacher, span: Span, data: FitData, progress: bool = True) -> Replacement:
        from lft_core.analysis.affine import fit_affine_for_span

        return fit_affine_for_span(teacher, span, data.corpus, data.seq_len, data.windows, data.heldout_windows,
                                   data.sink_weight, progress=progress)

    def fit_summary(self, replacement) -> dict:
        return {"ridge": replacement.ridge, "heldout_nmse": replacement.heldout_nmse}

    def slow_fit(self, teacher: Teacher, span: Span, data: FitData) -> bool:
        from lft_core.data.activations import cached_layers
        from lft_core.data.corpus import load_corpus

        corpus = load_corpus(data.corpus)
        return not all({span.m, span.n} <= set(cached_layers(teacher, corpus, data.seq_len, windows, split))
                       for windows, split in ((data.windows, "train"), (data.heldout_windows, "heldout")))

    def state(self, replacement) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {k: replacement.get_buffer(k).contiguous() for k in ("weight", "bias", "mu", "sigma")}
        return tensors, {"ridge": repr(replacement.ridge), "heldout_nmse": repr(replacement.heldout_nmse)}

    def restore(self, span: Span, tensors: dict[str, Tensor], meta: dict[str, str]) -> Replacement:
        from lft_core.analysis.affine import AffineReplacement

        nmse = meta.get("heldout_nmse", "None")
        return AffineReplacement(span, tensors["weight"], tensors["bias"], tensors["mu"], tensors["sigma"],
                                 ridge=float(meta.get("ridge", "0")),
                                 heldout_nmse=None if nmse == "None" else float(nmse))


BASELINES: Registry[Baseline] = Registry("baseline", reserved=("lft", "teacher"))
"""Every baseline by name, in menu order (an evaluation's rows are named "lft", "teacher" or a baseline's name)."""
register, unregister, get_baseline = BASELINES.register, BASELINES.unregister, BASELINES.lookup


def fitted_baselines() -> list[Baseline]:
    """The baselines that are fitted to a span (offered beside a flow: Compare, Per-token KL, ``eval``)."""
    return [b for b in BASELINES.values() if b.fitted]


@dataclass(frozen=True)
class Prepared:
    """A baseline ready for one span: the registry's entry and what its fit produced (None if it fits nothing)."""

    baseline: Baseline
    replacement: Replacement | None = None

    def plan(self, ctx: PlanContext) -> list[Planned]:
        return self.baseline.plan(ctx, self.replacement)


# ---------------------------------------------------------------------------------------------------------
# Fits kept on disk: cache/baselines/<key>.safetensors, and the zoo's shipped ones

FIT_FORMAT = 1
SHIPPED_FITS = Path(__file__).resolve().parents[1] / "zoo" / "baselines"
"""The fits the zoo ships for its flows' spans (read-only; ``scripts/train_zoo.py`` writes them)."""


def fit_key(name: str, teacher: Teacher, span: Span | tuple[int, int], data: FitData) -> str:
    """``<name>-<m>-<n>-<digest>``: the digest covers everything that determines the fit (the teacher's id and
    weights, the corpus's id and content, the windows, the sink weight and the span)."""
    from lft_core.data.corpus import load_corpus

    m, n = Span.of(span)
    corpus = load_corpus(data.corpus)
    raw = json.dumps([FIT_FORMAT, name, teacher.model_id, teacher.weights_hash, corpus.id, corpus.content_hash,
                      data.seq_len, data.windows, data.heldout_windows, data.sink_weight, m, n])
    return f"{name}-{m}-{n}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def fit_file(key: str) -> Path:
    """Where the fit ``key`` is kept in the cache."""
    from lft_core.paths import cache_dir

    return cache_dir("baselines") / f"{key}.safetensors"


def read_fit(baseline: Baseline, span: Span, path: Path) -> Replacement | None:
    """The fit saved at ``path``; None when it is missing or unreadable (it is then fitted again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
        return baseline.restore(span, tensors, meta)
    except Exception:  # noqa: BLE001 - a damaged or foreign file is a missing fit, never a crash
        return None


def stored_fit(name: str, teacher: Teacher, span: Span | tuple[int, int], data: FitData) -> Prepared | None:
    """The kept fit of ``name`` for this teacher, span and data (the cache's, else the zoo's), or None."""
    baseline, span = get_baseline(name), Span.of(span)
    if not baseline.fitted:
        return Prepared(baseline)
    if not baseline.keeps_fits:
        return None
    key = fit_key(name, teacher, span, data)
    for path in (fit_file(key), SHIPPED_FITS / f"{key}.safetensors"):
        replacement = read_fit(baseline, span, path)
        if replacement is not None:
            return Prepared(baseline, replacement)
    return None


def save_fit(prepared: Prepared, teacher: Teacher, span: Span | tuple[int, int], data: FitData) -> Path | None:
    """Keep ``prepared``'s fit in the cache (atomically); None when its baseline keeps none."""
    from safetensors.torch import save

    from lft_core.atomic import write_bytes

    saved = prepared.baseline.state(prepared.replacement) if prepared.replacement is not None else None
    if saved is None:
        return None
    tensors, meta = saved
    meta = {**meta, "span": f"{Span.of(span)}", "model": teacher.model_id, "weights_hash": teacher.weights_hash,
            "data": json.dumps(asdict(data))}
    path = fit_file(fit_key(prepared.baseline.name, teacher, span, data))
    write_bytes(path, save(tensors, metadata=meta))
    return path


def slow_fit(name: str, teacher: Teacher, span: Span | tuple[int, int], data: FitData) -> bool:
    """True when ``prepare`` would take long here: no kept fit, and the fit must compute hidden states first."""
    baseline = get_baseline(name)
    return (baseline.fitted and baseline.keeps_fits and stored_fit(name, teacher, span, data) is None
            and baseline.slow_fit(teacher, Span.of(span), data))


def prepare(name: str, teacher: Teacher, span: Span | tuple[int, int], data: FitData = FitData(),
            progress: bool = True) -> Prepared:
    """The baseline ``name`` fitted to ``span`` on ``data`` (no work for one that fits nothing): the kept fit when
    there is one, else fitted here and kept."""
    stored = stored_fit(name, teacher, span, data)
    if stored is not None:
        return stored
    baseline = get_baseline(name)
    prepared = Prepared(baseline, baseline.fit(teacher, Span.of(span), data, progress))
    save_fit(prepared, teacher, span, data)
    return prepared


def parse_names(text: str | Sequence[str]) -> list[str]:
    """``"affine, skip"`` -> ["affine", "skip"] (duplicates once); LFTError naming an unknown one."""
    names = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    for name in names:
        get_baseline(name)
    return list(dict.fromkeys(names))


for _baseline in (SkipBaseline(), AffineBaseline()):
    register(_baseline)
