#!/bin/bash
# The GPU checks of docs/BENCHMARKS.md ("Beyond one machine"), as run on the lent H100 machine.
# The embedded weights (540 MB) cannot travel to that machine, so the teacher there is SmolLM2-135M's
# architecture with random weights (speed and memory do not depend on the values). Prepare here:
#   mkdir -p .gpu/smol && cp cache/models/smollm2-135m/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smol/
# then run `bash scripts/gpu_check.sh` on the GPU machine from the repo root, with $OUT set to a folder for the logs.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LFT_CACHE_DIR=/tmp/lftc
mkdir -p /tmp/lftc
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
python3 - <<'PY' 2>&1 | tail -3
import torch, shutil
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(".gpu/smol")
m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
m.save_pretrained("/tmp/smol")
for f in Path(".gpu/smol").iterdir():
    if f.name != "config.json":
        shutil.copy(f, "/tmp/smol/" + f.name)
print("random SmolLM2-135M-shaped teacher saved")
PY
echo "== bench_train (random pairs) =="
python3 - <<'PY' 2>&1 | grep -v Loading | tee $OUT/bench_train.txt
import json
from lft_core.loading import load_teacher
from lft_core.bench import bench_train
t = load_teacher("/tmp/smol")
for batch in (8, 64):
    print(json.dumps(bench_train(t, span=(6, 12), steps=30, batch=batch, seq_len=128, k=3)))
PY
echo "== cache on cuda, 256 train + 16 heldout windows =="
time python3 -m lft_core cache --model /tmp/smol --corpus builtin --device cuda --windows 256 --layers 6,12 --json $OUT/cache.json 2>&1 | tail -2
python3 -m lft_core cache --model /tmp/smol --corpus builtin --device cuda --windows 16 --layers 6,12 --split heldout 2>&1 | tail -1
echo "== train FW and SFM, 300 steps, flow matching only (no distillation), CUDA bf16 =="
for method in fw sfm; do
  python3 -m lft_core train --model /tmp/smol --device cuda --corpus builtin --distill-steps 0 --span 6:12 --method $method --steps 300 --name gpu-$method --json $OUT/train_$method.json 2>&1 | tail -1
done
echo "== torchrun, 1 rank, resume to 400 =="
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m lft_core train --model /tmp/smol --corpus builtin --distill-steps 0 --span 6:12 --method fw --steps 400 --name gpu-fw --resume 2>&1 | tail -1
echo "== eval on cuda vs device-map auto (GPU 0 capped at 150MiB, rest on CPU) =="
python3 -m lft_core eval --flow gpu-fw --device cuda --windows 8 --k 3 --skip 2 --json $OUT/eval_cuda.json 2>&1 | tail -6
LFT_CACHE_DIR=/tmp/lftc python3 - <<'PY' 2>&1 | grep -v Loading | tee $OUT/devmap.txt
from lft_core.loading import load_teacher
t = load_teacher("/tmp/smol", device_map="auto", max_memory={0: "150MiB", "cpu": "8GiB"})
devs = sorted(set(str(v) for v in t.model.hf_device_map.values()))
print("device map devices:", devs, "blocks per device:", {d: sum(1 for k, v in t.model.hf_device_map.items() if str(v) == d) for d in devs})
PY
python3 -m lft_core eval --flow gpu-fw --device-map auto --max-memory 0=150MiB,cpu=8GiB --windows 8 --k 3 --skip 2 --json $OUT/eval_devmap.json 2>&1 | tail -6
python3 - <<'PY'
import json, os
a = json.load(open(os.environ["OUT"] + "/eval_cuda.json")); b = json.load(open(os.environ["OUT"] + "/eval_devmap.json"))
print("cuda rows:", [(r["model"], r["k"], r.get("where"), round(r["kl"], 5), r.get("nmse")) for r in a["rows"]])
print("devmap rows:", [(r["model"], r["k"], r.get("where"), round(r["kl"], 5), r.get("nmse")) for r in b["rows"]])
PY
