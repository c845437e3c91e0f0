"""Time the app's pages in AppTest (first run, then warm), the per-token KL page on a ~200-token text, the
affine baseline beside a flow (Per-token KL, Trajectories), and the background evaluations (Compare's default
evaluation and Choose a span's skip-k grid, as the pages start them: ``python -m lft_core compare``).

    .venv/bin/python -m lft_core demo            # first: the demo's cache, grids and flows
    .venv/bin/python scripts/bench_app.py        # then: every page on the demo's story (its default view)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from streamlit.testing.v1 import AppTest  # noqa: E402

from lft_core.run.jobs import list_jobs  # noqa: E402

PAGES = ["home", "setup", "span", "train", "trajectories", "crossings", "kl", "compare", "toy"]
TEXT = ("The river flows quietly through the old town, past the market and the stone bridge. " * 12).strip()


def run_page(page: str, state: dict) -> tuple[float, AppTest]:
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=300)
    for k, v in state.items():
        at.session_state[k] = v
    t = time.perf_counter()
    at.run()
    if page != "home":
        at.switch_page(f"views/{page}.py").run()
    return time.perf_counter() - t, at


def main() -> None:
    state: dict = {}  # every page opens on the demo's story once the demo is ready
    print("| page | first run (s) | warm run (s) | exception |")
    print("|---|---|---|---|")
    for page in PAGES:
        cold, _ = run_page(page, state)
        warm, at = run_page(page, state)
        print(f"| {page} | {cold:.2f} | {warm:.2f} | {bool(at.exception)} |", flush=True)
    _, at = run_page("kl", state)
    at.text_area(key="w_text").set_value(TEXT)
    from app.engine import get_teacher

    n_tokens = get_teacher("smollm2-135m").encode(TEXT).shape[1]
    t = time.perf_counter()
    next(b for b in at.button if b.label.startswith("Compute")).click().run()
    print(f"\nKL page, text of {n_tokens} tokens: text -> coloured tokens "
          f"{time.perf_counter() - t:.2f} s; exception: {bool(at.exception)}")
    background = [j.id for j in list_jobs("baselines")]
    at.toggle(key="w_kl_affine").set_value(True)
    t = time.perf_counter()
    next(b for b in at.button if b.label.startswith("Compute")).click().run()
    shown = "affine" in at.session_state["kl_result"].kl
    print(f"KL page, the affine toggle on: {time.perf_counter() - t:.2f} s in the foreground; affine row shown: "
          f"{shown}; background fits started: {len([j for j in list_jobs('baselines') if j.id not in background])}")
    at.text_area(key="w_text").set_value(" ".join([TEXT] * 3))
    t = time.perf_counter()
    next(b for b in at.button if b.label.startswith("Compute")).click().run()
    print(f"KL page, a text of {len(at.session_state['kl_result'].tokens)} tokens with LFT, skip-k and affine: "
          f"{time.perf_counter() - t:.2f} s; exception: {bool(at.exception)}")
    _, at = run_page("trajectories", state)
    t = time.perf_counter()
    at.checkbox(key="w_traj_affine").check().run()
    print(f"Trajectories, the affine end point on: {time.perf_counter() - t:.2f} s; exception: {bool(at.exception)}")
    t = time.perf_counter()
    at.radio(key="proj").set_value("UMAP").run()
    print(f"Trajectories, PCA to UMAP: {time.perf_counter() - t:.2f} s; exception: {bool(at.exception)}")
    _, at = run_page("crossings", state)
    t = time.perf_counter()
    at.slider(key="w_cross_n").set_value(256).run()
    print(f"Crossings, 256 tokens: {time.perf_counter() - t:.2f} s; exception: {bool(at.exception)}")
    background_evaluations()


def background_evaluations() -> None:
    """Compare's default evaluation and the span page's skip-k grid, run as the pages' jobs run them (a fresh
    process each: model loading included), first with nothing saved, then read back."""
    import subprocess
    from dataclasses import replace

    _, at = run_page("compare", {})
    request = at.session_state["compare_request"]
    spec = at.session_state.get("model_spec", "smollm2-135m")
    commands = {
        "skip-k grid (Choose a span's button: k = 1..3 at every position, 4 x 128 tokens)":
            ["compare", "--skip-only", "--model", spec, *replace(request, flows=(), baselines=()).cli_args()],
        f"Compare's default evaluation ({len(request.flows)} flows, baselines {', '.join(request.baselines)}, "
        "skip-k grid already saved)": ["compare", "--model", spec, *request.cli_args()],
    }
    for what, args in commands.items():
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "lft_core", *args], cwd=ROOT, capture_output=True, text=True)
        print(f"{what}: {time.perf_counter() - t:.1f} s (exit {run.returncode})", flush=True)
    t = time.perf_counter()
    _, at = run_page("compare", {})
    print(f"Compare page with the saved evaluation: {time.perf_counter() - t:.2f} s; exception: {bool(at.exception)}")


if __name__ == "__main__":
    main()
