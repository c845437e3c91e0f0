"""``python -m lft_core <command>``: argument parsing only; every command calls library functions.

Each command prints progress to stderr, a readable summary to stdout, and with ``--json PATH`` writes its
results as JSON. Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import LFTError


def _write_json(path: str | None, data: dict) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, p)


def _span(text: str) -> tuple[int, int]:
    try:
        m, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"span must look like M:N (e.g. 6:12), got {text!r}") from None
    return m, n


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


# ---------------------------------------------------------------------------------------------------------
def cmd_cache(a: argparse.Namespace) -> dict:
    from .activations import ensure_activations, parse_layers
    from .corpus import load_corpus
    from .teacher import load_teacher

    teacher = load_teacher(a.model, trust_remote_code=a.trust_remote_code)
    corpus = load_corpus(a.corpus)
    layers = parse_layers(a.layers, teacher.n_layers)
    cache = ensure_activations(teacher, corpus, a.seq_len, a.windows, layers, split=a.split,
                               batch_size=a.batch_size)
    tokens = a.windows * a.seq_len
    result = {
        "key": cache.key, "dir": str(cache.dir), "layers": cache.layers, "windows": a.windows,
        "seq_len": a.seq_len, "d_model": teacher.d_model, "hit": cache.hit, "seconds": round(cache.seconds, 4),
        "tokens_per_second": round(tokens / cache.seconds, 1) if cache.seconds > 0 else None,
        "computed_layers": list(cache.computed_layers),
    }
    print(f"{'hit' if cache.hit else 'computed'} {cache.key}: layers {cache.layers} in {cache.seconds:.2f} s")
    return result


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {"cache": cmd_cache}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lft_core", description="LFT Explorer engine (Latent Flow Transformers)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, corpus: bool = True) -> None:
        sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a folder")
        if corpus:
            sp.add_argument("--corpus", default="builtin", help="builtin, a .txt/.jsonl file or folder, hf:NAME")
        sp.add_argument("--json", metavar="PATH", help="write the results as JSON here")
        sp.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")

    c = sub.add_parser("cache", help="cache hidden states of a model over a corpus")
    common(c)
    c.add_argument("--seq-len", type=_positive, default=128)
    c.add_argument("--windows", type=_positive, default=64)
    c.add_argument("--layers", default="all", help="all, a:b or 0,6,12")
    c.add_argument("--split", choices=["train", "heldout"], default="train")
    c.add_argument("--batch-size", type=_positive, default=8)

    for register in _EXTRA_PARSERS:
        register(sub, common)
    return p


# Other modules' commands register here (kept in this file so the CLI is one place).
_EXTRA_PARSERS: list[Callable] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        result = COMMANDS[args.command](args)
    except LFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    result.setdefault("wall_seconds", round(time.perf_counter() - start, 3))
    _write_json(getattr(args, "json", None), result)
    return 0
