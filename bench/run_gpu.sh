#!/usr/bin/env bash
# Issue 9 on one GPU: ours and the PyTorch peers (eager AMP bf16, torch.compile), training step and sampling,
# the numerics checks and the profiles, in one call that fits the device tool's limits.
#
#   bash bench/run_gpu.sh                        # from the repository root; results under $OUT (or bench/results)
#   ONLY="peer_step_compile peer_sample_compile ours_sc_dpo" bash bench/run_gpu.sh   # a second call: the rest
#   SMOKE=1 bash bench/run_gpu.sh                # every run at the tiny size, on a CPU (tests/test_run_gpu.py)
#
# Runs, most important first; each is skipped when it would not finish inside BUDGET_S (default 480 s for all),
# and killed at the budget's end, so that what ran comes back:
#   ours_diffusion_dpo (remat convs_and_dots_saveable, the sd15 default; with a profile), peer_step_eager
#   (profile), ours_sample (profile), peer_sample_eager, ours_dpo_noremat (no remat), ours_check (bf16 vs
#   float32 forward; cuDNN vs reference attention), ours_duo_lora, peer_step_compile, peer_sample_compile,
#   ours_sc_dpo, gpu_tests (pytest tests/gpu).
# Output, three files (the device tool returns at most eight): results.json and table.md (bench/collect.py),
# and runs.tar.gz (each run's JSON and log, status.tsv, gpu_tests.xml).
#
# Needs jax, torch, transformers, diffusers, ml_collections, flax, optax (the device image lacks diffusers and
# ml_collections: carry their wheels, docs/performance.md "Running it"). Env: PYTHON, STEPS (10), WARMUP (3),
# PEAK_TFLOPS (989), SAMPLE_STEPS (50), BUDGET_S (480), ONLY / SKIP (run names), PEER_STEP_FLAGS (e.g.
# --gradient_checkpointing). Exit status 1 if a run failed or timed out, 0 otherwise (skipped runs are not
# failures: the table says "not run (time budget)").
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results}"
SMOKE="${SMOKE:-0}"
ONLY="${ONLY:-}"
SKIP="${SKIP:-}"
read -r -a peer_step_flags <<<"${PEER_STEP_FLAGS:-}"
if [ "$SMOKE" = 1 ]; then
  ARCH=tiny STEPS="${STEPS:-1}" WARMUP="${WARMUP:-1}" SAMPLE_STEPS="${SAMPLE_STEPS:-2}" BATCH=4 SAMPLE_BATCHES=1
  BUDGET_S="${BUDGET_S:-1800}"
  CHECK_FLAGS=(--config.model.attention=xla --config.model.dtype=bfloat16 --check_rel_tol=0.05)
else
  ARCH=sd15 STEPS="${STEPS:-10}" WARMUP="${WARMUP:-3}" SAMPLE_STEPS="${SAMPLE_STEPS:-50}" BATCH=16 SAMPLE_BATCHES=3
  BUDGET_S="${BUDGET_S:-480}"
  CHECK_FLAGS=()
fi
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"        # H100 SXM dense bf16; the H200 is the same chip (989)
RUNS="$OUT_DIR/runs"
rm -rf "$RUNS"
mkdir -p "$RUNS"
: >"$RUNS/status.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

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
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true

START=$SECONDS
failed=""
wanted() {  # wanted NAME: in ONLY (when given) and not in SKIP
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $1 "* ]]; then return 1; fi
  [[ " $SKIP " != *" $1 "* ]]
}
run() {  # run NAME ESTIMATE_S COMMAND...: run it within the budget, log it, record its status
  local name="$1" estimate="$2"
  shift 2
  wanted "$name" || return 0
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt "$estimate" ] && { [ "$SMOKE" != 1 ] || [ "$left" -lt 1 ]; }; then
    echo "=== $name: skipped (${left} s left of the budget, estimate ${estimate} s)"
    printf '%s\tskipped\t0\t%s\n' "$name" "$*" >>"$RUNS/status.tsv"
    return 0
  fi
  echo "=== $name: $*"
  local start=$SECONDS status=ok
  timeout --signal=TERM --kill-after=10 "$left" "$@" >"$RUNS/$name.log" 2>&1
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=timeout
  elif [ "$rc" != 0 ]; then
    status=failed
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$*" >>"$RUNS/status.tsv"
  if [ "$status" = ok ]; then
    grep -E "pairs/s|images/s|^check|passed|failed" "$RUNS/$name.log" | tail -n 2
  else
    echo "$status ($name, exit $rc); last lines of its log:"
    tail -n 15 "$RUNS/$name.log"
    failed="$failed $name"
  fi
  echo "    ($((SECONDS - start)) s; $((SECONDS - START)) s of $BUDGET_S used)"
}

