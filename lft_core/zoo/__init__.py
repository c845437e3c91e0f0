"""The flow zoo: flows trained once, properly, and shipped with the project (``lft_core/zoo/flows/<name>/``).

A shipped flow is a flow-store folder (``model.safetensors`` in 16-bit weights with float32 normalisation
buffers, ``config.json``: the store's own proved pair, see ``flow.store``) plus ``provenance.json``: how it was
made (recipe, corpus and its manifest hash, seed, steps, tokens seen, device, wall time, the teacher's weights
hash, the commit of the code) and its held-out metrics, measured on the shipped 16-bit weights.

* ``shipped_flows()``: every shipped flow (``$LFT_ZOO_DIR`` replaces the folder: tests use a tiny zoo);
* ``find_shipped(...)``: the shipped flow for a teacher, span, method, corpus and window length, if any;
* ``install(name)``: copy a shipped flow into the store under its own name (never over another flow; a second
  install of the same flow does nothing);
* ``provenance_of(folder)``: the provenance a store folder carries when it is an installed shipped flow;
* ``copy_flow(src, dest)``: a saved flow copied under a new name with a fresh optimiser state, so ``train --resume``
  trains it further;
* ``export_flow(...)``: write a trained flow into the zoo (``scripts/train_zoo.py``);
* ``ship_fits(teacher)``: the fitted baselines (affine) of the shipped flows' spans, on each flow's own training
  data, written into ``lft_core/zoo/baselines`` so that a page comparing with them never fits first.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lft_core.atomic import DamagedRecord, atomic_folder, file_sha256, read_record, write_json
from lft_core.errors import LFTError

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

ZOO_DIR = Path(__file__).resolve().parent / "flows"
PROVENANCE_FILE = "provenance.json"
ZOO_PREFIX = "zoo"
PROVENANCE_FIELDS: dict[str, Any] = {
    "name": str, "recipe": dict, "corpus": str, "corpus_manifest_sha256": (str, type(None)), "seed": int,
    "steps": int, "distill_steps": int, "tokens_seen": int, "device": str, "wall_seconds": (int, float),
    "teacher": str, "teacher_weights_hash": str, "commit": str, "weights_sha256": str, "weights_dtype": str,
    "heldout": dict, "budget_note": str, "trained": str,
}
"""What ``provenance.json`` holds (every field required; ``read_record`` refuses a missing or mistyped one)."""


def zoo_dir() -> Path:
    """The shipped flows' folder: ``lft_core/zoo/flows``, or ``$LFT_ZOO_DIR``."""
    given = os.environ.get("LFT_ZOO_DIR")
    return Path(given) if given else ZOO_DIR


def zoo_name(method: str, span: tuple[int, int], tag: str = "") -> str:
    """``zoo-METHOD-M-N`` (a ``-TAG`` suffix for another teacher or recipe): the name a shipped flow has in the
    zoo and, once installed, in the store."""
    m, n = span
    return f"{ZOO_PREFIX}-{method}-{m}-{n}" + (f"-{tag}" if tag else "")


@dataclass(frozen=True)
class ShippedFlow:
    """One shipped flow: its folder, the record it was saved with (config.json) and its provenance."""

    name: str
    dir: Path
    config: dict = field(repr=False)
    provenance: dict = field(repr=False)

    @property
    def span(self) -> tuple[int, int]:
        m, n = self.config["span"]
        return int(m), int(n)

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def weights_sha256(self) -> str:
        return str(self.config.get("weights_sha256"))

    def matches(self, model_id: str, weights_hash: str, span: tuple[int, int], method: str, corpus: str,
                seq_len: int) -> bool:
        """True when this flow was trained for that teacher (id and weights hash), span, method, corpus and
        window length."""
        c = self.config
        return (c.get("model") == model_id and c.get("weights_hash") == weights_hash and self.span == tuple(span)
                and c.get("method") == method and c.get("corpus") == corpus and c.get("seq_len") == seq_len)

    def summary(self) -> str:
        """``shipped: 1,200+400 steps on mix, cpu, 24 min`` (what labels and listings say)."""
        return provenance_line(self.provenance)


