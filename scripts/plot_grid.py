"""Heatmap of a span grid as a PNG: the recoupling ratio (JSON of `python -m lft_core recoupling --json ...`) or
the affine baseline's held-out NMSE (JSON of `python -m lft_core baselines --spans all --json ...`).

    .venv/bin/python scripts/plot_grid.py docs/recoupling_smollm2.json docs/recoupling_smollm2.png
    .venv/bin/python scripts/plot_grid.py docs/affine_grid_smollm2.json docs/affine_grid_smollm2.png
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(src: str, dst: str) -> None:
    from lft_core.outputs import check_output_file, write_output

    check_output_file(dst, "the PNG path")  # before any work: never a link, FIFO, device or a cache file
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    m = np.array([[np.nan if v is None else v for v in row] for row in data["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 6.2), dpi=110)
    if data.get("metric") == "nmse":
        vmax = float(np.nanquantile(m, 0.98))
        im = ax.imshow(m, origin="lower", cmap="cividis", vmin=0, vmax=vmax)
        ax.set_title(f"Affine replacement of span [m, n): held-out NMSE, {data.get('model', '')}\n"
                     f"{data['tokens']} tokens fitted, {data['heldout_tokens']} scored; position 0 and "
                     f"{data.get('massive_dropped', 0)} massive activations excluded")
        label = "NMSE = ‖x̂ − h_n‖² / ‖h_n‖² (0: the span is affine)"
    else:
        im = ax.imshow(m, origin="lower", cmap="magma_r", vmin=0, vmax=1)
        ax.set_title(f"Recoupling ratio R of span [m, n): {data.get('model', '')}, {data['pairs']} pairs,\n"
                     f"position 0 {'excluded' if data.get('drop_first', True) else 'included'}")
        label = "R = share of tokens the OT matching re-pairs"
    ax.set_xlabel("n (span end: h_n)")
    ax.set_ylabel("m (span start: h_m)")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(dst).suffix.lstrip(".").lower() or "png")
    write_output(dst, buffer.getvalue(), "the PNG path")
    print(f"wrote {dst}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lft_core.errors import LFTError

    try:
        main(sys.argv[1], sys.argv[2])
    except LFTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
