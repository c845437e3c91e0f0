"""``python -m lft_core <command>``: argument parsing only; every command calls library functions.

Each command prints progress to stderr, a readable summary to stdout, and with ``--json PATH`` writes its
results as JSON. Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lft_core.atomic import write_json
from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.model.loading import DEVICE_MAPS
from lft_core.span import Span
from lft_core.flow.config import MAX_SEED, TrainConfig


def _write_json(path: str | None, data: dict) -> None:
    if path:
        write_json(Path(path), data, indent=2)


def check_output_path(path: str | None, flag: str = "--json") -> None:
    """LFTError at once (before any work) unless ``path`` can be written: not a folder, its folder exists and
    takes a new file (tried, then removed)."""
    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise LFTError(f"{flag} {path} is a folder: give a file name")
    if not p.parent.is_dir():
        raise LFTError(f"{flag} {path}: the folder {p.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise LFTError(f"{flag} {path} cannot be written ({e.strerror or e})") from None


MAX_PAIRS = 4096  # a 4096² float64 cost matrix is 128 MiB, and the exact assignment is cubic in it


def _pairs(text: str) -> int:
    v = _positive(text)
    if v > MAX_PAIRS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PAIRS} pairs (memory and time grow with pairs²), got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be between 0 and 2**63 - 1, got {v}")
    return v


def _span(text: str) -> Span:
    try:
        return Span.parse(text)
    except LFTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def _baseline_list(text: str) -> list[str]:
    from lft_core.analysis.baselines import parse_names

    try:
        return parse_names(text)
    except LFTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


# ---------------------------------------------------------------------------------------------------------
def _teacher(a: argparse.Namespace, spec: str | None = None):
    """The command's teacher: on ``--device`` (default: the CPU, or under torchrun with CUDA each rank's own
    GPU), or spread by ``--device-map`` over the devices (Accelerate's big-model loading)."""
    from lft_core.distributed import current
    from lft_core.model.loading import load_teacher, parse_max_memory

    device_map = getattr(a, "device_map", None)
    if device_map and getattr(a, "device", None):
        raise LFTError("give --device or --device-map, not both")
    if getattr(a, "max_memory", None) and not device_map:
        raise LFTError("--max-memory goes with --device-map")
    dist = current()
    if device_map and dist.active:
        raise LFTError("--device-map spreads one teacher over all of a machine's devices, so it runs in one process: "
                       "cache with `python -m lft_core cache --device-map auto ...`, then train under torchrun "
                       "from that cache")
    default = dist.device() if dist.active else "cpu"
    device = None if device_map else (getattr(a, "device", None) or default)
    return load_teacher(spec or a.model, device=device, trust_remote_code=getattr(a, "trust_remote_code", False),
                        device_map=device_map, max_memory=parse_max_memory(getattr(a, "max_memory", None)))


def cmd_cache(a: argparse.Namespace) -> dict:
    from lft_core.data.activations import ensure_activations, parse_layers
    from lft_core.data.corpus import load_corpus
    from lft_core.distributed import current

    teacher = _teacher(a)
    corpus = load_corpus(a.corpus)
    if corpus.skipped_lines and current().main:
        print(f"note: skipped {corpus.skipped_lines} .jsonl lines without a non-empty \"text\" field",
              file=sys.stderr)
    layers = parse_layers(a.layers, teacher.n_layers)
    cache = ensure_activations(teacher, corpus, a.seq_len, a.windows, layers, split=a.split,
                               batch_size=a.batch_size, progress=current().main)
    tokens = a.windows * a.seq_len
    result = {
        "key": cache.key, "dir": str(cache.dir), "layers": cache.layers, "windows": a.windows,
        "seq_len": a.seq_len, "d_model": teacher.d_model, "hit": cache.hit, "seconds": round(cache.seconds, 4),
        "tokens_per_second": round(tokens / cache.seconds, 1) if cache.seconds > 0 else None,
        "computed_layers": list(cache.computed_layers), "skipped_lines": corpus.skipped_lines,
        "world_size": current().world,
    }
    print(f"{'hit' if cache.hit else 'computed'} {cache.key}: layers {cache.layers} in {cache.seconds:.2f} s")
    return result


def cmd_train(a: argparse.Namespace) -> dict:
    from lft_core.distributed import current
    from lft_core.flow.training import train_flow

    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    stop_file = Path(a.stop_file) if a.stop_file else None
    progress = _progress_writer(Path(a.progress_file)) if a.progress_file else None

    teacher = _teacher(a)
    result = train_flow(cfg, teacher=teacher, progress=progress,
                        should_stop=(lambda: stop_file.exists()) if stop_file else None, resume=a.resume)
    out = {**result.to_json(), "world_size": current().world}
    print(f"{'stopped' if result.stopped else 'trained'} {result.name}: loss {result.final_loss:.5f}, "
          f"held-out NMSE {result.heldout_nmse:.4f}, {result.seconds:.1f} s on {result.device}")
    return out


def _progress_writer(path: Path) -> Callable[[dict], None]:
    """Append one JSON line per progress event (read by the app's job view)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(event: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")

    return write


def cmd_sweep(a: argparse.Namespace) -> dict:
    """Train the grid spans × methods × k × seeds one flow after another (``lft_core.run.sweep``)."""
    from lft_core.run.sweep import GRID, parse_grid, plan_sweep, run_sweep

    grid = parse_grid(a.spans, a.methods, a.k, a.seeds)  # bad text fails before the model loads
    base = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)
                          if f.name not in (*GRID, "name", "sweep")})
    stop_file = Path(a.stop_file) if a.stop_file else None
    progress = _progress_writer(Path(a.progress_file)) if a.progress_file else None
    teacher = _teacher(a)
    plan = plan_sweep(base, *grid, prefix=a.name, teacher=teacher)  # the whole grid, before any training
    result = run_sweep(plan, teacher, progress=progress,
                       should_stop=(lambda: stop_file.exists()) if stop_file else None)
    print(result.table())
    out = result.to_json()
    if result.failed:  # the JSON still lists every run
        _write_json(a.json, out)
        raise LFTError(f"{len(result.failed)} of {len(result.runs)} runs failed; first: {result.failed[0].name}: "
                       f"{result.failed[0].error}")
    if result.stopped:
        print(f"stopped; run the same command again to continue the sweep {result.prefix}", file=sys.stderr)
    return out


def cmd_eval(a: argparse.Namespace) -> dict:
    from lft_core.analysis.baselines import FitData, get_baseline, prepare
    from lft_core.analysis.evaluation import eval_windows, evaluate
    from lft_core.flow.latent import MAX_K
    from lft_core.flow.store import open_flow, read_flow_config, trained_on

    if a.text and a.corpus_given:
        raise LFTError("give either --text or --corpus, not both")
    for k in a.k:  # checked before any model is loaded
        if not 1 <= k <= MAX_K:
            raise LFTError(f"--k values must be between 1 and {MAX_K}, got {k}")
    for k in a.skip:
        if k < 1:
            raise LFTError(f"--skip values must be at least 1, got {k}")
    config = read_flow_config(a.flow)
    teacher = _teacher(a, a.model or config["model"])
    flow, config = open_flow(a.flow, teacher)
    if not teacher.dispatched:
        flow.to(teacher.device)
    text = None
    if a.text:
        from lft_core.data.corpus import read_text_file

        text = read_text_file(a.text)  # size limit, empty / binary / not-UTF-8 checks
    # held-out windows of the flow's own training corpus unless told otherwise
    ids = eval_windows(teacher, a.corpus or trained_on(config), text, a.windows, a.seq_len or config.get("seq_len", 128))
    prepared = []
    for name in a.baselines:  # fitted on the flow's own training data
        baseline = get_baseline(name)
        if baseline.fitted:
            print(f"fitting the {baseline.label} of the flow's span", file=sys.stderr)
        prepared.append(prepare(name, teacher, flow.span, FitData.of_flow(config)))
    result = evaluate(teacher, flow, None, ids, ks=a.k, skips=a.skip,
                      progress=lambda s: print(s, file=sys.stderr), baselines=prepared)
    print(result.table())
    return result.to_json()


def cmd_baselines(a: argparse.Namespace) -> dict:
    if (a.span is None) == (a.spans is None):
        raise LFTError("give either --span M:N (baselines of one span) or --spans all (the affine grid)")
    if a.text and a.span is None:
        raise LFTError("--text goes with --span")
    for k in a.skip:
        if k < 1:
            raise LFTError(f"--skip values must be at least 1, got {k}")
    text = None
    if a.text:
        from lft_core.data.corpus import read_text_file

        text = read_text_file(a.text)
    teacher = _teacher(a)
    if a.spans is not None:
        return _affine_grid(a, teacher)
    from lft_core.analysis.baselines import BASELINES, FitData, prepare
    from lft_core.analysis.evaluation import eval_windows, evaluate

    span = teacher.check_span(*a.span)
    data = FitData(a.corpus, a.seq_len, a.fit_windows, a.heldout_windows)
    t0 = time.perf_counter()
    prepared, fit = [], {"windows": a.fit_windows, "heldout_windows": a.heldout_windows, "seq_len": a.seq_len,
                         "corpus": a.corpus}
    for name in a.baselines or list(BASELINES):
        p = prepare(name, teacher, span, data)
        prepared.append(p)
        summary = p.baseline.fit_summary(p.replacement)
        if summary:
            fit.update(summary)
            print(f"{name} fit of {span}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()), file=sys.stderr)
    fit_seconds = time.perf_counter() - t0
    skips = a.skip if any(p.baseline.name == "skip" for p in prepared) else []
    ids = eval_windows(teacher, a.corpus, text, a.windows, a.seq_len)
    result = evaluate(teacher, None, span, ids, ks=[], skips=skips, progress=lambda s: print(s, file=sys.stderr),
                      baselines=prepared)
    print(result.table())
    return {**result.to_json(), "model_id": teacher.model_id, "fit_seconds": round(fit_seconds, 3), "fit": fit}


def _affine_grid(a: argparse.Namespace, teacher) -> dict:
    from lft_core.analysis.affine import affine_grid_for_model
    from lft_core.span import grid_json, parse_spans

    spans = parse_spans(a.spans, teacher.n_layers)
    with _span_progress("affine grid") as progress:
        grid = affine_grid_for_model(teacher, a.corpus, a.seq_len, a.grid_windows, a.grid_heldout_windows, spans,
                                     callback=progress)
    values = grid.matrix[np.isfinite(grid.matrix)]
    print(f"affine held-out NMSE over {values.size} spans of {teacher.model_id} ({grid.tokens} tokens fitted, "
          f"{grid.heldout_tokens} scored, position 0 and {grid.massive_dropped} massive activations excluded): "
          f"min {values.min():.3f}, median "
          f"{np.median(values):.3f}, max {values.max():.3f} in {grid.seconds:.1f} s")
    return {"model": teacher.model_id, "layers": teacher.n_layers, "metric": "nmse", "matrix": grid_json(grid.matrix),
            "ridge": grid_json(grid.ridge), "tokens": grid.tokens, "heldout_tokens": grid.heldout_tokens,
            "massive_dropped": grid.massive_dropped,
            "seconds": round(grid.seconds, 3)}


@contextmanager
def _span_progress(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr fed by ``progress(done, total)`` (spans of a grid), closed when the block ends, also
    by an error, so that the error line stays the last line."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="span", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


def cmd_recoupling(a: argparse.Namespace) -> dict:
    from lft_core.analysis.coupling import recoupling_for_model
    from lft_core.span import parse_spans

    teacher = _teacher(a)
    spans = parse_spans(a.spans, teacher.n_layers)
    with _span_progress("recoupling") as progress:
        grid = recoupling_for_model(teacher, a.corpus, a.pairs, spans, a.seq_len, a.windows,
                                    drop_first=not a.include_first, seed=a.seed, progress=progress)
    L = teacher.n_layers
    values = grid.matrix[np.isfinite(grid.matrix)]
    print(f"recoupling ratio over {values.size} spans of {teacher.model_id} ({grid.pairs} pairs, first positions "
          f"{'included' if a.include_first else 'excluded'}): min {values.min():.3f}, median "
          f"{np.median(values):.3f}, max {values.max():.3f} in {grid.seconds:.1f} s")
    return {"model": teacher.model_id, "layers": L, "pairs": grid.pairs, "drop_first": grid.drop_first,
            "matrix": grid.to_json_matrix(), "seconds": round(grid.seconds, 3)}


def cmd_toy(a: argparse.Namespace) -> dict:
    from lft_core.flow.toy import run_toy

    result = run_toy(a.dataset, a.method, a.steps, k=a.k, n_points=a.points, seed=a.seed)
    out = result.to_json()
    print(f"{a.dataset} {a.method}: data R {out['data_recoupling_ratio']:.3f}, endpoint MSE "
          f"{out['endpoint_mse']:.4f}, recoupled by the flow {out['flow_recoupled_fraction']:.3f} "
          f"({out['seconds']:.1f} s)")
    return out


def cmd_flows(a: argparse.Namespace) -> dict:
    from lft_core.flow.store import delete_flow, list_flows

    if a.delete:
        delete_flow(a.delete)
        print(f"deleted flow {a.delete}")
        return {"deleted": a.delete}
    flows = list_flows()
    for f in flows:
        if f.error:
            print(f"{f.name}: {f.error}")
        else:
            done = lambda v: "?" if v is None else v  # noqa: E731
            print(f"{f.name}: {f.model} span {f.span} {f.method.upper()} k={f.k} {f.status} "
                  f"({done(f.steps_done)}/{done(f.steps)} steps)")
    if not flows:
        print("no saved flows")
    keep = ("name", "model", "span", "method", "k", "status", "steps_done", "steps", "error")
    return {"flows": [{k: (list(getattr(f, k)) if k == "span" else getattr(f, k)) for k in keep
                       if getattr(f, k) is not None and not (f.error and k == "method")} for f in flows]}


def cmd_bench(a: argparse.Namespace) -> dict:
    from lft_core.run import bench

    return bench.run(a.what.split(","), a.model)


def cmd_demo(a: argparse.Namespace) -> dict:
    """Build the demo (cache, recoupling and affine grids, flows: ``lft_core.run.demo``), or with --status say how far
    it is."""
    from lft_core.run.demo import DemoSettings, demo_status, prepare_demo

    train = {key: value for key, value in (("steps", a.steps), ("distill_steps", a.distill_steps),
                                           ("windows", a.train_windows), ("heldout_windows", a.heldout_windows),
                                           ("batch", a.batch)) if value is not None}
    settings = DemoSettings(model=a.model, corpus=a.corpus, seq_len=a.seq_len, windows=a.windows, pairs=a.pairs,
                            blocks=a.blocks, train=train)
    if a.status:
        status = demo_status(settings)
        print(status.line)
        for i, (label, state) in enumerate(status.steps, 1):
            print(f"  {i}. [{state}] {label}")
        return status.to_json()
    stop_file = Path(a.stop_file) if a.stop_file else None
    write = _progress_writer(Path(a.progress_file)) if a.progress_file else None
    job_dir = Path(a.progress_file).parent if a.progress_file else None
    job = job_dir.name if job_dir is not None and (job_dir / "job.json").is_file() else None

    def progress(event: dict) -> None:
        if write is not None:
            write(event)
        state, where = event.get("state"), f"[{event['step']}/{event['steps']}] {event['label']}"
        if state == "start" and event.get("detail"):
            print(f"{where}: {event['detail']}", file=sys.stderr)
        elif state == "start":
            print(f"{where} ...", file=sys.stderr)
        elif state in ("done", "skipped", "stopped", "failed"):
            what = {"done": f"done in {event.get('seconds', 0):.1f} s", "skipped": "done already",
                    "stopped": "stopped", "failed": f"failed: {event.get('error')}"}[state]
            print(f"{where}: {what}", file=sys.stderr)

    result = prepare_demo(settings, progress=progress, should_stop=(lambda: stop_file.exists()) if stop_file else None,
                          verbose=True, job=job)
    print(result.summary())
    return result.to_json()


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "cache": cmd_cache, "train": cmd_train, "eval": cmd_eval, "recoupling": cmd_recoupling, "toy": cmd_toy,
    "flows": cmd_flows, "bench": cmd_bench, "baselines": cmd_baselines, "sweep": cmd_sweep, "demo": cmd_demo,
}


def add_config_arguments(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a settings dataclass (``training.setting``): ``--seq-len`` for ``seq_len``, help,
    default, type and choices from the field, ``--x/--no-x`` for booleans. The settings are spelt once."""
    for f in (f for f in dataclasses.fields(config) if f.name not in skip):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        kw: dict = {"help": meta.get("help"), "default": f.default}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, Span):
            kw.update(type=_span, required=meta.get("required", False))
            del kw["default"]
        else:
            kw["type"] = _positive if meta.get("positive") else meta.get("type", type(f.default))
            if "choices" in meta:  # a registry's names are read when the parser is built
                choices = meta["choices"]
                kw["choices"] = list(choices() if callable(choices) else choices)
        parser.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lft_core", description="LFT Explorer engine (Latent Flow Transformers)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, corpus: bool = True) -> None:
        sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a folder")
        if corpus:
            sp.add_argument("--corpus", default=DEFAULT_CORPUS,
                            help="english (default), builtin (Python docs), a .txt/.jsonl file or folder, hf:NAME")
        sp.add_argument("--json", metavar="PATH", help="write the results as JSON here")
        sp.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")
        placement(sp)

    def placement(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default=None, help="where the teacher runs: cpu, cuda, cuda:N (default: cpu; "
                                                       "under torchrun each rank's own GPU when there are GPUs)")
        sp.add_argument("--device-map", choices=list(DEVICE_MAPS), default=None,
                        help="spread a teacher too big for one device over GPUs, CPU and disk (Accelerate)")
        sp.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB")

    c = sub.add_parser("cache", help="cache hidden states of a model over a corpus")
    common(c)
    c.add_argument("--seq-len", type=_positive, default=128)
    c.add_argument("--windows", type=_positive, default=64)
    c.add_argument("--layers", default="all", help="all, a:b or 0,6,12")
    c.add_argument("--split", choices=["train", "heldout"], default="train")
    c.add_argument("--batch-size", type=_positive, default=8)

    t = sub.add_parser("train", help="train a latent flow replacing a span")
    add_config_arguments(t, TrainConfig)
    t.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    t.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")
    t.add_argument("--resume", action="store_true", help="continue from the flow's last checkpoint (any number of ranks)")
    placement(t)
    t.add_argument("--progress-file", help=argparse.SUPPRESS)
    t.add_argument("--stop-file", help=argparse.SUPPRESS)

    w = sub.add_parser("sweep", help="train the grid spans x methods x k x seeds, one flow after another "
                                     "(resumable: run it again to continue)")
    w.add_argument("--spans", required=True, help="comma list of spans, e.g. 6:12,12:18")
    w.add_argument("--methods", default="fw", help="comma list of methods: fw, sfm, hybrid (default fw)")
    w.add_argument("--k", default="3", help="comma list of integration steps, e.g. 1,3 (default 3)")
    w.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2 (default 0)")
    w.add_argument("--name", default=None, metavar="PREFIX",
                   help="sweep name; flows are PREFIX-M-N-METHOD-kK-sSEED (default: from the model and steps)")
    add_config_arguments(w, TrainConfig, skip=("span", "method", "k", "seed", "name", "sweep"))
    w.add_argument("--json", metavar="PATH", help="write the runs (name, span, method, k, seed, status, final "
                                                  "loss, held-out NMSE, seconds) as JSON here")
    w.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")
    placement(w)
    w.add_argument("--progress-file", help=argparse.SUPPRESS)
    w.add_argument("--stop-file", help=argparse.SUPPRESS)

    e = sub.add_parser("eval", help="KL / NMSE / PPL of a flow against the teacher and layer skipping")
    e.add_argument("--flow", required=True, help="flow name (in cache/flows) or folder")
    e.add_argument("--model", default=None, help="defaults to the flow's model")
    e.add_argument("--text", help="evaluate on this text file instead of held-out corpus windows")
    e.add_argument("--corpus", default=None, help="held-out windows of this corpus (default: the flow's own)")
    e.add_argument("--windows", type=_positive, default=16)
    e.add_argument("--seq-len", type=_positive, default=None)
    e.add_argument("--k", type=_int_list, default=[1, 2, 3], help="LFT integration steps, e.g. 1,2,3")
    e.add_argument("--skip", type=_int_list, default=[1, 2, 3], help="skip-k baselines, e.g. 1,2,3")
    e.add_argument("--baselines", type=_baseline_list, default=[],
                   help="baselines to add beside skip-k (--skip), comma list of registered names, e.g. affine "
                        "(fitted on the flow's training data)")
    e.add_argument("--json", metavar="PATH")
    placement(e)

    a_ = sub.add_parser("baselines", help="what-if baselines without training: skip-k and the closed-form affine "
                                          "replacement of one span, or the affine grid of every span")
    common(a_)
    a_.add_argument("--span", type=_span, default=None, help="M:N: skip-k and affine rows for this span")
    a_.add_argument("--spans", default=None, help="all or M:N,M:N: the affine held-out NMSE grid")
    a_.add_argument("--skip", type=_int_list, default=[1, 2, 3], help="skip-k baselines, e.g. 1,2,3")
    a_.add_argument("--baselines", type=_baseline_list, default=[],
                    help="--span: comma list of registered baselines (default: every one)")
    a_.add_argument("--text", help="evaluate on this text file instead of held-out corpus windows")
    a_.add_argument("--windows", type=_positive, default=16, help="held-out windows to evaluate on")
    a_.add_argument("--seq-len", type=_positive, default=128)
    a_.add_argument("--fit-windows", type=_positive, default=256, help="training windows the affine map is fitted on")
    a_.add_argument("--heldout-windows", type=_positive, default=16, help="held-out windows that choose the ridge")
    a_.add_argument("--grid-windows", type=_positive, default=16,
                    help="--spans: training windows of the all-layer cache (the recoupling grid's)")
    a_.add_argument("--grid-heldout-windows", type=_positive, default=4, help="--spans: held-out windows scored")

    r = sub.add_parser("recoupling", help="recoupling ratio of every span (optimal transport vs true pairing)")
    common(r)
    r.add_argument("--pairs", type=_pairs, default=512,
                   help=f"token pairs sampled per span (at most {MAX_PAIRS}: the cost matrix is pairs² float64)")
    r.add_argument("--spans", default="all", help="all or M:N,M:N")
    r.add_argument("--seq-len", type=_positive, default=128)
    r.add_argument("--windows", type=_positive, default=16)
    r.add_argument("--include-first", action="store_true", help="keep position 0 (attention sinks)")
    r.add_argument("--seed", type=_seed, default=0)

    y = sub.add_parser("toy", help="2-D teaching lab: SFM vs Flow Walking on paired point clouds")
    y.add_argument("--dataset", default="mirror", help="mirror, rotation, swap or identity")
    y.add_argument("--method", choices=["sfm", "fw", "hybrid"], default="fw")
    y.add_argument("--steps", type=_positive, default=1500)
    y.add_argument("--k", type=_positive, default=3)
    y.add_argument("--points", type=_positive, default=256)
    y.add_argument("--seed", type=_seed, default=0)
    y.add_argument("--json", metavar="PATH")

    f = sub.add_parser("flows", help="list the saved flows, or delete one")
    f.add_argument("--delete", metavar="NAME", help="delete this flow (refused while a job trains it)")
    f.add_argument("--json", metavar="PATH")

    b = sub.add_parser("bench", help="benchmarks (see docs/BENCHMARKS.md)")
    b.add_argument("--what", default="cache,train,recoupling,umap",
                   help="comma list of benchmarks: cache, train, recoupling, umap, baselines")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--json", metavar="PATH")

    d = sub.add_parser("demo", help="build everything the pages need for a ready-made story: the all-layer cache, "
                                    "the recoupling and affine grids, and SFM and FW flows on a low-R and a high-R "
                                    "span (idempotent: a second run does nothing; resumable after a kill)")
    d.add_argument("--status", action="store_true", help="only say how far the demo of these settings is")
    d.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a folder")
    d.add_argument("--corpus", default=DEFAULT_CORPUS, help="english (default), builtin, a .txt/.jsonl file or folder")
    d.add_argument("--seq-len", type=_positive, default=128, help="tokens per window (the cache's and the flows')")
    d.add_argument("--windows", type=_positive, default=16, help="windows of the all-layer cache the grids use")
    d.add_argument("--pairs", type=_pairs, default=256, help="token pairs per span of the recoupling grid")
    d.add_argument("--blocks", type=_positive, default=6, help="blocks in each of the two demo spans")
    d.add_argument("--steps", type=_positive, default=None, help="flow steps per flow (default: the recipe's)")
    d.add_argument("--distill-steps", type=int, default=None,
                   help="distillation steps per flow (default: the recipe's)")
    d.add_argument("--train-windows", type=_positive, default=None,
                   help="training windows per flow (default: the recipe's)")
    d.add_argument("--heldout-windows", type=_positive, default=None,
                   help="held-out windows per flow (default: the recipe's)")
    d.add_argument("--batch", type=_positive, default=None, help="windows per training step (default: the recipe's)")
    d.add_argument("--json", metavar="PATH", help="write the result (steps with state and seconds, spans, flows) here")
    d.add_argument("--progress-file", help=argparse.SUPPRESS)
    d.add_argument("--stop-file", help=argparse.SUPPRESS)
    return p


