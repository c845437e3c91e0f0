"""Train the flow zoo from nothing and write it into lft_core/zoo/flows/ with its provenance (issue 21).

The zoo's flows, by a stated rule:

* the demo's story: SFM and FW on the span with the lowest and the span with the highest recoupling ratio among
  the 6-block spans the demo chooses from (``run.demo.choose_spans`` on the demo's own all-layer cache: the
  default demo settings), so ``python -m lft_core demo`` installs them instead of training;
* ``--curve``: FW flows replacing 2, 4, 8 and 12 blocks, each ending at the block where the best skip-2 of the
  default corpus ends (the span [n - b, n), n = 18 for the embedded teacher: the blocks just before the last
  third, where RESULTS section 1 found the cheapest blocks), for Compare's KL-against-blocks curve.

Resumable: each flow trains in the store as ``zoo-build-...`` (``--resume`` after a kill) and is exported when
complete (16-bit weights, ``provenance.json`` with its held-out metrics measured on the exported weights). A flow
already exported with the same recipe is skipped. CUDA when present (bf16 autocast), else the CPU.

    python scripts/train_zoo.py --which high --steps 800 --distill-steps 400     # the CPU run of this task
    python scripts/train_zoo.py --budget gpu --curve                              # a GPU machine: everything
    python scripts/train_zoo.py --fits-only                  # only the shipped flows' affine fits (zoo/baselines)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lft_core.distributed import device_label  # noqa: E402
from lft_core.errors import LFTError  # noqa: E402

BUDGETS = {
    "default": {},  # the project's default recipe (TrainConfig's defaults: ~10 min per 6-block flow on 2 cores)
    # GPU length sized for the demo's four flows in ~9 minutes on one H100 (RESULTS section 1: 3000 + 1000 steps of
    # batch 32 took 213 s there): 2000 + 600 steps of 32 windows, ~130 s per flow
    "gpu": {"steps": 2000, "windows": 2048, "batch": 32, "distill_steps": 600},
}
CURVE_BLOCKS = (2, 4, 8, 12)
CURVE_END = 18


def commit() -> str:
    """The commit of the code that trains (with ``-dirty`` when tracked files outside the zoo differ)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)lft_core/zoo/flows"], cwd=ROOT, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty.strip() else "")


def corpus_manifest_sha256(spec: str) -> str | None:
    """The sha256 of the mixture's manifest (which names every source's sha256) for ``mix``; else None."""
    from lft_core.atomic import file_sha256
    from lft_core.data.corpus import MIX

    if spec == MIX or spec.startswith(MIX + ":"):
        return file_sha256(ROOT / "lft_core" / "data" / "mix_manifest.json")
    return None


def demo_spans(teacher) -> dict:
    """The demo's low-R and high-R spans, chosen as ``demo`` chooses them (its cache and grid, reused by it)."""
    from lft_core.analysis.recoupling import recoupling_grid_cached
    from lft_core.data.activations import ensure_activations
    from lft_core.data.corpus import load_corpus
    from lft_core.run.demo import DemoSettings
    from lft_core.run.demo.settings import choose_spans

    s = DemoSettings()
    entry = ensure_activations(teacher, load_corpus(s.corpus), s.seq_len, s.windows, range(teacher.n_layers + 1),
                               "train")
    grid = recoupling_grid_cached(entry, pairs=s.pairs, seed=0, drop_first=True)
    return choose_spans(grid.matrix, s.blocks)


