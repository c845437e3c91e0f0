"""What a saved flow's record must prove before the flow is used: the schema of config.json (``flow_schema``,
read by ``read_flow_record`` through the one bounded, schema-checking ``atomic.read_record``), the proof that
config.json and the weights belong together (``_prove``: the weights hash to the recorded sha256 and carry the
record they were saved with, ``lft_record``), and that the flow was trained for a teacher (``check_trained_for``:
model id, weights hash, blocks, field shape). ``store`` saves and loads flows through these checks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lft_core.atomic import DamagedRecord, check_fields, file_sha256, read_record
from lft_core.errors import LFTError
from lft_core.flow.field import FieldSpec
from lft_core.flow.latent import LatentFlow
from lft_core.span import Span

CONFIG_FILE = "config.json"  # the record's file in a flow folder

if TYPE_CHECKING:
    from lft_core.model.teacher import Teacher


FLOW_FORMAT = 2  # config.json records weights_sha256 and the weights carry their record (``lft_record``)


RECORD_META = "lft_record"  # the safetensors metadata key holding the record the weights were saved with


UNCERTIFIED = ("status", "weights_sha256", "weights_sha256_previous")
"""The config.json fields the weights' own record does not cover: the status (a killed trainer leaves "running")
and the weights' hashes (computed from the weights file, which holds the record)."""


IDENTITY = ("span", "field_spec", "model", "weights_hash", "n_layers")  # compared first, so the message names them


class FlowCheckpointError(LFTError):
    """A flow checkpoint folder is missing, truncated, or does not match its config."""


@dataclass(frozen=True)
class FlowProof:
    """What loading proved about a flow (``flow.proof`` after ``load_flow``): ``verified`` when its weights hash to
    the sha256 its record holds and the record is the one they were saved with; False for a flow saved before
    flows carried a proof (it loads, unverified)."""

    verified: bool
    weights_sha256: str
    note: str = ""


# Fields of a flow record beyond TrainConfig's (``training.flow_record``, ``save_flow``, checkpoints). A writer
# that adds a field to config.json adds it here (``save_flow`` refuses a record with an unknown field).
_RECORD_FIELDS: dict[str, Any] = {
    "span": object,  # checked by Span.of, whose message says what a span must be
    "name": (str, type(None)), "model": str, "weights_hash": str, "n_layers": int, "data_key": str,
    "heldout_key": str, "split_rule": str, "teacher_span_params": int, "params": int, "world_size": int, "device": str,
    "global_batch": int, "batch_plan": str, "steps_done": int, "status": str, "history": list,
    "field_spec": dict, "flow_format": int, "weights_sha256": str, "weights_sha256_previous": str,
}


_ANNOTATION_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),), "dict": (dict,),
    "list": (list,),
}


def _kinds_of(annotation: Any) -> Any:
    """The JSON types a TrainConfig field annotation (a string: ``float | None``) allows; ``object`` if unknown."""
    kinds: list[type] = []
    for part in str(annotation).split("|"):
        if part.strip() not in _ANNOTATION_KINDS:
            return object
        kinds.extend(_ANNOTATION_KINDS[part.strip()])
    return tuple(kinds)


def flow_schema() -> dict[str, Any]:
    """Every field a flow record may hold, with its JSON types: TrainConfig's settings (derived from the dataclass,
    so a new setting is known at once) and the record's own fields."""
    from dataclasses import fields as dataclass_fields

    from lft_core.flow.config import TrainConfig  # config imports this module (NAME_RE)

    return {**{f.name: _kinds_of(f.type) for f in dataclass_fields(TrainConfig)}, **_RECORD_FIELDS}


def read_flow_record(path: Path) -> dict:
    """A flow's config.json through the one record reader: a bounded regular file, every field of its type. A
    record with a proof (``flow_format``) must hold ``span``, ``field_spec`` and ``weights_sha256`` and nothing
    unknown; an older one may hold fields of older versions. DamagedRecord naming the first problem otherwise."""
    data = read_record(path)
    schema = flow_schema()
    if "flow_format" in data:
        required = {"flow_format": int, "span": object, "field_spec": dict, "weights_sha256": str}
        check_fields(data, path.name, required, schema, extra=False)
        if data["flow_format"] != FLOW_FORMAT:
            raise DamagedRecord(f"{path.name}: field 'flow_format' is {data['flow_format']}, not {FLOW_FORMAT}")
    else:
        check_fields(data, path.name, None, schema, extra=True)
    return data


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _certified(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in UNCERTIFIED}


def _weights_record(model_path: Path) -> dict | None:
    """The record a weights file was saved with (its ``lft_record`` metadata), None when it has none (an older
    flow); FlowCheckpointError when it is there but not a JSON object."""
    from safetensors import safe_open

    with safe_open(str(model_path), framework="pt") as f:
        text = (f.metadata() or {}).get(RECORD_META)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise FlowCheckpointError(f"flow weights {model_path} carry a damaged record")
    return data


