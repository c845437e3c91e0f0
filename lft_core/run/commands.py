"""The commands of ``python -m lft_core``: each takes the parsed arguments, calls library functions, prints a
readable summary to stdout (progress to stderr) and returns its results as a dict (``--json`` writes it).
Parsing, output paths and errors are ``cli``'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lft_core.errors import LFTError
from lft_core.flow.config import TrainConfig
from lft_core.outputs import write_output_json


def write_result(path: str | None, data: dict) -> None:
    """``--json PATH``: through the one output gate (``outputs.write_output``: checked again at the write)."""
    if path is not None:
        write_output_json(path, data, "--json", indent=2)



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
    from lft_core.flow.training import check_before_loading, train_flow

    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    check_before_loading(cfg, a.resume)  # every setting, the name, a resume's settings: before the model loads
    from lft_core.flow.training import training_estimate

    print(f"training {cfg.name or cfg.default_name()}: {training_estimate(cfg).line()}", file=sys.stderr)
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
    from lft_core.run.sweep import GRID, parse_grid, plan_sweep
    from lft_core.run.sweep_run import run_sweep

    grid = parse_grid(a.spans, a.methods, a.k, a.seeds)  # bad text fails before the model loads
    base = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)
                          if f.name not in (*GRID, "name", "sweep")})
    base.validate()  # the shared settings, as a whole, before the model loads (each cell again with the model)
    stop_file = Path(a.stop_file) if a.stop_file else None
    progress = _progress_writer(Path(a.progress_file)) if a.progress_file else None
    teacher = _teacher(a)
    plan = plan_sweep(base, *grid, prefix=a.name, teacher=teacher)  # the whole grid, before any training
    result = run_sweep(plan, teacher, progress=progress,
                       should_stop=(lambda: stop_file.exists()) if stop_file else None)
    print(result.table())
    out = result.to_json()
    if result.failed:  # the JSON still lists every run
        write_result(a.json, out)
        raise LFTError(f"{len(result.failed)} of {len(result.runs)} runs failed; first: {result.failed[0].name}: "
                       f"{result.failed[0].error}")
    if result.stopped:
        print(f"stopped; run the same command again to continue the sweep {result.prefix}", file=sys.stderr)
    return out


def cmd_eval(a: argparse.Namespace) -> dict:
    from lft_core.analysis.baselines import FitData, get_baseline, prepare
    from lft_core.analysis.evaluation import domain_table, eval_windows, evaluate
    from lft_core.flow.latent import MAX_K
    from lft_core.data.corpus import evaluation_domains, load_corpus, split_rule_of
    from lft_core.flow.store import check_trained_for, open_flow, read_flow_config, resolve_flow, trained_on

    if a.text and a.corpus_given:
        raise LFTError("give either --text or --corpus, not both")
    if a.domains is not None and (a.text or a.corpus_given):
        raise LFTError("give --domains, or --corpus / --text, not both")
    for k in a.k:  # checked before any model is loaded
        if not 1 <= k <= MAX_K:
            raise LFTError(f"--k values must be between 1 and {MAX_K}, got {k}")
    for k in a.skip:
        if k < 1:
            raise LFTError(f"--skip values must be at least 1, got {k}")
    source = resolve_flow(a.flow)  # a bare name is the saved flow; a path has a '/' or starts with '.' or '~'
    read_flow_config(a.flow)  # the record through the one reader: bounded, regular file, schema
    flow, config = open_flow(a.flow)  # proved before any model loads: the weights' hash and their record
    if not (a.model or isinstance(config.get("model"), str)):
        raise LFTError(f"flow {a.flow!r} does not say which model it was trained for (its config.json has no "
                       f"'model' field): pass --model")
    domains = None
    if a.domains is not None:
        named = [d.strip() for d in a.domains.split(",") if d.strip()]
        if not named:
            raise LFTError("--domains is empty: give corpus specs (e.g. mix:fiction,debian-licences) or 'all'")
        domains = evaluation_domains(trained_on(config)) if named == ["all"] else list(dict.fromkeys(named))
        for d in domains:  # a mistyped domain is refused before the model loads
            load_corpus(d)
    teacher = _teacher(a, a.model or config["model"])
    check_trained_for(a.flow, flow, config, teacher)  # model id, weights hash, blocks, field shape
    proof = flow.proof
    if not proof.verified:
        print(f"note: flow {a.flow!r} was {proof.note}", file=sys.stderr)
    if not teacher.dispatched:
        flow.to(teacher.device)
    text = None
    if a.text:
        from lft_core.data.corpus import read_text_file

        text = read_text_file(a.text)  # size limit, empty / binary / not-UTF-8 checks
    seq_len = a.seq_len or config.get("seq_len", 128)
    prepared = []
    for name in a.baselines:  # fitted on the flow's own training data
        baseline = get_baseline(name)
        if baseline.fitted:
            print(f"fitting the {baseline.label} of the flow's span", file=sys.stderr)
        prepared.append(prepare(name, teacher, flow.span, FitData.of_flow(config)))
    flow_source = {**source.to_json(), "verified": proof.verified, "weights_sha256": proof.weights_sha256}
    if domains is not None:
        results = {}
        for d in domains:
            print(f"domain {d}", file=sys.stderr)
            ids = eval_windows(teacher, d, None, a.windows, seq_len)
            results[d] = evaluate(teacher, flow, None, ids, ks=a.k, skips=a.skip,
                                  progress=lambda s: print(s, file=sys.stderr), baselines=prepared)
            results[d].split_rule = split_rule_of(d)
        print(f"flow: {source.kind} {source.path}" + ("" if proof.verified else " (unverified)"), file=sys.stderr)
        print(domain_table(results))
        return {"span": list(flow.span), "domains": {d: r.to_json() for d, r in results.items()},
                "flow_source": flow_source}
    # held-out windows of the flow's own training corpus unless told otherwise
    corpus = a.corpus or trained_on(config)
    ids = eval_windows(teacher, corpus, text, a.windows, seq_len)
    result = evaluate(teacher, flow, None, ids, ks=a.k, skips=a.skip,
                      progress=lambda s: print(s, file=sys.stderr), baselines=prepared)
    result.split_rule = "the given text, whole" if text is not None else split_rule_of(corpus)
    print(f"flow: {source.kind} {source.path}" + ("" if proof.verified else " (unverified)"), file=sys.stderr)
    print(result.table())
    return {**result.to_json(), "flow_source": flow_source}


def _fit_baselines(a: argparse.Namespace) -> dict:
    """``baselines --span M:N --fit-only``: fit the fitted baselines of the span and keep them (the app's background
    fit); the JSON names each fit, where it is kept and what it chose."""
    from lft_core.analysis.baselines import BASELINES, FitData, fit_file, fit_key, get_baseline, prepare

    if a.span is None:
        raise LFTError("--fit-only goes with --span M:N")
    if a.text:
        raise LFTError("--fit-only evaluates nothing: leave out --text")
    names = [n for n in (a.baselines or list(BASELINES)) if get_baseline(n).fitted]
    if not names:
        raise LFTError(f"--fit-only: none of {', '.join(a.baselines)} is fitted (fitted baselines: "
                       f"{', '.join(b for b in BASELINES if get_baseline(b).fitted)})")
    teacher = _teacher(a)
    span = teacher.check_span(*a.span)
    data = FitData(a.corpus, a.seq_len, a.fit_windows, a.heldout_windows, a.sink_weight)
    fits = {}
    for name in names:
        t0 = time.perf_counter()
        p = prepare(name, teacher, span, data)
        summary = p.baseline.fit_summary(p.replacement)
        key = fit_key(name, teacher, span, data)
        fits[name] = {"key": key, "file": str(fit_file(key)), "seconds": round(time.perf_counter() - t0, 3), **summary}
        print(f"{name} fit of {span}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()
                                                     if isinstance(v, (int, float))), file=sys.stderr)
    return {"span": list(span), "model_id": teacher.model_id, "fits": fits}


def cmd_baselines(a: argparse.Namespace) -> dict:
    if (a.span is None) == (a.spans is None):
        raise LFTError("give either --span M:N (baselines of one span) or --spans all (the affine grid)")
    if a.text and a.span is None:
        raise LFTError("--text goes with --span")
    for k in a.skip:
        if k < 1:
            raise LFTError(f"--skip values must be at least 1, got {k}")
    if a.fit_only:
        return _fit_baselines(a)
    if not a.skip and (not a.baselines or "skip" in a.baselines):
        raise LFTError("--skip '' leaves the skip baseline nothing to evaluate: give at least one k (e.g. --skip 1) "
                       "or leave skip out of --baselines")
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
    data = FitData(a.corpus, a.seq_len, a.fit_windows, a.heldout_windows, a.sink_weight)
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
    from lft_core.analysis.recoupling import recoupling_for_model
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
    if a.copy or a.to:
        from lft_core.zoo import copy_flow

        if not (a.copy and a.to):
            raise LFTError("--copy SRC needs --to NEW (and --to needs --copy)")
        target = copy_flow(a.copy, a.to)
        print(f"copied {a.copy} to {a.to} ({target}); train it further with `python -m lft_core train --name {a.to} "
              f"--resume` and its settings, with more --steps")
        return {"copied": a.copy, "to": a.to, "path": str(target)}
    if a.shipped:
        from lft_core.zoo import shipped_flows

        shipped = shipped_flows()
        for s in shipped:
            print(f"{s.name}: {s.config.get('model')} span {s.span[0]}:{s.span[1]} {s.method.upper()} "
                  f"({s.summary()})")
        if not shipped:
            print("no shipped flows")
        return {"shipped": [{"name": s.name, "span": list(s.span), "method": s.method, "provenance": s.provenance}
                            for s in shipped]}
    flows = list_flows()
    for f in flows:
        if f.error:
            print(f"{f.name}: {f.error}")
        else:
            done = lambda v: "?" if v is None else v  # noqa: E731
            print(f"{f.name}: {f.model} span {f.span} {f.method.upper()} k={f.k} {f.status} "
                  f"({done(f.steps_done)}/{done(f.steps)} steps; {f.origin_line})")
    if not flows:
        print("no saved flows")
    keep = ("name", "model", "span", "method", "k", "status", "steps_done", "steps", "error")
    listed = []
    for f in flows:
        row = {k: (list(getattr(f, k)) if k == "span" else getattr(f, k)) for k in keep
               if getattr(f, k) is not None and not (f.error and k == "method")}
        if not f.error:
            row.update(origin=f.origin, origin_line=f.origin_line, provenance=f.provenance)
        listed.append(row)
    return {"flows": listed}


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


def cmd_compare(a: argparse.Namespace) -> dict:
    """The Compare page's evaluation (``analysis.compare_eval``): saved and reused; progress as job events."""
    from lft_core.analysis.baselines import parse_names
    from lft_core.analysis.compare_eval import (CompareRequest, request_key, run_comparison, save_comparison,
                                                saved_comparison, skip_grid_cached)
    from lft_core.data.corpus import load_corpus
    from lft_core.flow.store import read_flow_config

    flows = tuple(dict.fromkeys(n.strip() for n in a.flows.split(",") if n.strip()))
    if not flows and not a.skip_only:
        raise LFTError("--flows is empty: name saved flows (see `python -m lft_core flows`), or ask --skip-only")
    configs = {name: read_flow_config(name) for name in flows}  # a missing flow is refused before the model loads
    baselines = tuple(parse_names(a.baselines)) if a.baselines else ()
    load_corpus(a.corpus)
    write = _progress_writer(Path(a.progress_file)) if a.progress_file else None
    t0 = time.perf_counter()

    def progress(done: int, total: int, what: str) -> None:
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (total - done) if done else None
        if write is not None:
            write({"step": done, "steps": total, "label": what, "eta_s": eta})
        print(f"[{done}/{total}] {what}", file=sys.stderr)

    teacher = _teacher(a)
    request = CompareRequest(flows, a.corpus, a.windows, a.seq_len, a.skip_max, a.best, baselines)
    if a.skip_only:
        grid = skip_grid_cached(teacher, a.corpus, a.windows, a.seq_len, request.ks,
                                lambda d, t: progress(d, t, "skip-k at every position"))
        print(f"skip-k grid: {len(grid)} rows (k = 1..{a.skip_max} at every position)")
        return {"grid": [dataclasses.asdict(r) for r in grid]}
    key = request_key(request, teacher.model_id, teacher.weights_hash,
                      {n: str(c.get("weights_sha256")) for n, c in configs.items()})
    result = saved_comparison(key)
    if result is None:
        result = run_comparison(teacher, request, progress)
        save_comparison(key, result)
    else:
        progress(1, 1, "done (saved earlier)")
    for row in result["flow_rows"]:
        print(f"{row['flow']}: span {row['span']} k={row['k']} KL {row['KL']:.4f} PPL {row['PPL']:.3f}")
    return {**result, "key": key}


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "compare": cmd_compare,
    "cache": cmd_cache, "train": cmd_train, "eval": cmd_eval, "recoupling": cmd_recoupling, "toy": cmd_toy,
    "flows": cmd_flows, "bench": cmd_bench, "baselines": cmd_baselines, "sweep": cmd_sweep, "demo": cmd_demo,
}
