"""1 process vs 2 torchrun ranks on this machine, for `cache` and `train` (docs/BENCHMARKS.md).

    .venv/bin/python scripts/bench_ranks.py [--steps 40] [--windows 64]

Runs in a fresh cache folder (the embedded model is shared): first `cache` of layers 6 and 12 over WINDOWS
training windows with 1 process, then with 2 ranks into another fresh folder (and checks the two entries are
byte-identical); then `train` of span 6:12 (the default recipe's settings, STEPS steps) with 1 process and with
2 ranks on the cached pairs. Prints a markdown table of wall time and the command's own seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def fresh_cache(parent: Path, name: str) -> Path:
    root = parent / name
    root.mkdir()
    (root / "models").symlink_to(ROOT / "cache" / "models", target_is_directory=True)
    return root


def run(args: list[str], cache: Path, ranks: int, out: Path) -> tuple[float, dict]:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "lft_core", *args, "--json", str(out)]
    env = {**os.environ, "LFT_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--windows", type=int, default=64)
    a = p.parse_args()
    cache_args = ["cache", "--corpus", "builtin", "--windows", str(a.windows), "--layers", "6,12"]
    train_args = ["train", "--corpus", "builtin", "--distill-steps", "0", "--span", "6:12", "--steps", str(a.steps),
                  "--windows", str(a.windows),
                  "--eval-every", str(10**6), "--checkpoint-every", str(10**6)]
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        tmp = Path(tmp)
        entries = {}
        for ranks in (1, 2):
            root = fresh_cache(tmp, f"r{ranks}")
            wall, res = run(cache_args, root, ranks, tmp / f"cache{ranks}.json")
            rows.append(("cache", ranks, wall, res["seconds"], f"{a.windows * 128 / res['seconds']:.0f} tokens/s"))
            entries[ranks] = Path(res["dir"])
            run(["cache", "--windows", "16", "--layers", "6,12", "--split", "heldout"], root, 1, tmp / "h.json")
        same = all((entries[1] / f.name).read_bytes() == f.read_bytes() for f in entries[2].glob("*.npy"))
        for ranks in (1, 2):
            wall, res = run([*train_args, "--name", f"bench-{ranks}"], tmp / f"r{ranks}", ranks,
                            tmp / f"train{ranks}.json")
            rows.append(("train", ranks, wall, res["seconds"],
                         f"{a.steps / res['seconds']:.2f} steps/s, loss {res['final_loss']:.4f}"))
    print(f"cache entries byte-identical: {same}")
    print("| command | ranks | wall (s) | command's own (s) | rate |")
    print("|---|---|---|---|---|")
    for what, ranks, wall, own, rate in rows:
        print(f"| {what} | {ranks} | {wall:.1f} | {own:.1f} | {rate} |")


if __name__ == "__main__":
    main()