DISTRIBUTED_COMMANDS = ("cache", "train")
"""Commands that run under torchrun (``torchrun --nproc-per-node N -m lft_core <command> ...``)."""


def main(argv: list[str] | None = None) -> int:
    from lft_core import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval":
        args.corpus_given = args.corpus is not None
    start = time.perf_counter()
    dist = distributed.current()
    quiet = None
    try:
        if distributed.launched_by_torchrun():
            dist = distributed.init_from_env()
            if dist.active and args.command not in DISTRIBUTED_COMMANDS:
                raise LFTError(f"`{args.command}` runs in one process; under torchrun only "
                               f"{' and '.join(DISTRIBUTED_COMMANDS)} do (start it with python -m lft_core)")
        if not dist.main:  # every rank's results equal rank 0's, which alone prints and writes them
            quiet, sys.stdout = sys.stdout, open(os.devnull, "w")
        if dist.main:
            check_output_path(getattr(args, "json", None))  # before any work: an hour of evaluation is never lost
        result = COMMANDS[args.command](args)
        result.setdefault("wall_seconds", round(time.perf_counter() - start, 3))
        if dist.main:
            _write_json(getattr(args, "json", None), result)
    except LFTError as e:
        print(f"{_who(dist)}error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine said no (a full disk, a read-only folder, a vanished file): one line
        where = f" ({e.filename})" if e.filename else ""
        print(f"{_who(dist)}error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_who(dist)}error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not (dist.active and distributed.lost_a_peer(e)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split("] ", 1)[-1][:160]  # drop the C++ source location gloo puts first
        print(f"{_who(dist)}error: another rank of this run stopped ({first}); every rank ends here, and what "
              f"was last saved (checkpoint, cache entry) is intact", file=sys.stderr)
        return 1
    finally:
        if quiet is not None:
            sys.stdout.close()
            sys.stdout = quiet
        distributed.shutdown()
    return 0


def _who(dist) -> str:
    """Error lines of ranks other than 0 say which rank speaks."""
    return f"rank {dist.rank}: " if not dist.main else ""
