"""Time the app's pages in AppTest (first run, then warm) and the per-token KL page on a ~200-token text.

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


if __name__ == "__main__":
    main()
