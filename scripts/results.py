"""Train SFM and FW flows for two spans of the embedded model and compare them with layer skipping.

    .venv/bin/python scripts/results.py [--steps 400] [--spans 6:12,12:18]

Writes docs/results.json and the tables in docs/RESULTS.md (between the RESULTS markers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lft_core.evaluation import eval_windows, evaluate  # noqa: E402
from lft_core.teacher import load_teacher  # noqa: E402
from lft_core.training import TrainConfig, open_flow, train_flow  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--spans", default="6:12,12:18")
    p.add_argument("--methods", default="sfm,fw")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "docs" / "results.json"))
    a = p.parse_args()
    teacher = load_teacher("smollm2-135m")
    ids = eval_windows(teacher, "builtin", None, a.eval_windows, 128)
    out = {"command": " ".join(sys.argv), "steps": a.steps, "batch": a.batch, "eval_tokens": int(ids.numel()),
           "runs": []}
    for span_text in a.spans.split(","):
        span = tuple(int(x) for x in span_text.split(":"))
        for method in a.methods.split(","):
            name = f"results-{span[0]}-{span[1]}-{method}-s{a.steps}"
            cfg = TrainConfig(span=span, method=method, steps=a.steps, batch=a.batch, name=name)
            t = time.perf_counter()
            tr = train_flow(cfg, teacher=teacher)
            flow, _ = open_flow(name, teacher)
            ev = evaluate(teacher, flow, span, ids, ks=(1, 2, 3), skips=(1, 2, 3))
            print(ev.table(), flush=True)
            out["runs"].append({"span": list(span), "method": method, "train": tr.to_json(),
                                "eval": ev.to_json(), "seconds": round(time.perf_counter() - t, 1)})
            Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
