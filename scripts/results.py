"""Train SFM and FW flows for two spans of the embedded model and compare them with layer skipping.

Flow matching only, on the Python-docs corpus (``builtin``): the settings of docs/RESULTS.md section 2, which
predate the default recipe (English corpus, then distillation; its grid is ``scripts/recipe_grid.py``).

    .venv/bin/python scripts/results.py [--steps 400] [--spans 6:12,12:18]

Writes docs/results.json and the tables in docs/RESULTS.md (between the RESULTS markers).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lft_core.outputs import check_output_file, write_output_json  # noqa: E402
from lft_core.errors import LFTError  # noqa: E402
from lft_core.analysis.evaluation import EvalResult, eval_windows, lft_rows, skip_rows, stream_metrics  # noqa: E402
from lft_core.model.loading import load_teacher  # noqa: E402
from lft_core.span import Span  # noqa: E402
from lft_core.flow.store import flows_dir, open_flow  # noqa: E402
from lft_core.flow.config import TrainConfig  # noqa: E402
from lft_core.flow.training import train_flow  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--spans", default="6:12,12:18")
    p.add_argument("--methods", default="sfm,fw")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "docs" / "results.json"))
    a = p.parse_args()
    try:  # before any work: a regular file or a new name, outside the cache, never through a link
        check_output_file(a.out, "--out")
    except LFTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    teacher = load_teacher("smollm2-135m")
    ids = eval_windows(teacher, "builtin", None, a.eval_windows, 128)
    teacher_ppl = stream_metrics(teacher, ids, [None])[0][1]
    best = {}  # skip-k at the best position does not depend on the span: search once
    out = {"command": " ".join(sys.argv), "steps": a.steps, "batch": a.batch, "eval_tokens": int(ids.numel()),
           "runs": []}
    for span_text in a.spans.split(","):
        span = Span.parse(span_text).check(teacher.n_layers)
        span_skips = skip_rows(teacher, span, ids, (1, 2, 3), best_skip=False)
        for method in a.methods.split(","):
            name = f"results-{span[0]}-{span[1]}-{method}-s{a.steps}"
            cfg = TrainConfig(span=span, method=method, steps=a.steps, batch=a.batch, corpus="builtin",
                              distill_steps=0, name=name)
            t = time.perf_counter()
            try:  # reuse a finished run of the same settings
                flow, saved = open_flow(name, teacher)
                assert saved.get("status") == "complete" and saved.get("steps_done") == a.steps
                tr = {"name": name, "reused": True, "heldout_nmse": saved["history"][-1].get("heldout_nmse")}
            except Exception:  # an unfinished run of the same name is continued, never overwritten
                resume = (flows_dir() / name).is_dir()
                tr = train_flow(cfg, teacher=teacher, verbose=False, resume=resume).to_json()
                flow, _ = open_flow(name, teacher)
            if not best:
                best["rows"] = [r for r in skip_rows(teacher, span, ids, (1, 2, 3), best_skip=True)
                                if r.where == "best"]
            ev = EvalResult(span=span, tokens=int(ids.numel()), teacher_ppl=teacher_ppl,
                            rows=lft_rows(teacher, flow, ids) + span_skips + best["rows"])
            print(ev.table(), flush=True)
            out["runs"].append({"span": list(span), "method": method, "train": tr,
                                "eval": ev.to_json(), "seconds": round(time.perf_counter() - t, 1)})
            write_output_json(a.out, out, "--out", indent=1)


if __name__ == "__main__":
    main()
