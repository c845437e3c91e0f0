"""Render docs/results.json (written by scripts/results.py) as the markdown tables of docs/RESULTS.md.

    .venv/bin/python scripts/render_results.py > /tmp/tables.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    data = json.loads((ROOT / "docs" / "results.json").read_text())
    print(f"Held-out: {data['eval_tokens']} tokens (16 held-out windows × 128 of the built-in corpus). "
          f"Training: {data['steps']} steps, batch {data['batch']} windows × 128 tokens, k = 3.\n")
    for run in data["runs"]:
        m, n = run["span"]
        ev = run["eval"]
        print(f"**Span {m}:{n} ({n - m} blocks), {run['method'].upper()}** (teacher PPL {ev['teacher_ppl']:.2f}, "
              f"train+eval {run['seconds']:.0f} s)\n")
        print("| model | KL of LM logits | NMSE | PPL |")
        print("|---|---|---|---|")
        for r in ev["rows"]:
            if r["model"] == "lft":
                print(f"| LFT k={r['k']} | **{r['kl']:.3f}** | {r['nmse']:.3f} | {r['ppl']:.2f} |")
            else:
                where = f"first {r['k']} of the span" if r["where"] == "span" else f"best position (blocks {r['start']}..{r['start'] + r['k'] - 1})"
                print(f"| skip-{r['k']}, {where} | {r['kl']:.3f} | | {r['ppl']:.2f} |")
        print()


if __name__ == "__main__":
    sys.exit(main())