peer=("$PYTHON" bench/peer_torch.py --arch="$ARCH" --steps="$STEPS" --warmup="$WARMUP" --peak_tflops="$PEAK_TFLOPS")
ours=("$PYTHON" -m sc_dpo_jax.bench --steps="$STEPS" --warmup="$WARMUP" --peak_tflops="$PEAK_TFLOPS")
sample=(--mode=sample --batch="$BATCH" --sample_steps="$SAMPLE_STEPS" --steps="$SAMPLE_BATCHES" --warmup=1)
profile_dir="${TMPDIR:-/tmp}/sc_dpo_jax_profiles"

# Estimates (s) are for one H100/H200 (host init of 860 M random parameters, AOT compile, warm-up, timing).
remat=--config.model.remat_policy=convs_and_dots_saveable
run ours_diffusion_dpo 150 "${ours[@]}" --config="configs/diffusion_dpo.py:$ARCH" "$remat" \
  --profile_dir="$profile_dir/ours_step" --json="$RUNS/ours_diffusion_dpo.json"
run peer_step_eager 60 "${peer[@]}" --mode=step --batch_pairs=8 --profile_steps=2 "${peer_step_flags[@]}" \
  --json="$RUNS/peer_step_eager.json"
run ours_sample 150 "${ours[@]}" --config="configs/diffusion_dpo.py:$ARCH" "${sample[@]}" \
  --profile_dir="$profile_dir/ours_sample" --profile_steps=1 --json="$RUNS/ours_sample.json"
run peer_sample_eager 60 "$PYTHON" bench/peer_torch.py --arch="$ARCH" "${sample[@]}" \
  --json="$RUNS/peer_sample_eager.json"
run ours_dpo_noremat 150 "${ours[@]}" --config="configs/diffusion_dpo.py:$ARCH" --config.model.remat_policy=none \
  --json="$RUNS/ours_dpo_noremat.json"
run ours_check 60 "$PYTHON" -m sc_dpo_jax.bench --config="configs/diffusion_dpo.py:$ARCH" --mode=check \
  "${CHECK_FLAGS[@]}" --json="$RUNS/ours_check.json"
run ours_duo_lora 120 "${ours[@]}" --config="configs/duo.py:$ARCH" --config.data.batch_size=8 \
  --json="$RUNS/ours_duo_lora.json"
run peer_step_compile 240 "${peer[@]}" --mode=step --batch_pairs=8 --compile "${peer_step_flags[@]}" \
  --json="$RUNS/peer_step_compile.json"
run peer_sample_compile 180 "$PYTHON" bench/peer_torch.py --arch="$ARCH" "${sample[@]}" --compile \
  --json="$RUNS/peer_sample_compile.json"
run ours_sc_dpo 120 "${ours[@]}" --config="configs/sc_dpo.py:$ARCH" "$remat" --json="$RUNS/ours_sc_dpo.json"
run gpu_tests 60 "$PYTHON" -m pytest -q tests/gpu --junitxml="$RUNS/gpu_tests.xml"

"$PYTHON" bench/collect.py "$RUNS" --out "$OUT_DIR" \
  --command "bash bench/run_gpu.sh (SMOKE=$SMOKE STEPS=$STEPS WARMUP=$WARMUP SAMPLE_STEPS=$SAMPLE_STEPS)" \
  >/dev/null || failed="$failed collect"
tar -czf "$OUT_DIR/runs.tar.gz" -C "$OUT_DIR" runs && rm -rf "$RUNS"
echo "table: $OUT_DIR/table.md; every run's JSON and log: $OUT_DIR/runs.tar.gz ($((SECONDS - START)) s)"
if [ -n "$failed" ]; then
  echo "failed:$failed"
  exit 1
fi
