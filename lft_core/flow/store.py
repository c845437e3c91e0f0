"""The flow store: saved latent flows under ``cache/flows/<name>/``, and everything that reads or writes them.

A saved flow is a folder::

    model.safetensors           the LatentFlow's state dict (safetensors: loading never unpickles anything)
    config.json                 the training settings, span, field spec, model id + weights hash, status, history
    training_state.safetensors  optimizer moments and RNG state, for ``--resume`` (tensors)
    training_state.json         the step and the optimizer's scalars

* ``save_flow`` / ``load_flow``: one checkpoint folder (a new folder appears whole; an existing one has each
  file replaced atomically, weights first);
* ``save_training_state`` / ``load_training_state``: what resuming needs beyond the weights;
* ``flow_lock`` / ``being_trained``: one process at a time trains a given name (a file lock);
* ``SavedFlow``: the typed record of one saved flow that listings and pages use;
* ``list_flows``, ``read_flow_config``, ``flow_path`` / ``resolve_flow``, ``open_flow``, ``delete_flow``.

Flows prove what they are (the checks live in ``record``). ``save_flow`` writes the record (config.json, minus its ``status``) into the weights
file's safetensors metadata (``lft_record``) and the sha256 of that weights file into config.json
(``weights_sha256``, with ``flow_format`` 2). ``load_flow`` checks both ways: the weights must hash to the
recorded sha256 (else they were edited or swapped), and config.json must say what the weights were saved with
(span, field spec, model id and weights hash, k, corpus, ...; else config.json was edited), naming the first
field that differs; ``open_flow`` then checks the teacher (model id, weights hash, blocks, field shape). Records
are read by ``atomic.read_record`` against ``flow_schema()`` (bounded size, regular files only, missing, extra
and wrong-typed fields refused by name). Flows saved before this (no ``flow_format``, no metadata) still load,
marked unverified (``flow.proof.verified`` is False; ``eval`` says so); their next checkpoint (a ``--resume``)
writes the proof.

A flow is named in one of two ways (``resolve_flow``): a bare name (no '/', not starting with '.' or '~') is
always the saved flow ``cache/flows/NAME``, whatever the current folder holds; anything with a '/' or starting
with '.' or '~' is a path to a flow folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor

from lft_core.atomic import (DamagedRecord, atomic_folder, atomic_write, check_fields, file_sha256, read_record,
                             write_json, write_text)
from lft_core.data.corpus import BUILTIN
from lft_core.errors import LFTError
from lft_core.flow.field import FieldSpec
from lft_core.flow.latent import LatentFlow
from lft_core.paths import cache_dir
from lft_core.span import Span

from lft_core.flow.record import (CONFIG_FILE, FLOW_FORMAT, RECORD_META, FlowCheckpointError, _canonical,
                                  _certified, _prove, check_trained_for, flow_schema, read_flow_record)

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
MODEL_FILE = "model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


@dataclass(frozen=True)
class FlowSource:
    """Where a flow given on the command line was found: ``kind`` "saved" (a name in cache/flows) or "path"."""

    kind: str
    path: Path
    name: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": str(self.path)}


def flows_dir() -> Path:
    """Where saved flows live: ``cache/flows`` (or ``$LFT_CACHE_DIR/flows``)."""
    return cache_dir("flows")


# ---------------------------------------------------------------------------------------------------------
# One checkpoint folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_flow(flow: LatentFlow, directory: str | Path, config: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` (the state dict, with the record in its metadata) and ``config.json`` (config +
    field_spec + span + flow_format + the weights' sha256).

    A new folder appears whole (written to a temporary sibling, then renamed). An existing folder (periodic
    checkpoints) is updated so that every moment leaves a loadable pair: the new weights are written to a
    temporary, config.json then records both the new and the previous sha256 (``weights_sha256_previous``), the
    weights are renamed into place, and config.json is written without the previous hash. A kill in between
    leaves either the previous weights (loaded with the record they carry) or the new ones."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    payload = {**(config or {}), "field_spec": flow.spec.to_dict(), "span": list(flow.span), "flow_format": FLOW_FORMAT}
    for key in ("weights_sha256", "weights_sha256_previous"):  # computed here, never taken from the caller
        payload.pop(key, None)
    record = json.loads(json.dumps(payload, default=_jsonable))  # exactly what config.json will hold
    try:
        check_fields(record, "flow record", None, flow_schema(), extra=False)
    except DamagedRecord as e:
        raise LFTError(f"cannot save flow {directory.name!r}: {e} (a new field goes into "
                       "record._RECORD_FIELDS)") from None
    metadata = {"format": "pt", RECORD_META: _canonical(_certified(record))}
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in flow.state_dict().items()}
    hashes: dict[str, str] = {}

    def text(**extra: str) -> str:
        return json.dumps({**record, **extra}, indent=2)

    def write_into(folder: Path) -> None:
        model, config_path = folder / MODEL_FILE, folder / CONFIG_FILE
        previous = file_sha256(model) if model.is_file() else None

        def record_first(tmp: Path) -> None:
            hashes["new"] = file_sha256(tmp)
            if previous is not None and previous != hashes["new"]:
                write_text(config_path, text(weights_sha256=hashes["new"], weights_sha256_previous=previous))

        atomic_write(model, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), before_replace=record_first)
        write_text(config_path, text(weights_sha256=hashes["new"]))

    if directory.is_dir():
        write_into(directory)
        return
    with atomic_folder(directory) as staging:
        write_into(staging)


def load_flow(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[LatentFlow, dict[str, Any]]:
    """Read a checkpoint folder written by ``save_flow``: (the flow in eval mode, its config dict).

    Uses safetensors only (never pickle). A missing, truncated or inconsistent folder raises FlowCheckpointError,
    and so does a pair that does not prove itself (``_prove``: weights edited or swapped, config.json edited).
    ``flow.proof`` says what was proved (``verified`` is False for a flow saved before flows carried a proof).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    model_path, config_path = directory / MODEL_FILE, directory / CONFIG_FILE
    for path in (model_path, config_path):
        if not os.path.lexists(path):
            raise FlowCheckpointError(f"flow checkpoint file not found: {path}")
    if not model_path.is_file():
        raise FlowCheckpointError(f"flow weights {model_path} are not a regular file")
    try:
        config = read_flow_record(config_path)
        if "field_spec" not in config:
            raise DamagedRecord(f"{CONFIG_FILE}: field 'field_spec' is missing (it should be a dict)")
        spec = FieldSpec.from_dict(config["field_spec"])
        n_layers = config.get("n_layers")
        n_layers = n_layers if isinstance(n_layers, int) else None
        span = Span.of(config["span"]).check(n_layers, where=f" for a model of {n_layers} blocks" if n_layers else "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, LFTError) as exc:
        raise FlowCheckpointError(f"invalid flow config {config_path}: {exc}") from None
    try:
        state = load_file(str(model_path), device=str(map_location))
    except Exception as exc:  # safetensors raises its own error types for truncated / corrupt files
        raise FlowCheckpointError(f"cannot read flow weights {model_path} (truncated or corrupt?): {exc}") from None
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FlowCheckpointError(f"flow weights {model_path} hold non-finite values (in {', '.join(bad[:3])})")
    sigma = state.get("sigma")
    if sigma is not None and sigma.is_floating_point() and not bool((sigma > 0).all()):
        raise FlowCheckpointError(f"flow {directory.name}: its normalisation has sigma <= 0, which is impossible")
    try:
        config, proof = _prove(directory, config, model_path, spec, span)
    except OSError as exc:
        raise FlowCheckpointError(f"cannot read flow weights {model_path}: {exc.strerror or exc}") from None
    except FlowCheckpointError:
        raise
    except Exception as exc:  # safetensors' own errors for a header it cannot parse
        raise FlowCheckpointError(f"cannot read flow weights {model_path} (truncated or corrupt?): {exc}") from None
    try:
        flow = LatentFlow(spec, span=span)
        flow.load_state_dict(state, strict=True)
    except LFTError as exc:
        raise FlowCheckpointError(f"invalid flow config {config_path}: {exc}") from None
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise FlowCheckpointError(
            f"flow weights {model_path} do not match its config (from another model?): {detail[:160]}"
        ) from None
    if not bool((flow.sigma > 0).all()):
        raise FlowCheckpointError(f"flow {directory.name}: its normalisation has sigma <= 0, which is impossible")
    flow.proof = proof
    return flow.to(map_location).eval(), config


def save_training_state(directory: Path, opt: torch.optim.Optimizer, step: int, gen: torch.Generator) -> None:
    """Optimizer moments and RNG in safetensors (no pickle), the rest in JSON; both written atomically."""
    from safetensors.torch import save_file

    tensors, scalars = {}, {"step": step, "param_state": {}}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars["param_state"][f"{idx}.{key}"] = float(value)
    tensors["rng"] = gen.get_state()
    atomic_write(directory / STATE_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    write_json(directory / STATE_JSON, scalars)


def save_checkpoint(directory: Path, flow: LatentFlow, config: dict[str, Any], opt: torch.optim.Optimizer, step: int,
                    gen: torch.Generator) -> None:
    """Weights, config and training state of a run. A new flow's folder appears whole (built in a staging
    folder) or not at all; an existing one has each file replaced atomically. A write that fails (a full
    disk) ends in one LFTError line and leaves the previous checkpoint as it was."""
    def write(folder: Path) -> None:
        save_flow(flow, folder, config)
        save_training_state(folder, opt, step, gen)

    try:
        if directory.is_dir():
            write(directory)
        else:
            with atomic_folder(directory) as staging:
                write(staging)
    except OSError as e:
        kept = "the last checkpoint is intact" if directory.is_dir() else "nothing was saved"
        raise LFTError(f"could not save a checkpoint of flow {directory.name!r} ({e.strerror or e}); {kept}") from None


def has_training_state(directory: Path) -> bool:
    """True when ``directory`` holds what ``--resume`` needs."""
    return (directory / STATE_JSON).is_file()


def load_training_state(directory: Path, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
    """Restore the optimizer and the RNG saved by ``save_training_state``; returns the step to continue from."""
    from safetensors.torch import load_file

    try:
        scalars = read_record(directory / STATE_JSON, {"step": int, "param_state": dict}, extra=False)
        tensors = load_file(str(directory / STATE_TENSORS))
    except Exception as e:  # DamagedRecord, or safetensors' own errors for a truncated file
        raise FlowCheckpointError(f"the training state of flow {directory.name!r} is damaged ({e}); it cannot "
                                  f"be resumed, but its weights can still be evaluated") from None
    state: dict = {}
    for name, value in tensors.items():
        if name == "rng":
            gen.set_state(value)
            continue
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in scalars["param_state"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = torch.tensor(value)
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return int(scalars["step"])


# ---------------------------------------------------------------------------------------------------------
# Who trains a name


@contextmanager
def flow_lock(name: str, busy: str) -> Iterator[None]:
    """Hold flow ``name``'s training lock (cache/flows/.NAME.lock) for the block; LFTError(busy) at once if
    another process holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(flows_dir() / f".{name}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LFTError(busy) from None
    try:
        yield
    finally:
        lock.release()


def being_trained(name: str) -> bool:
    """True while some process holds the flow's training lock."""
    try:
        with flow_lock(name, "busy"):
            return False
    except LFTError:
        return True


# ---------------------------------------------------------------------------------------------------------
# The saved flows


@dataclass(frozen=True)
class SavedFlow:
    """One saved flow as listings and pages see it (its config.json, typed), without its weights.

    ``error`` is set (and the other fields left at their defaults) when the config cannot be read. ``config``
    keeps the whole file for the settings that have no field here (corpus, seq_len, lr, ...).
    """

    name: str
    dir: Path
    span: Span | None = None
    model: str | None = None
    weights_hash: str | None = None
    method: str = "?"
    k: int | None = None
    status: str | None = None
    steps: int | None = None  # all of the run's steps: flow steps, then distillation steps
    steps_done: int | None = None
    params: int = 0
    teacher_span_params: int = 0
    history: tuple[dict, ...] = ()
    config: dict = field(default_factory=dict, repr=False, compare=False)
    error: str | None = None

    @classmethod
    def from_config(cls, name: str, directory: Path, config: Any) -> SavedFlow:
        """The record of a config.json's contents; a config of the wrong shape gives a record with ``error``."""
        if not isinstance(config, dict):
            return cls(name, directory, error=f"config.json holds a {type(config).__name__}, not an object")
        try:
            span = Span.of(config.get("span"))
        except LFTError as e:
            return cls(name, directory, error=str(e))
        history = config.get("history")
        as_int = lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None  # noqa: E731
        flow_steps = as_int(config.get("steps"))
        return cls(
            name=name, dir=directory, span=span, model=config.get("model"), weights_hash=config.get("weights_hash"),
            method=str(config.get("method", "?")), k=as_int(config.get("k")), status=config.get("status"),
            steps=None if flow_steps is None else flow_steps + (as_int(config.get("distill_steps")) or 0),
            steps_done=as_int(config.get("steps_done")),
            params=as_int(config.get("params")) or 0, teacher_span_params=as_int(config.get("teacher_span_params")) or 0,
            history=tuple(e for e in history if isinstance(e, dict)) if isinstance(history, list) else (),
            config=config,
        )

    @property
    def label(self) -> str:
        """``name (FW, k=3, span 6:12)``: how a page offers the flow in a list."""
        return f"{self.name} ({self.method.upper()}, k={self.k if self.k is not None else '?'}, span {self.span})"

    @property
    def last_nmse(self) -> float | None:
        """The last held-out NMSE of its training history (None before the first evaluation)."""
        values = [e["heldout_nmse"] for e in self.history if e.get("heldout_nmse") is not None]
        return values[-1] if values else None

    @property
    def stamp(self) -> float:
        """Modification time of its weights (changes with every checkpoint; 0 when missing)."""
        try:
            return (self.dir / MODEL_FILE).stat().st_mtime
        except OSError:
            return 0.0

    @property
    def proved(self) -> bool:
        """True when its record carries a proof (``flow_format``; checked when the flow is loaded); False for a
        flow saved before flows recorded a hash of their weights, which loads unverified."""
        return "flow_format" in self.config

    @cached_property
    def provenance(self) -> dict | None:
        """The provenance of a shipped flow installed from the zoo (``zoo.provenance_of``); None when it was
        trained here."""
        from lft_core.zoo import provenance_of

        return provenance_of(self.dir)

    @property
    def origin(self) -> str:
        """'shipped' (installed from the zoo) or 'trained here'."""
        return "shipped" if self.provenance is not None else "trained here"

    @property
    def origin_line(self) -> str:
        """Where the flow comes from, in one line: ``shipped: 800+400 steps on mix, cpu (2 threads), 24 min,
        held-out KL 0.412`` or ``trained here: 400+200 steps on mix, cpu (2 threads), 8 min``."""
        from lft_core.zoo import provenance_line

        if self.provenance is not None:
            return provenance_line(self.provenance)
        flow_steps, distill = self.config.get("steps"), self.config.get("distill_steps") or 0
        elapsed = [e.get("elapsed_s") for e in self.history if isinstance(e.get("elapsed_s"), (int, float))]
        minutes = f", {elapsed[-1] / 60:.0f} min" if elapsed else ""
        device = f", {self.config['device']}" if isinstance(self.config.get("device"), str) else ""
        return f"trained here: {flow_steps}+{distill} steps on {trained_on(self.config)}{device}{minutes}"

    def trained_for(self, teacher: Teacher) -> bool:
        """True when it was trained for exactly this teacher (model id and weights hash)."""
        return self.error is None and self.model == teacher.model_id and self.weights_hash == teacher.weights_hash


def _record(directory: Path) -> SavedFlow:
    try:
        config = read_flow_record(directory / CONFIG_FILE)
    except DamagedRecord as e:
        return SavedFlow(directory.name, directory, error=f"unreadable config ({e})")
    record = SavedFlow.from_config(directory.name, directory, config)
    if record.status == "running" and not being_trained(directory.name):
        # a checkpoint that says "running" while nobody trains it: the trainer was killed
        return SavedFlow.from_config(directory.name, directory, {**config, "status": "interrupted"})
    return record


def list_flows() -> list[SavedFlow]:
    """Every saved flow, by name (damaged ones with ``error`` set). A checkpoint that says "running" while no
    process trains it (the trainer was killed) is reported as "interrupted"."""
    return [_record(d) for d in sorted(flows_dir().iterdir()) if d.is_dir() and not d.name.startswith(".")]


def is_flow_path(spec: str) -> bool:
    """True when ``spec`` names a flow folder by path (it has a '/' or starts with '.' or '~'); otherwise it is
    the name of a saved flow (cache/flows/NAME), never a folder of the current directory."""
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def resolve_flow(spec: str) -> FlowSource:
    """Where the flow ``spec`` is: a bare name is the saved flow cache/flows/NAME (a same-named folder in the
    current directory is never used); a path (``is_flow_path``) is that folder. LFTError if there is none."""
    if not isinstance(spec, str) or not spec:
        raise LFTError(f"bad flow name {spec!r}")
    if is_flow_path(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            hint = ""
            if NAME_RE.match(Path(spec).name) and (flows_dir() / Path(spec).name).is_dir():
                hint = f"; a saved flow {Path(spec).name!r} exists: name it without a path"
            raise LFTError(f"bad flow name {spec!r}: as a path (it has a '/' or starts with '.' or '~') it is not a "
                           f"folder{hint}")
        if not os.path.lexists(path / CONFIG_FILE):
            raise FlowCheckpointError(f"{path} is not a flow checkpoint: it needs config.json and model.safetensors")
        return FlowSource("path", path.absolute(), path.name)
    if not NAME_RE.match(spec):
        raise LFTError(f"bad flow name {spec!r}")
    path = flows_dir() / spec
    if not path.is_dir():
        raise LFTError(f"no flow named {spec!r} (see the flows in {flows_dir()}; a folder elsewhere is given as a "
                       f"path, e.g. ./{spec})")
    return FlowSource("saved", path, spec)


def flow_path(name: str) -> Path:
    """The folder of a flow given by name (in cache/flows) or by path (``resolve_flow``); LFTError if none."""
    return resolve_flow(name).path


def trained_on(config: dict) -> str:
    """The corpus spec a flow was trained on, from its config.json. Flows saved before the corpus was recorded
    were trained on the Python docs (``builtin``), the default of that time."""
    return str(config.get("corpus", BUILTIN))


def read_flow_config(name: str) -> dict:
    """A flow's config.json (by name or folder) without loading its weights, checked by ``read_flow_record``."""
    path = flow_path(name)
    try:
        return read_flow_record(path / CONFIG_FILE)
    except DamagedRecord as e:
        raise LFTError(f"flow {name!r} has a missing or damaged config.json ({e})") from None


def open_flow(name: str, teacher: Teacher | None = None) -> tuple[LatentFlow, dict]:
    """Load a flow by name or folder (``resolve_flow``): (the flow, its config.json), proved by ``load_flow``;
    with a teacher, check it was trained for that model (id and weights hash) and fits it (blocks, field
    shape). Any mismatch is one FlowCheckpointError / LFTError line."""
    flow, config = load_flow(flow_path(name))
    if teacher is not None:
        check_trained_for(name, flow, config, teacher)
    return flow, config


def delete_flow(name: str) -> None:
    """Delete the saved flow ``name`` from cache/flows (a name, never a path).

    Refused with LFTError while a job trains it. The folder is first renamed away (one atomic step), so a
    flow is either listed whole or not at all, even if the removal is interrupted."""
    if not NAME_RE.match(name):
        raise LFTError(f"bad flow name {name!r}")
    path = flows_dir() / name
    if not path.is_dir():
        raise LFTError(f"no flow named {name!r} (see the flows in {flows_dir()})")
    trash = flows_dir() / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
    with flow_lock(name, f"flow {name!r} is being trained right now: stop its job first"):
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