def provenance_line(p: dict) -> str:
    """One line of a provenance: steps, corpus, device, wall time, held-out KL."""
    minutes = p.get("wall_seconds", 0) / 60
    kl = (p.get("heldout") or {}).get("kl")
    steps = f"{p.get('steps', '?')}+{p.get('distill_steps', 0)} steps"
    return (f"shipped: {steps} on {p.get('corpus', '?')}, {p.get('device', '?')}, {minutes:.0f} min"
            + (f", held-out KL {kl:.3f}" if isinstance(kl, (int, float)) else ""))


def read_provenance(folder: Path) -> dict:
    """A folder's provenance.json, checked against ``PROVENANCE_FIELDS`` (DamagedRecord when absent or wrong)."""
    return read_record(Path(folder) / PROVENANCE_FILE, PROVENANCE_FIELDS)


def _read_shipped(folder: Path) -> ShippedFlow | None:
    from lft_core.flow.record import CONFIG_FILE, read_flow_record
    from lft_core.flow.store import MODEL_FILE

    try:
        config = read_flow_record(folder / CONFIG_FILE)
        provenance = read_provenance(folder)
    except DamagedRecord:
        return None
    if not (folder / MODEL_FILE).is_file() or provenance["weights_sha256"] != config.get("weights_sha256"):
        return None
    return ShippedFlow(folder.name, folder, config, provenance)


