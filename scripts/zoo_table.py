"""The zoo table of docs/RESULTS.md: every shipped flow on held-out text of every domain (each part of the mixture
and the Debian licences, text no corpus of the project ships), against skip-k (k = 1..3, the first k blocks of
its span and the best position of the model on that domain) and the affine map of its span (fitted on the flow's
own training windows), with its training budget and device.

    .venv/bin/python scripts/zoo_table.py --out docs/raw/zoo_domains.jsonl      # ~10 min on 2 cores
    .venv/bin/python scripts/zoo_table.py --render docs/raw/zoo_domains.jsonl   # the markdown tables

One skip-k grid per domain (every start, k = 1..3) serves every flow; rows go to --out as JSON lines.
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

SKIPS = (1, 2, 3)


def measure(out: Path, windows: int) -> None:
    from lft_core.analysis.baselines import FitData, prepare
    from lft_core.analysis.comparison import best_skips, skip_kl_grid
    from lft_core.analysis.evaluation import eval_windows, evaluate
    from lft_core.data.corpus import DEFAULT, evaluation_domains
    from lft_core.flow.store import load_flow
    from lft_core.model.loading import load_teacher
    from lft_core.zoo import shipped_flows

    teacher = load_teacher()
    flows = [f for f in shipped_flows() if f.config.get("weights_hash") == teacher.weights_hash]
    loaded = {f.name: load_flow(f.dir) for f in flows}
    affine = {}
    for f in flows:
        if f.span not in affine:
            affine[f.span] = prepare("affine", teacher, f.span, FitData.of_flow(f.config))
    with open(out, "w") as sink:
        for domain in evaluation_domains(DEFAULT):
            t0 = time.time()
            ids = eval_windows(teacher, domain, None, windows, 128)
            grid = skip_kl_grid(teacher, ids, SKIPS)
            at = {(r.start, r.k): r for r in grid}
            best = best_skips(grid)
            teacher_ppl = None
            rows = []
            for f in flows:
                flow, config = loaded[f.name]
                k = int(config.get("k", 3))
                result = evaluate(teacher, flow, None, ids, ks=(k,), skips=(), best_skip=False)
                teacher_ppl = result.teacher_ppl
                r = result.rows[0]
                rows.append({"flow": f.name, "method": f.method, "span": list(f.span), "row": "flow", "k": k,
                             "kl": r.kl, "nmse": r.nmse, "ppl": r.ppl})
            for span, prepared in affine.items():
                r = evaluate(teacher, None, span, ids, ks=(), skips=(), best_skip=False, baselines=[prepared]).rows[0]
                rows.append({"span": list(span), "row": "affine", "kl": r.kl, "nmse": r.nmse, "ppl": r.ppl})
                for k in SKIPS:
                    s = at[(span[0], k)]
                    rows.append({"span": list(span), "row": "skip in span", "k": k, "start": s.start, "kl": s.kl,
                                 "ppl": s.ppl})
            for k, s in best.items():
                rows.append({"row": "skip best", "k": k, "start": s.start, "kl": s.kl, "ppl": s.ppl})
            for row in rows:
                sink.write(json.dumps({"domain": domain, "windows": windows, "teacher_ppl": teacher_ppl, **row}) + "\n")
            sink.flush()
            print(f"{domain}: {len(rows)} rows, {time.time() - t0:.0f} s", file=sys.stderr)


def render(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    short = {d: d.split(":", 1)[-1].replace("debian-licences", "licences") for d in domains}

    def cell(pred) -> list[str]:
        out = []
        for d in domains:
            hit = [r for r in rows if r["domain"] == d and pred(r)]
            out.append(f"{hit[0]['kl']:.3f}" if hit else "")
        return out

    lines = []
    spans = sorted({tuple(r["span"]) for r in rows if r["row"] == "flow"})
    for span in spans:
        m, n = span
        lines.append(f"**Span {m}:{n}** ({n - m} blocks), KL(teacher ‖ model) per token, {rows[0]['windows']} held-out "
                     f"windows × 128 tokens per domain:\n")
        lines.append("| | " + " | ".join(short[d] for d in domains) + " |")
        lines.append("|---|" + "---|" * len(domains))
        for r in [r for r in rows if r["row"] == "flow" and tuple(r["span"]) == span and r["domain"] == domains[0]]:
            lines.append(f"| {r['flow']} ({r['method'].upper()}, k={r['k']}) | "
                         + " | ".join(cell(lambda x, name=r["flow"]: x["row"] == "flow" and x["flow"] == name)) + " |")
        lines.append("| affine map | " + " | ".join(cell(lambda x: x["row"] == "affine" and tuple(x["span"]) == span))
                     + " |")
        for k in SKIPS:
            lines.append(f"| skip-{k} in span | " + " | ".join(
                cell(lambda x, k=k: x["row"] == "skip in span" and x["k"] == k and tuple(x["span"]) == span)) + " |")
        lines.append("")
    lines.append("Skip-k at its best position (the same for every span; start block per domain in the raw file):\n")
    lines.append("| | " + " | ".join(short[d] for d in domains) + " |")
    lines.append("|---|" + "---|" * len(domains))
    for k in SKIPS:
        lines.append(f"| skip-{k} best | " + " | ".join(cell(lambda x, k=k: x["row"] == "skip best" and x["k"] == k))
                     + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="measure and write JSON lines here")
    p.add_argument("--windows", type=int, default=16, help="held-out windows of 128 tokens per domain")
    p.add_argument("--render", help="print the markdown tables of a written file")
    a = p.parse_args()
    if a.out:
        measure(Path(a.out), a.windows)
    if a.render or a.out:
        print(render(Path(a.render or a.out)))


if __name__ == "__main__":
    main()
