"""Memory of training on streamed pairs vs pairs held in RAM (docs/BENCHMARKS.md, "Beyond one machine").

Builds a synthetic pair set of TOKENS tokens in SmolLM2-135M's width (d = 576, 128-token windows, float16, the
activation cache's layout) and trains a flow on it for STEPS steps in this process, reading the pairs either
from the memmaps (what training does) or loaded whole into RAM first (``PairSource.in_memory``, the old way).
Only the first 4096 windows hold random values; the rest of each file is a sparse hole (zeros), so a
100M-token pair set (230 GB of float16) needs no disk. Normalisation is off and the loss is plain MSE, since
statistics of zeros mean nothing: this measures memory and step time, not a flow's quality.

    .venv/bin/python scripts/bench_stream.py --tokens 100000000            # streamed
    .venv/bin/python scripts/bench_stream.py --tokens 2000000 --in-memory  # loaded into RAM

Prints one JSON line: peak anonymous memory (RssAnon, what the process really holds; file pages of a memmap
are the kernel's reclaimable cache and are reported apart), peak resident set, and steps per second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Peak(threading.Thread):
    """Samples RssAnon every 20 ms and keeps the largest value."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.anon, self.running = 0, True

    def run(self) -> None:
        while self.running:
            self.anon = max(self.anon, status_kib("RssAnon"))
            time.sleep(0.02)


def synthetic_pairs(folder: Path, tokens: int, seq_len: int = 128, d: int = 576, filled: int = 4096):
    from lft_core.flow.pairs import PairSource

    windows = max(1, tokens // seq_len)
    rng = np.random.default_rng(0)
    arrays = []
    for name in ("x0", "x1", "h0", "h1"):
        n = windows if name.startswith("x") else 16
        arr = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=(n, seq_len, d))
        for s in range(0, min(n, filled), 256):
            e = min(n, filled, s + 256)
            arr[s:e] = rng.standard_normal((e - s, seq_len, d), dtype=np.float32).astype(np.float16)
        arr.flush()
        del arr
        arrays.append(np.load(folder / f"{name}.npy", mmap_mode="r"))
    return PairSource(*arrays, train_key="synthetic", heldout_key="synthetic-heldout"), windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--in-memory", action="store_true")
    a = p.parse_args()

    from lft_core.model.loading import load_teacher
    from lft_core.flow.config import TrainConfig
    from lft_core.flow.training import train_flow

    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        os.environ["LFT_CACHE_DIR"] = str(Path(tmp) / "cache")
        (Path(tmp) / "cache").mkdir()
        (Path(tmp) / "cache" / "models").symlink_to(ROOT / "cache" / "models", target_is_directory=True)
        teacher = load_teacher("smollm2-135m")
        data, windows = synthetic_pairs(Path(tmp), a.tokens)
        base = status_kib("RssAnon")
        peak = Peak()
        peak.start()
        t = time.perf_counter()
        if a.in_memory:
            data = data.in_memory()
        load_s = time.perf_counter() - t
        cfg = TrainConfig(span=(6, 12), steps=a.steps, windows=windows, heldout_windows=16, normalise=False,
                          loss_weighting="uniform", eval_every=10**6, checkpoint_every=10**6, distill_steps=0,
                          name="stream-bench")
        t = time.perf_counter()
        result = train_flow(cfg, teacher=teacher, verbose=False, data=data)
        train_s = time.perf_counter() - t
        peak.running = False
        peak.join()
        print(json.dumps({
            "tokens": windows * 128, "pairs_gib_float16": round(2 * windows * 128 * 576 * 2 / 2**30, 2),
            "mode": "in RAM" if a.in_memory else "streamed", "steps": a.steps,
            "anon_mib_before": round(base / 1024), "peak_anon_mib": round(peak.anon / 1024),
            "peak_rss_mib": round(status_kib("VmHWM") / 1024), "load_seconds": round(load_s, 1),
            "steps_per_s": round(a.steps / train_s, 2), "final_loss": round(result.final_loss, 5),
        }))


if __name__ == "__main__":
    main()