def _show(key: str, value: Any) -> str:
    if key == "span" and isinstance(value, list) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    text = _canonical(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_record(directory: Path, config: dict, saved: dict, spec: FieldSpec, span: Span, keys: list[str]) -> None:
    """FlowCheckpointError naming the first of ``keys`` in which config.json differs from the weights' record."""
    mine, theirs = _certified(config), _certified(saved)
    for key in dict.fromkeys(keys):
        if key in UNCERTIFIED or (key not in mine and key not in theirs):
            continue
        if key in mine and key in theirs and _canonical(mine[key]) == _canonical(theirs[key]):
            continue
        if key == "span":
            raise FlowCheckpointError(
                f"flow {directory.name!r} (span {span}, width {spec.d_model}) does not fit its weights, which were "
                f"trained for span {_show(key, theirs.get(key))}: its config.json was edited or damaged")
        said = _show(key, mine[key]) if key in mine else "nothing"
        was = _show(key, theirs[key]) if key in theirs else "nothing"
        raise FlowCheckpointError(f"flow {directory.name!r}: config.json says {key} = {said}, but its weights were "
                                  f"saved with {key} = {was}: its config.json was edited or damaged")


def _prove(directory: Path, config: dict, model_path: Path, spec: FieldSpec, span: Span) -> tuple[dict, FlowProof]:
    """Check that ``config`` (config.json) and the weights file belong together; (the record to use, the proof).
    FlowCheckpointError naming what differs otherwise."""
    sha = file_sha256(model_path)
    saved = _weights_record(model_path)
    recorded = config.get("weights_sha256")
    if saved is None:
        if sha == config.get("weights_sha256_previous"):  # an old flow's first proved checkpoint, cut midway
            return config, FlowProof(False, sha, "saved before flows recorded a hash of their weights (its last "
                                                 "checkpoint was interrupted): unverified")
        if "flow_format" in config or recorded is not None:
            raise FlowCheckpointError(
                f"flow weights {model_path} do not match its config: config.json records the sha256 of its weights "
                f"but these weights carry no record (swapped for an older flow's, or rewritten?)")
        return config, FlowProof(False, sha, "saved before flows recorded a hash of their weights: unverified")
    if recorded is None:
        raise FlowCheckpointError(f"invalid flow config {directory / CONFIG_FILE}: field 'weights_sha256' is missing, "
                                  f"but the weights carry a record (config.json was edited or replaced)")
    if sha == recorded:
        _same_record(directory, config, saved, spec, span, list(IDENTITY) + sorted(set(config) | set(saved)))
        return config, FlowProof(True, sha)
    if sha == config.get("weights_sha256_previous"):  # a checkpoint cut between its weights and its record
        _same_record(directory, config, saved, spec, span, list(IDENTITY))
        return ({**saved, "status": config.get("status", saved.get("status")), "weights_sha256": sha},
                FlowProof(True, sha, "the previous checkpoint (the last one was interrupted)"))
    raise FlowCheckpointError(
        f"flow weights {model_path} do not match its config: their sha256 is {sha[:12]}…, config.json records "
        f"{recorded[:12]}… (the weights were edited, or swapped with another flow's)")


SHAPE = ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "mlp", "pos", "norm", "parallel_residual",
         "attn_bias", "mlp_bias")
"""The FieldSpec fields that make a flow's velocity field the shape of a teacher block."""


def check_trained_for(name: str, flow: LatentFlow, config: dict, teacher: Teacher) -> None:
    """FlowCheckpointError / LFTError unless the loaded flow ``name`` was trained for ``teacher`` (model id and
    weights hash) and fits it (blocks, width, field shape)."""
    for key in ("model", "weights_hash"):
        if not isinstance(config.get(key), str):
            raise FlowCheckpointError(f"flow {name!r}: its config.json has no {key!r} field, so it cannot be "
                                      f"checked against {teacher.model_id}")
    if config["model"] != teacher.model_id:
        raise LFTError(f"flow {name!r} was trained for model {config['model']!r}, not {teacher.model_id!r}")
    if config["weights_hash"] != teacher.weights_hash:
        raise LFTError(f"flow {name!r} was trained for model {config['model']!r} with weights "
                       f"{config['weights_hash'][:12]}…, but this {teacher.model_id!r} has weights "
                       f"{teacher.weights_hash[:12]}… (the model changed since): train the flow again")
    if flow.span.n > teacher.n_layers or flow.spec.d_model != teacher.d_model:
        raise FlowCheckpointError(
            f"flow {name!r} (span {flow.span}, width {flow.spec.d_model}) does not fit {teacher.model_id} "
            f"({teacher.n_layers} blocks, width {teacher.d_model}): its config.json was edited or damaged"
        )
    mine, block = flow.spec.to_dict(), teacher.field_spec(flow.spec.t_dim).to_dict()
    for key in SHAPE:
        if mine.get(key) != block.get(key):
            raise FlowCheckpointError(
                f"flow {name!r} has a velocity field of another shape than {teacher.model_id}'s blocks ({key} "
                f"{mine.get(key)!r}, the model's {block.get(key)!r}): it was not trained for this model")
