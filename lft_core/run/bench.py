"""Benchmarks (``python -m lft_core bench --what ...``): each returns a dict of what it measured.

Not a test: numbers depend on the machine. docs/BENCHMARKS.md records them with the command that made them.
"""
from __future__ import annotations

import gc
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lft_core.data.activations import ensure_activations
from lft_core.data.corpus import load_corpus, make_windows


def machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_cache(teacher, windows: int = 32, seq_len: int = 128, batch: int = 8, repeats: int = 2) -> dict:
    """Caching every layer vs a plain ``model(input_ids)`` forward over the same windows (best of repeats)."""
    corpus = load_corpus("builtin")
    ids = torch.from_numpy(make_windows(corpus, teacher.tokenizer, seq_len, windows).astype(np.int64))
    tokens = ids.numel()
    with torch.no_grad():
        teacher.model(ids[:batch], use_cache=False)  # warm-up
    fwd = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(0, windows, batch):
                teacher.model(ids[s : s + batch], use_cache=False)
        fwd.append(time.perf_counter() - t)
    cache = []
    for _ in range(repeats):
        root = Path(tempfile.mkdtemp(prefix="lft-bench-"))
        try:
            t = time.perf_counter()
            ensure_activations(teacher, corpus, seq_len, windows, range(teacher.n_layers + 1), progress=False,
                               root=root, batch_size=batch)
            cache.append(time.perf_counter() - t)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    f, c = min(fwd), min(cache)
    return {"windows": windows, "seq_len": seq_len, "tokens": tokens, "layers": teacher.n_layers + 1,
            "forward_seconds": round(f, 3), "cache_seconds": round(c, 3),
            "forward_tokens_per_s": round(tokens / f, 1), "cache_tokens_per_s": round(tokens / c, 1),
            "ratio": round(f / c, 3)}