def shipped_flows() -> list[ShippedFlow]:
    """Every complete shipped flow, by name (a folder with a damaged record or no weights is left out)."""
    root = zoo_dir()
    if not root.is_dir():
        return []
    found = (_read_shipped(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith("."))
    return [f for f in found if f is not None]


def find_shipped(model_id: str, weights_hash: str, span: tuple[int, int], method: str, corpus: str,
                 seq_len: int) -> ShippedFlow | None:
    """The shipped flow trained for this teacher, span, method, corpus and window length (None: none is)."""
    for flow in shipped_flows():
        if flow.matches(model_id, weights_hash, span, method, corpus, seq_len):
            return flow
    return None


def get_shipped(name: str) -> ShippedFlow:
    """The shipped flow ``name``; LFTError naming the shipped ones when there is none."""
    for flow in shipped_flows():
        if flow.name == name:
            return flow
    names = ", ".join(f.name for f in shipped_flows()) or "none"
    raise LFTError(f"no shipped flow named {name!r} (shipped: {names})")


def install(name: str, teacher: Teacher | None = None) -> str:
    """Copy the shipped flow ``name`` into the store under the same name; returns 'installed' or 'present' (the
    store holds exactly this flow already: nothing is done). A store flow of that name with other weights is
    never replaced (LFTError naming what to do). With ``teacher``, the flow must have been trained for it (model
    id and weights hash). The copy is checked (``load_flow``'s proof) before it appears in the store."""
    from lft_core.flow.store import MODEL_FILE, flows_dir, load_flow

    shipped = get_shipped(name)
    if teacher is not None and (shipped.config.get("model") != teacher.model_id
                                or shipped.config.get("weights_hash") != teacher.weights_hash):
        raise LFTError(f"shipped flow {name!r} was trained for {shipped.config.get('model')} with weights "
                       f"{str(shipped.config.get('weights_hash'))[:12]}, not this teacher ({teacher.model_id}, "
                       f"{teacher.weights_hash[:12]}): it is not installed")
    target = flows_dir() / name
    if target.exists():
        try:
            same = file_sha256(target / MODEL_FILE) == shipped.weights_sha256
        except OSError:
            same = False
        if same:
            return "present"
        raise LFTError(f"a flow named {name!r} is in the store and is not the shipped one; it is never replaced: "
                       f"rename or delete it (`python -m lft_core flows --delete {name}`) to install the shipped flow")
    with atomic_folder(target) as staging:
        for item in shipped.dir.iterdir():
            if item.is_file():
                shutil.copyfile(item, staging / item.name)
        load_flow(staging)  # the proof: weights hash to the record, the record is the one they carry
    return "installed"


def provenance_of(folder: Path) -> dict | None:
    """The provenance of a store folder when it holds an installed shipped flow (its provenance names the
    weights the folder holds); None for a flow trained here."""
    try:
        provenance = read_provenance(folder)
        config = read_record(Path(folder) / "config.json")
    except DamagedRecord:
        return None
    return provenance if provenance["weights_sha256"] == config.get("weights_sha256") else None


def copy_flow(src: str, dest: str) -> Path:
    """Copy the saved (or shipped-and-installed) flow ``src`` to the new name ``dest`` with a fresh optimiser
    state at its last step, so ``train --name DEST --resume --steps MORE`` (the source's other settings) trains it
    further. The copy is a flow trained here; its config keeps every setting of the source. Never replaces a
    flow: LFTError when ``dest`` exists."""
    import torch

    from lft_core.flow.store import NAME_RE, flows_dir, load_flow, resolve_flow, save_training_state

    if not NAME_RE.match(dest):
        raise LFTError(f"bad flow name {dest!r}: letters, digits, '.', '_' and '-', starting with a letter or digit")
    target = flows_dir() / dest
    if target.exists():
        raise LFTError(f"a flow named {dest!r} exists already; the copy never replaces it: choose another name")
    source = resolve_flow(src)
    flow, config = load_flow(source.path)
    for p in flow.parameters():  # shipped weights are 16-bit on disk; training continues in float32
        p.data = p.data.float()
    record = {k: v for k, v in config.items() if k not in ("status", "weights_sha256", "weights_sha256_previous")}
    record.update(name=dest, status="stopped")
    steps_done = int(config.get("steps_done") or 0)
    opt = torch.optim.AdamW(flow.parameters())
    gen = torch.Generator().manual_seed(int(config.get("seed", 0)) + steps_done)
    from lft_core.flow.store import save_flow

    with atomic_folder(target) as staging:
        save_flow(flow, staging, record)
        save_training_state(staging, opt, steps_done, gen)
    return target


HELDOUT_WINDOWS = 32


def heldout_metrics(teacher: Teacher, folder: Path, corpus: str, seq_len: int,
                    windows: int = HELDOUT_WINDOWS) -> dict:
    """KL / NMSE / PPL of the flow in ``folder`` (at its own k) on ``windows`` held-out windows of ``corpus``: what
    a shipped flow's provenance records as ``heldout`` (measured on the exported 16-bit weights), and what
    re-measuring it must give again."""
    from lft_core.analysis.evaluation import eval_windows, evaluate
    from lft_core.data.corpus import split_rule_of
    from lft_core.flow.store import open_flow

    flow, config = open_flow(str(folder), teacher)
    flow.to(teacher.device)
    ids = eval_windows(teacher, corpus, None, windows, seq_len)
    k = int(config.get("k", 3))
    result = evaluate(teacher, flow, None, ids, ks=(k,), skips=(), best_skip=False)
    row = next(r for r in result.rows if r.model == "lft")
    return {"kl": round(row.kl, 6), "nmse": round(row.nmse, 6), "ppl": round(row.ppl, 4),
            "teacher_ppl": round(result.teacher_ppl, 4), "k": k, "windows": windows, "seq_len": seq_len,
            "tokens": result.tokens, "corpus": corpus, "split_rule": split_rule_of(corpus)}


def export_flow(src: Path, name: str, provenance: dict, dtype: str = "float16", root: Path | None = None) -> Path:
    """Write the trained flow in folder ``src`` into the zoo as ``name``: parameters cast to ``dtype`` (the
    normalisation buffers stay float32), the record renamed, ``provenance.json`` beside it (its
    ``weights_sha256`` filled in here). Replaces an earlier export of the same name (the zoo is built by one
    script, never by a user)."""
    import torch

    from lft_core.flow.store import MODEL_FILE, load_flow, save_flow

    flow, config = load_flow(src)
    for p in flow.parameters():
        p.data = p.data.to(getattr(torch, dtype))
    record = {k: v for k, v in config.items() if k not in ("weights_sha256", "weights_sha256_previous")}
    record["name"] = name
    target = (root or zoo_dir()) / name
    with atomic_folder(target, replace=True) as staging:
        save_flow(flow, staging, record)
        write_json(staging / PROVENANCE_FILE,
                   {**provenance, "name": name, "weights_dtype": dtype,
                    "weights_sha256": file_sha256(staging / MODEL_FILE)}, indent=1)
    return target


# ---------------------------------------------------------------------------------------------------------
# The zoo's curve: the paper's plot (KL against blocks replaced or removed) for the shipped flows, measured once
# by the zoo script and shipped beside them (``curve.json``), so Compare draws it without any evaluation.

def ship_fits(teacher: Teacher) -> list[Path]:
    """Fit every kept baseline (``baselines.keeps_fits``) of each shipped flow of ``teacher`` on the flow's own
    training data and copy the fit into the zoo's fits (``baselines.SHIPPED_FITS``); returns the files."""
    from lft_core.analysis.baselines import (SHIPPED_FITS, FitData, fit_file, fit_key, fitted_baselines, prepare,
                                            read_fit)
    from lft_core.atomic import write_bytes

    out = []
    for flow in shipped_flows():
        if flow.config.get("weights_hash") != teacher.weights_hash:
            continue
        data = FitData.of_flow(flow.config)
        for baseline in (b for b in fitted_baselines() if b.keeps_fits):
            key = fit_key(baseline.name, teacher, flow.span, data)
            target = SHIPPED_FITS / f"{key}.safetensors"
            if target in out:
                continue
            if read_fit(baseline, flow.span, target) is None:  # not shipped yet (or damaged): fit, keep, copy
                prepare(baseline.name, teacher, flow.span, data)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(target, fit_file(key).read_bytes())
            out.append(target)
    return out


CURVE_FILE = "curve.json"
CURVE_WINDOWS = 32


def curve_path() -> Path:
    """``curve.json`` beside the shipped flows' folder (``lft_core/zoo/curve.json``, or in ``$LFT_ZOO_DIR``)."""
    given = os.environ.get("LFT_ZOO_DIR")
    return Path(given) / CURVE_FILE if given else ZOO_DIR.parent / CURVE_FILE


def measure_curve(teacher: Teacher, flows: list[ShippedFlow], corpus: str, windows: int = CURVE_WINDOWS,
                  seq_len: int = 128, progress: bool = True) -> dict:
    """KL / NMSE / PPL of each shipped flow (at its own k), of the affine map of each of their spans (fitted on
    the flow's own training windows, as ``eval --baselines affine``) and of skip-k for k = 1 … the most blocks a
    flow replaces, at every position (the best one kept), on ``windows`` held-out windows of ``corpus``."""
    from lft_core.analysis.baselines import FitData, prepare
    from lft_core.analysis.comparison import best_skips, skip_kl_grid
    from lft_core.analysis.evaluation import eval_windows, evaluate
    from lft_core.data.corpus import split_rule_of
    from lft_core.flow.store import load_flow

    ids = eval_windows(teacher, corpus, None, windows, seq_len)
    rows, affine, teacher_ppl = [], {}, None
    for f in flows:
        flow, config = load_flow(f.dir)
        flow.to(teacher.device)
        k = int(config.get("k", 3))
        result = evaluate(teacher, flow, None, ids, ks=(k,), skips=(), best_skip=False)
        r = result.rows[0]
        teacher_ppl = result.teacher_ppl
        rows.append({"flow": f.name, "span": list(f.span), "blocks": f.span[1] - f.span[0], "method": f.method,
                     "k": k, "kl": r.kl, "nmse": r.nmse, "ppl": r.ppl})
        if f.span not in affine:
            prepared = prepare("affine", teacher, f.span, FitData.of_flow(config), progress)
            a = evaluate(teacher, None, f.span, ids, ks=(), skips=(), best_skip=False, baselines=[prepared]).rows[0]
            affine[f.span] = {"span": list(f.span), "blocks": f.span[1] - f.span[0], "kl": a.kl, "nmse": a.nmse,
                              "ppl": a.ppl, "fit": f"{FitData.of_flow(config).windows} training windows of "
                                                   f"{f.name}"}
    ks = tuple(range(1, max((r["blocks"] for r in rows), default=1) + 1))
    grid = skip_kl_grid(teacher, ids, ks)
    best = best_skips(grid)
    return {"corpus": corpus, "split_rule": split_rule_of(corpus), "windows": windows, "seq_len": seq_len,
            "tokens": int(ids.numel()), "teacher": teacher.model_id, "teacher_weights_hash": teacher.weights_hash,
            "teacher_ppl": teacher_ppl, "flows": rows, "affine": list(affine.values()),
            "skip_best": [{"k": k, "start": s.start, "kl": s.kl, "ppl": s.ppl} for k, s in best.items()]}


def read_curve() -> dict | None:
    """The shipped curve (``curve.json``), or None when there is none or it is damaged."""
    try:
        return read_record(curve_path(), {"corpus": str, "windows": int, "seq_len": int, "flows": list,
                                          "affine": list, "skip_best": list, "teacher_weights_hash": str})
    except DamagedRecord:
        return None
