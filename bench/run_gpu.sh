#!/usr/bin/env bash
# Issue 9 on one GPU: the PyTorch peers (eager AMP bf16, torch.compile) and ours, step and sampling.
#
#   bash bench/run_gpu.sh                    # from the repository root; JSON under $OUT (or bench/results)
#   STEPS=20 PEAK_TFLOPS=989 bash bench/run_gpu.sh
#
# Needs jax[cuda], torch, transformers, diffusers and ml_collections (the device image lacks the last two:
# carry their wheels, see docs/performance.md). Each run writes <name>.json and <name>.log; a failing run is
# reported and the others still run; the exit status is 1 if any failed.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results}"
STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-3}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"        # H100 SXM dense bf16; H200 is the same chip (989)
SAMPLE_STEPS="${SAMPLE_STEPS:-50}"
# Extra flags for the peer's step, e.g. PEER_STEP_FLAGS=--gradient_checkpointing if eager runs out of memory.
read -r -a peer_step_flags <<<"${PEER_STEP_FLAGS:-}"
mkdir -p "$OUT_DIR"

missing=""
for module in jax torch transformers diffusers ml_collections flax optax; do
  "$PYTHON" -c "import $module" 2>/dev/null || missing="$missing $module"
done
if [ -n "$missing" ]; then
  echo "bench/run_gpu.sh: missing Python modules:$missing" >&2
  echo "  carry their wheels (docs/performance.md, 'Running it'), then install them before this script" >&2
  exit 2
fi
"$PYTHON" -c "import jax; d = jax.devices()[0]; print('jax', jax.__version__, d.platform, d.device_kind)"
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and
  torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

failed=""
bench() {  # bench NAME COMMAND...: run it, keep its log, note a failure
  local name="$1"
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  if "$@" >"$OUT_DIR/$name.log" 2>&1; then
    grep -E "pairs/s|images/s" "$OUT_DIR/$name.log" | tail -n 1
  else
    echo "FAILED ($name); last lines of $OUT_DIR/$name.log:"
    tail -n 15 "$OUT_DIR/$name.log"
    failed="$failed $name"
  fi
  echo "    ($((SECONDS - start)) s)"
}

peer=("$PYTHON" bench/peer_torch.py --arch=sd15 --steps="$STEPS" --warmup="$WARMUP" --peak_tflops="$PEAK_TFLOPS")
ours=("$PYTHON" -m sc_dpo_jax.bench --steps="$STEPS" --warmup="$WARMUP" --peak_tflops="$PEAK_TFLOPS")
sample=(--mode=sample --batch=16 --sample_steps="$SAMPLE_STEPS" --steps=3 --warmup=1)

bench ours_diffusion_dpo "${ours[@]}" --config=configs/diffusion_dpo.py:sd15 --json="$OUT_DIR/ours_diffusion_dpo.json"
bench peer_step_eager "${peer[@]}" --mode=step --batch_pairs=8 "${peer_step_flags[@]}" \
  --json="$OUT_DIR/peer_step_eager.json"
bench peer_step_compile "${peer[@]}" --mode=step --batch_pairs=8 --compile "${peer_step_flags[@]}" \
  --json="$OUT_DIR/peer_step_compile.json"
bench ours_sc_dpo "${ours[@]}" --config=configs/sc_dpo.py:sd15 --json="$OUT_DIR/ours_sc_dpo.json"
bench ours_duo_lora "${ours[@]}" --config=configs/duo.py:sd15 --config.data.batch_size=8 \
  --json="$OUT_DIR/ours_duo_lora.json"
bench ours_sample "$PYTHON" -m sc_dpo_jax.bench --config=configs/diffusion_dpo.py:sd15 "${sample[@]}" \
  --json="$OUT_DIR/ours_sample.json"
bench peer_sample_eager "$PYTHON" bench/peer_torch.py --arch=sd15 "${sample[@]}" \
  --json="$OUT_DIR/peer_sample_eager.json"
bench peer_sample_compile "$PYTHON" bench/peer_torch.py --arch=sd15 "${sample[@]}" --compile \
  --json="$OUT_DIR/peer_sample_compile.json"

if [ -n "$failed" ]; then
  echo "failed:$failed"
  exit 1
fi
echo "all runs done; JSON in $OUT_DIR"
