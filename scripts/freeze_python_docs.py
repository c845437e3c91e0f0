"""Freeze the Python-docs corpus (``builtin``): CPython's ``pydoc_data.topics`` written to a file the engine ships.

``builtin`` used to be read from the running CPython, so its text (and every number measured on it) changed with
the interpreter: teacher perplexity 25.9 on one machine, 20.3 on another. The engine now reads
``lft_core/data/python_docs.jsonl.gz`` instead: one JSON object a line, ``{"topic": ..., "text": ...}``, topics
in sorted order, the same texts ``pydoc_data.topics`` gave (stripped, empty ones left out), plus
``lft_core/data/python_docs.json`` saying which CPython they came from and the file's sha256.

    .venv/bin/python scripts/freeze_python_docs.py [--out-dir lft_core/data]

Deterministic: gzip with mtime 0, so the same CPython gives the same bytes. Takes about a second.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lft_core.atomic import write_bytes, write_text  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(ROOT / "lft_core" / "data"))
    a = p.parse_args()
    from pydoc_data.topics import topics

    out = Path(a.out_dir)
    lines = [json.dumps({"topic": k, "text": topics[k].strip()}, ensure_ascii=False, sort_keys=True)
             for k in sorted(topics) if topics[k].strip()]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    write_bytes(out / "python_docs.jsonl.gz", buf.getvalue())
    meta = {"source": "pydoc_data.topics", "python": platform.python_version(),
            "implementation": platform.python_implementation(), "topics": len(lines),
            "characters": sum(len(json.loads(x)["text"]) for x in lines),
            "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "built_by": "scripts/freeze_python_docs.py"}
    write_text(out / "python_docs.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps(meta), file=sys.stderr)


if __name__ == "__main__":
    main()
