"""Train flows by named recipes and score them against the baselines on held-out text of several domains.

One process loads the teacher once; for each span it fits the affine baseline and measures skip-k (in the
span and at the best position) on each evaluation corpus, then for each recipe trains a flow and measures
it on the same windows. Every row goes to --out as one JSON line as soon as it exists (a killed run keeps
what it measured; a re-run skips flows already trained under the same --tag).

    .venv/bin/python scripts/recipe_grid.py --spans 12:18 --recipes fw400,fw400-kl100 --out docs/recipes.jsonl

trains on the default corpus (the mixture) and evaluates on its domains: each part of the mixture (``mix:PART``,
its held-out chunks) and the Debian licences (text no corpus of the project ships); ``--eval-corpora`` names
others (a comma list of corpus specs).

Recipes (``RECIPES``) are TrainConfig settings over the defaults, with no distillation and 256 windows unless a
recipe says otherwise
(``fw400-w1024-kl200`` is the default recipe since issue #20; ``fw400-kl200`` was, on 256 windows);
`--device cuda` trains and evaluates on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES: dict[str, dict] = {
    "sfm400": {"method": "sfm", "steps": 400},
    "fw400": {"method": "fw", "steps": 400},
    "sfm1200": {"method": "sfm", "steps": 1200},  # about the wall time of fw400 (an FW step costs ~3 SFM steps)
    "fw400-wp1": {"method": "fw", "steps": 400, "waypoints": 1.0},
    "fw400-init": {"method": "fw", "steps": 400, "init_from_teacher": True},
    "fw400-kl100": {"method": "fw", "steps": 400, "distill_steps": 100},
    "fw400-kl200": {"method": "fw", "steps": 400, "distill_steps": 200},
    "fw400-w1024-kl200": {"method": "fw", "steps": 400, "windows": 1024, "distill_steps": 200},  # broader data
    "fw400-w2048-kl200": {"method": "fw", "steps": 400, "windows": 2048, "distill_steps": 200},
    "fw300-kl300": {"method": "fw", "steps": 300, "distill_steps": 300},
    "fw400-wp1-kl100": {"method": "fw", "steps": 400, "waypoints": 1.0, "distill_steps": 100},
    "fw200-kl100": {"method": "fw", "steps": 200, "distill_steps": 100},
    "sfm400-kl100": {"method": "sfm", "steps": 400, "distill_steps": 100},
    "sfm1200-kl200": {"method": "sfm", "steps": 1200, "distill_steps": 200},
    # GPU-length
    "fw3000-w2048-b32": {"method": "fw", "steps": 3000, "windows": 2048, "batch": 32},
    "fw3000-w2048-b32-kl1000": {"method": "fw", "steps": 3000, "windows": 2048, "batch": 32, "distill_steps": 1000,
                                "distill_batch": 8},
    "fw3000-w2048-b32-wp1-kl1000": {"method": "fw", "steps": 3000, "windows": 2048, "batch": 32, "waypoints": 1.0,
                                    "distill_steps": 1000, "distill_batch": 8},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--spans", default="12:18")
    p.add_argument("--recipes", default="fw400")
    p.add_argument("--train-corpus", default="mix")
    p.add_argument("--eval-corpora", default="domains",
                   help="comma list of corpus specs, or 'domains': each part of the mixture and the Debian licences")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--k", default="1,3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="grid")
    p.add_argument("--out", required=True)
    p.add_argument("--no-baselines", action="store_true", help="only the recipes (the baselines are in --out already)")
    a = p.parse_args()
    from lft_core.outputs import open_output_append
    from lft_core.errors import LFTError

    try:  # before the model loads: --out grows line by line, only as a regular file outside the cache
        out = open_output_append(a.out, "--out")
    except LFTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    import torch

    from lft_core.analysis.affine import fit_affine_for_span
    from lft_core.analysis.baselines import Prepared, get_baseline
    from lft_core.analysis.evaluation import eval_windows, evaluate, lft_rows
    from lft_core.model.loading import load_teacher
    from lft_core.span import Span
    from lft_core.flow.store import flows_dir, load_flow
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow

    teacher = load_teacher(a.model, device=a.device)
    ks = [int(k) for k in a.k.split(",")]

    def emit(row: dict) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    from lft_core.data.corpus import evaluation_domains

    corpora = evaluation_domains(a.train_corpus) if a.eval_corpora == "domains" else a.eval_corpora.split(",")
    ids = {c: eval_windows(teacher, c, None, a.eval_windows, 128) for c in corpora}
    for span_text in a.spans.split(","):
        span = Span.parse(span_text)
        if not a.no_baselines:
            t = time.perf_counter()
            affine = fit_affine_for_span(teacher, span, a.train_corpus, 128, 256, 16, progress=False)
            affine.to(a.device)
            fit_s = time.perf_counter() - t
            for c in corpora:
                base = evaluate(teacher, None, span, ids[c], ks=[], skips=[1, 2, 3],
                                baselines=[Prepared(get_baseline("affine"), affine)])
                for r in base.rows:
                    emit({"span": str(span), "eval": c, "model": r.model, "k": r.k, "where": r.where,
                          "start": r.start, "kl": r.kl, "ppl": r.ppl, "nmse": r.nmse, "teacher_ppl": base.teacher_ppl,
                          "fit_seconds": round(fit_s, 1) if r.model == "affine" else None})
        for recipe in a.recipes.split(","):
            name = f"{a.tag}-{span.m}-{span.n}-{recipe}"
            # a recipe says all it changes from plain training: no distillation, 256 windows (the default before
            # issue #20 made it 1,024, so that every recipe name keeps meaning what it meant)
            settings = {"distill_steps": 0, "windows": 256, **RECIPES[recipe]}
            cfg = TrainConfig(model=a.model, corpus=a.train_corpus, span=span, name=name, **settings)
            t = time.perf_counter()
            if not (flows_dir() / name / "config.json").exists():
                train_flow(cfg, teacher=teacher, device=a.device, verbose=False)
            train_s = time.perf_counter() - t
            flow, config = load_flow(flows_dir() / name, map_location=a.device)
            for c in corpora:
                for r in lft_rows(teacher, flow, ids[c], ks):
                    emit({"span": str(span), "eval": c, "model": "lft", "recipe": recipe, "k": r.k, "kl": r.kl,
                          "ppl": r.ppl, "nmse": r.nmse, "train_seconds": round(train_s, 1),
                          "train_corpus": a.train_corpus, "device": a.device, "flow": name})
    out.close()


if __name__ == "__main__":
    main()