def bench_train(teacher, span=(6, 12), steps: int = 20, batch: int = 8, seq_len: int = 128, k: int = 3,
                device: str | None = None) -> dict:
    """Steps/s and tokens/s of SFM and FW (k steps) on random pairs of the teacher's width, and peak memory."""
    from lft_core.flow.field import VelocityField
    from lft_core.flow.latent import LatentFlow
    from lft_core.flow.methods import compute_loss

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": device, "span": list(span), "batch": batch, "seq_len": seq_len, "k": k, "steps": steps}
    for method in ("sfm", "fw"):
        torch.manual_seed(0)
        flow = LatentFlow(VelocityField(teacher.field_spec()), span=span).to(device)
        opt = torch.optim.AdamW(flow.field.parameters(), lr=1e-4)
        x0 = torch.randn(batch, seq_len, teacher.d_model, device=device)
        x1 = torch.randn(batch, seq_len, teacher.d_model, device=device)
        gen = torch.Generator().manual_seed(0)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps + 2):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                loss = compute_loss(method, flow.velocity, x0, x1, k, 0.1, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:  # skip warm-up steps
                times.append(time.perf_counter() - t)
        sec = float(np.median(times))
        out[method] = {"steps_per_s": round(1 / sec, 3), "tokens_per_s": round(batch * seq_len / sec, 1),
                       "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                       if device.startswith("cuda") else round(peak_rss_mib(), 1)}
        del flow, opt
        gc.collect()
    out["fw_cost_vs_sfm"] = round(out["sfm"]["steps_per_s"] / out["fw"]["steps_per_s"], 2)
    return out


def bench_recoupling(teacher, pairs: int = 512, windows: int = 16, seq_len: int = 128) -> dict:
    """Recoupling grid over every span from an all-layer cache (cache time reported separately)."""
    from lft_core.analysis.recoupling import all_layer_cache
    from lft_core.analysis.recoupling import recoupling_grid

    t = time.perf_counter()
    cache = all_layer_cache(teacher, "builtin", seq_len, windows, progress=False)
    cache_s = time.perf_counter() - t
    grid = recoupling_grid(cache.layer, teacher.n_layers, pairs=pairs)
    return {"layers": teacher.n_layers, "spans": int(np.isfinite(grid.matrix).sum()), "pairs": pairs,
            "grid_seconds": round(grid.seconds, 2), "cache_seconds": round(cache_s, 2), "cache_hit": cache.hit}


def bench_baselines(teacher, span=(12, 18), windows: int = 16, seq_len: int = 128, fit_windows: int = 256,
                    eval_windows_: int = 16) -> dict:
    """The affine baseline: the grid of every span from the all-layer caches (cache time reported apart), one
    span's fit on ``fit_windows`` cached training windows, and its evaluation (one spliced forward per window)."""
    from lft_core.analysis.affine import affine_grid, fit_affine_for_span
    from lft_core.analysis.baselines import Prepared, get_baseline
    from lft_core.analysis.recoupling import all_layer_cache
    from lft_core.analysis.evaluation import eval_windows, evaluate

    t = time.perf_counter()
    train = all_layer_cache(teacher, "builtin", seq_len, windows, progress=False)
    held = ensure_activations(teacher, load_corpus("builtin"), seq_len, 4, range(teacher.n_layers + 1), "heldout",
                              progress=False)
    cache_s = time.perf_counter() - t
    grid = affine_grid(train.layer, held.layer, teacher.n_layers)
    fit_affine_for_span(teacher, span, "builtin", seq_len, fit_windows, 16, progress=False)  # caches h_m, h_n
    t = time.perf_counter()
    affine = fit_affine_for_span(teacher, span, "builtin", seq_len, fit_windows, 16, progress=False)
    fit_s = time.perf_counter() - t
    ids = eval_windows(teacher, "builtin", None, eval_windows_, seq_len)
    t = time.perf_counter()
    result = evaluate(teacher, None, span, ids, ks=[], skips=[], baselines=[Prepared(get_baseline("affine"), affine)])
    eval_s = time.perf_counter() - t
    return {"layers": teacher.n_layers, "spans": int(np.isfinite(grid.matrix).sum()), "grid_windows": windows,
            "grid_tokens": grid.tokens, "grid_heldout_tokens": grid.heldout_tokens,
            "grid_seconds": round(grid.seconds, 2), "cache_seconds": round(cache_s, 2), "span": list(span),
            "fit_windows": fit_windows, "fit_seconds": round(fit_s, 2), "eval_tokens": int(ids.numel()),
            "eval_seconds": round(eval_s, 2), "affine_kl": round(result.rows[0].kl, 4)}


def bench_umap(points: int = 20_000, d: int = 576, seed: int = 0) -> dict:
    """UMAP (PCA to 50 dims first) of ``points`` random clustered points, then the cached reopen."""
    from lft_core.analysis.projection import project

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d)) * 5
    x = (centres[rng.integers(0, 20, points)] + rng.normal(size=(points, d))).astype(np.float32)
    cache = Path(tempfile.mkdtemp(prefix="lft-umap-"))
    try:
        first = project(x, "umap", seed=seed, cache_dir=cache)
        t = time.perf_counter()
        again = project(x, "umap", seed=seed, cache_dir=cache)
        reopen = time.perf_counter() - t
        pca = project(x, "pca", seed=seed, cache_dir=cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert again.cached
    return {"points": points, "d": d, "umap_seconds": round(first.seconds, 2), "reopen_seconds": round(reopen, 4),
            "pca_seconds": round(pca.seconds, 3)}


def run(what: list[str], model: str = "smollm2-135m") -> dict:
    """Run the named benchmarks (cache, train, recoupling, umap, baselines) and return their figures."""
    from lft_core.errors import LFTError
    from lft_core.model.loading import load_teacher

    known = {"cache", "train", "recoupling", "umap", "baselines"}
    unknown = set(what) - known
    if unknown:
        raise LFTError(f"unknown benchmark(s) {sorted(unknown)}; known: {sorted(known)}")
    out: dict = {"machine": machine()}
    teacher = load_teacher(model) if set(what) & {"cache", "train", "recoupling", "baselines"} else None
    for name in what:
        t = time.perf_counter()
        if name == "cache":
            out["cache"] = bench_cache(teacher)
        elif name == "train":
            out["train"] = bench_train(teacher)
        elif name == "recoupling":
            out["recoupling"] = bench_recoupling(teacher)
        elif name == "umap":
            out["umap"] = bench_umap()
        elif name == "baselines":
            out["baselines"] = bench_baselines(teacher)
        print(f"{name}: {out[name]} ({time.perf_counter() - t:.1f} s)", flush=True)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return out
