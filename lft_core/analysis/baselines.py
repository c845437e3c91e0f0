"""What a flow is judged against: one class per baseline, in one registry.

A baseline is a way to get a model without the span's blocks and without training a flow. Each class owns
its name (``--baselines`` on the CLI, rows of ``eval`` / ``baselines``, the app's menus), a label and a colour
and marker for figures, how it is fitted to a span (``fit``; nothing for a training-free one), and the rows
it adds to an evaluation (``plan``: each row a surgery on the teacher, measured in the same streamed pass as
the flow). Everything that offers or draws a baseline reads ``BASELINES``; an unknown name is one ``LFTError``.

* ``SkipBaseline`` ("skip"): k blocks removed, the first k of the span ("span") and the k whose removal hurts
  least anywhere ("best"); its k are the evaluation's ``skips``.
* ``AffineBaseline`` ("affine"): the span replaced by one affine map fitted in closed form (``affine``).

Adding a baseline is one subclass and one ``register`` call (``tests/test_registries.py`` adds a toy one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Mapping, Sequence

from lft_core.analysis.evaluation import EvalRow, Planned, PlanContext, best_skip_start, reference_logits
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.model.teacher import Replace, Skip
from lft_core.registry import Registry
from lft_core.span import Span

if TYPE_CHECKING:
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

    def fit(self, teacher: Teacher, span: Span, data: FitData, progress: bool = True) -> Replacement | None:
        return None

    def fit_summary(self, replacement: Replacement | None) -> dict:
        """What the fit chose, for the JSON of ``baselines`` (e.g. the ridge strength)."""
        return {}

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
    fitted = True

    def fit(self, teacher: Teacher, span: Span, data: FitData, progress: bool = True) -> Replacement:
        from lft_core.analysis.affine import fit_affine_for_span

        return fit_affine_for_span(teacher, span, data.corpus, data.seq_len, data.windows, data.heldout_windows,
                                   data.sink_weight, progress=progress)

    def fit_summary(self, replacement) -> dict:
        return {"ridge": replacement.ridge, "heldout_nmse": replacement.heldout_nmse}


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


def prepare(name: str, teacher: Teacher, span: Span | tuple[int, int], data: FitData = FitData(),
            progress: bool = True) -> Prepared:
    """The baseline ``name`` fitted to ``span`` on ``data`` (no work for one that fits nothing)."""
    baseline = get_baseline(name)
    return Prepared(baseline, baseline.fit(teacher, Span.of(span), data, progress))


def parse_names(text: str | Sequence[str]) -> list[str]:
    """``"affine, skip"`` -> ["affine", "skip"] (duplicates once); LFTError naming an unknown one."""
    names = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    for name in names:
        get_baseline(name)
    return list(dict.fromkeys(names))


for _baseline in (SkipBaseline(), AffineBaseline()):
    register(_baseline)
