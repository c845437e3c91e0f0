"""Markdown tables of a recipe grid (the JSON lines `scripts/recipe_grid.py` writes), one table per span.

    .venv/bin/python scripts/render_recipes.py docs/raw/recipes_cpu.jsonl [--k 3] [--labels english=English,...]

Columns are the evaluation corpora (KL of the LM logits, the end-point NMSE, the perplexity); rows are the recipes,
then the affine replacement and skip-k (in the span and at the best position). The last row of a recipe wins
when a file holds it twice.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _label(spec: str, labels: dict[str, str]) -> str:
    if spec.startswith("mix:") and spec not in labels:
        return spec[4:]  # a part of the mixture, by its name
    return labels.get(spec) or labels.get(Path(spec).name) or Path(spec).name


def render(rows: list[dict], k: int, labels: dict[str, str], kl_only: bool = False) -> str:
    out: list[str] = []
    trained_on = [r.get("train_corpus") for r in rows if r["model"] == "lft"]
    main_corpus = max(set(trained_on), key=trained_on.count) if trained_on else None  # others are named
    spans = list(dict.fromkeys(r["span"] for r in rows))
    for span in spans:
        mine = [r for r in rows if r["span"] == span]
        corpora = list(dict.fromkeys(r["eval"] for r in mine))
        cells: dict[tuple[str, str], dict] = {}
        seconds: dict[str, float] = {}
        for r in mine:
            if r["model"] == "lft":
                if r["k"] != k:
                    continue
                trained = r.get("train_corpus")
                key = f"LFT {r['recipe']}" + ("" if trained in (None, main_corpus) else f" (trained on {trained})")
                seconds[key] = max(seconds.get(key) or 0.0, r.get("train_seconds") or 0.0)  # a re-run that reused the flow says ~0
            elif r["model"] == "affine":
                key = "affine (closed form)"
            else:
                key = f"skip-{r['k']}, " + ("first of the span" if r["where"] == "span" else "best position")
            cells[(key, r["eval"])] = r
        order = list(dict.fromkeys(key for key, _ in cells))
        order.sort(key=lambda key: (not key.startswith("LFT"), key.startswith("skip"), key))
        teacher = {r["eval"]: r["teacher_ppl"] for r in mine if r.get("teacher_ppl")}
        what = "KL" if kl_only else "KL / NMSE / PPL"
        head = " | ".join(f"{_label(c, labels)}: {what}"
                          + (f" (teacher {teacher[c]:.1f})" if c in teacher else "") for c in corpora)
        out += [f"**Span {span}** (LFT rows at k = {k}; train s = wall time of training on 2 CPU cores, or the "
                "device named in the raw file)", "",
                f"| model | train s | {head} |", "|---|---|" + "---|" * len(corpora)]
        for key in order:
            vals = []
            for c in corpora:
                r = cells.get((key, c))
                if r is None:
                    vals.append("")
                else:
                    nmse = f"{r['nmse']:.3f}" if r.get("nmse") is not None else "–"
                    where = f" (from block {r['start']})" if r.get("where") == "best" else ""
                    if kl_only:
                        vals.append(f"{r['kl']:.3f}" + (f" (@{r['start']})" if r.get("where") == "best" else ""))
                    else:
                        vals.append(f"{r['kl']:.3f} / {nmse} / {r['ppl']:.1f}{where}")
            sec = seconds.get(key)
            out.append(f"| {key} | {'' if sec is None else f'{sec:.0f}'} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--labels", default="english=English (held out),english.jsonl=English (held out),"
                                       "builtin=Python docs (held out),"
                                       "licenses=Debian licences (never shipped),"
                                       "debian-licences=Debian licences (never shipped)")
    p.add_argument("--kl-only", action="store_true", help="cells hold the KL alone (for many domains)")
    a = p.parse_args()
    labels = dict(item.split("=", 1) for item in a.labels.split(",") if "=" in item)
    rows = [json.loads(line) for line in Path(a.jsonl).read_text().splitlines() if line.strip()]
    print(render(rows, a.k, labels, a.kl_only))


if __name__ == "__main__":
    main()
