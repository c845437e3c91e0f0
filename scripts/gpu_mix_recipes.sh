#!/bin/bash
# The GPU-length recipe on the broad mixture (issue 20), for the next task that is lent a GPU: NOT RUN YET (the
# task that built the mixture had no device). Prepare the teacher's weights on the machine as scripts/gpu_recipes.sh
# did (the GGUF split in halves, converted into /tmp/smolreal), then:
#     bash scripts/gpu_mix_recipes.sh            # ~2 x 4 min of training on one H100, rows stream into $OUT/grid.jsonl
# The mixture travels with the repository (lft_core/data/mix.jsonl.gz); evaluation is per domain: each part of the
# mixture and the Debian licences when the machine has them (recipe_grid's default --eval-corpora).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LFT_CACHE_DIR=/tmp/lftc
[ -f /tmp/smolreal/config.json ] || { echo "convert the teacher into /tmp/smolreal first (scripts/gpu_recipes.sh)"; exit 3; }
for span in 12:18 1:7; do
  python3 scripts/recipe_grid.py --model /tmp/smolreal --device cuda --spans $span \
     --recipes fw400-w1024-kl200,fw3000-w2048-b32-kl1000 --train-corpus mix --tag gpu-mix --out $OUT/grid.jsonl \
     2>&1 | grep -v "it/s\|Loading" | cut -c1-160 | tail -4
done