def plan(teacher, which: list[str], curve: bool) -> list[tuple[str, tuple[int, int], str]]:
    """(method, span, why) of every flow to train, in order."""
    out = []
    if which:
        spans = demo_spans(teacher)
        for w in which:
            span = tuple(spans[w]["span"])
            for method in ("fw", "sfm"):
                out.append((method, span, f"the demo's {w}-R span (R {spans[w]['R']:.3f})"))
    if curve:
        for b in CURVE_BLOCKS:
            span = (CURVE_END - b, CURVE_END)
            if ("fw", span) not in [(m, s) for m, s, _ in out]:
                out.append(("fw", span, f"the curve: {b} blocks ending at block {CURVE_END}"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", default="high,low", help="the demo's spans to train: high, low, both (default) or none")
    p.add_argument("--curve", action="store_true", help="also the FW flows of 2, 4, 8 and 12 blocks")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    p.add_argument("--steps", type=int, help="flow steps (overrides the budget)")
    p.add_argument("--distill-steps", type=int, help="distillation steps (overrides the budget)")
    p.add_argument("--windows", type=int, help="training windows (overrides the budget)")
    p.add_argument("--batch", type=int, help="windows per step (overrides the budget)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--only", help="comma list of zoo names to train (default: the whole plan)")
    p.add_argument("--note", default="", help="what to say of the budget in the provenance")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--no-curve", action="store_true",
                   help="do not re-measure the zoo's curve (lft_core/zoo/curve.json) after training")
    p.add_argument("--curve-only", action="store_true", help="only re-measure the zoo's curve of the shipped flows")
    p.add_argument("--fits-only", action="store_true",
                   help="only fit the shipped flows' fitted baselines (affine) into lft_core/zoo/baselines")
    a = p.parse_args(argv)

    from lft_core.flow.config import TrainConfig
    from lft_core.flow.store import flows_dir
    from lft_core.flow.training import train_flow
    from lft_core.model.loading import load_teacher
    from lft_core.zoo import PROVENANCE_FILE, export_flow, heldout_metrics, read_provenance, zoo_dir, zoo_name
    from lft_core.atomic import DamagedRecord, write_json

    which = [] if a.which == "none" else [w.strip() for w in a.which.split(",") if w.strip()]
    if any(w not in ("high", "low") for w in which):
        raise SystemExit(f"--which takes high, low or none, got {a.which!r}")
    overrides = {**BUDGETS[a.budget], **{k: v for k, v in (("steps", a.steps), ("distill_steps", a.distill_steps),
                                                             ("windows", a.windows), ("batch", a.batch))
                                         if v is not None}}
    code = commit()  # the code that trains: read once, before training (the tree may change while it runs)
    teacher = load_teacher(a.model, device=a.device)
    todo = [] if a.curve_only or a.fits_only else plan(teacher, which, a.curve)
    only = {n.strip() for n in a.only.split(",")} if a.only else None
    for method, span, why in todo:
        name = zoo_name(method, span)
        if only is not None and name not in only:
            continue
        cfg = TrainConfig(model=a.model, span=span, method=method, name=f"zoo-build-{method}-{span[0]}-{span[1]}",
                          **overrides)
        recipe = {k: v for k, v in asdict(cfg).items() if k not in ("name", "sweep")}
        recipe["span"] = list(span)
        print(f"{name}: {why}; {cfg.steps}+{cfg.distill_steps} steps, {cfg.windows} windows, batch {cfg.batch}",
              file=sys.stderr)
        if a.dry_run:
            continue
        try:
            done = read_provenance(zoo_dir() / name)
            if done["recipe"] == recipe:
                print(f"{name}: shipped already with this recipe, skipped", file=sys.stderr)
                continue
        except DamagedRecord:
            pass
        work = flows_dir() / cfg.name
        t0 = time.time()
        result = train_flow(cfg, teacher=teacher, resume=work.exists(), verbose=True)
        if result.stopped:
            print(f"{name}: stopped; run again to resume", file=sys.stderr)
            return 1
        from lft_core.flow.store import read_flow_config

        history = read_flow_config(cfg.name).get("history") or []
        wall = float(history[-1].get("elapsed_s", result.seconds)) if history else result.seconds
        tokens = cfg.seq_len * (cfg.steps * cfg.batch + cfg.distill_steps * cfg.distill_batch)
        provenance = {
            "recipe": recipe, "corpus": cfg.corpus, "corpus_manifest_sha256": corpus_manifest_sha256(cfg.corpus),
            "seed": cfg.seed, "steps": cfg.steps, "distill_steps": cfg.distill_steps, "tokens_seen": tokens,
            "device": device_label(result.device), "wall_seconds": round(wall, 1), "teacher": teacher.model_id,
            "teacher_weights_hash": teacher.weights_hash, "commit": code, "heldout": {},
            "budget_note": a.note or (f"{a.budget} budget" + (f" with {overrides}" if overrides else "")),
            "trained": time.strftime("%Y-%m-%d", time.gmtime()),
        }
        target = export_flow(work, name, provenance)
        provenance = read_provenance(target)
        provenance["heldout"] = heldout_metrics(teacher, target, cfg.corpus, cfg.seq_len)
        write_json(target / PROVENANCE_FILE, provenance, indent=1)
        h = provenance["heldout"]
        print(f"{name}: exported ({time.time() - t0:.0f} s here); held-out KL {h['kl']:.4f}, NMSE {h['nmse']:.4f}, "
              f"PPL {h['ppl']:.3f} (teacher {h['teacher_ppl']:.3f})", file=sys.stderr)
    if not a.dry_run:
        from lft_core.zoo import ship_fits

        for path in ship_fits(teacher):
            print(f"shipped fit {path.relative_to(ROOT)}", file=sys.stderr)
    if not (a.dry_run or a.no_curve or a.fits_only):
        write_curve(teacher, code)
    return 0


def write_curve(teacher, code: str) -> None:
    """Measure the curve of every shipped flow of this teacher and write lft_core/zoo/curve.json."""
    from lft_core.atomic import write_json
    from lft_core.data.corpus import DEFAULT
    from lft_core.zoo import curve_path, measure_curve, shipped_flows

    flows = [f for f in shipped_flows() if f.config.get("weights_hash") == teacher.weights_hash]
    if not flows:
        return
    t0 = time.time()
    print(f"measuring the zoo's curve: {len(flows)} shipped flows, affine maps, skip-k at every position",
          file=sys.stderr)
    curve = measure_curve(teacher, flows, DEFAULT)
    curve.update(seconds=round(time.time() - t0, 1), commit=code, device=device_label(str(teacher.device)),
                 command="python scripts/train_zoo.py --curve-only")
    write_json(curve_path(), curve, indent=1)
    print(f"wrote {curve_path()} ({curve['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LFTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
