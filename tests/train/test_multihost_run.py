"""A two-process run of the real trainer, as a pod or SLURM job runs it: checkpoints, SIGTERM, restart, finish.

``launch/local.sh --processes 2 --cpu-devices 2`` starts two JAX processes on localhost (gloo collectives, four
CPU devices in all, data-parallel) training DUO (LoRA) on a one-shard pair dataset. Once its first checkpoint
exists the launcher gets SIGTERM: it passes it on, both processes finish the step, save and exit with 143, and
so does the launcher. The same command then resumes and finishes (0). Its export must equal that of a
one-process run on four devices that sees the same global batches: each process keeps every second record
(record-level host shards; a shuffle buffer of 1 keeps the file order), so the two-process global batch ``k``
is records ``8k, 8k+2, .., 8k+6`` (process 0) then ``8k+1, .., 8k+7`` (process 1); the one-process run reads a
copy of the dataset written in that order.

Tolerance 1e-5 (absolute, on weights of order 0.1-1): the programs are the same, but the gradient all-reduce
runs over gloo between processes in one run and inside XLA in the other, so float32 sums may be ordered
differently.
"""
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from tests.parallel.test_sharding import FAST_COMPILE
from tests.subprocess_helper import ROOT, compilation_cache, start

pytestmark = pytest.mark.xdist_group("multihost")

PAIRS = 64
BATCH = 8
STEPS = 16


def _datasets(tmp):
  from sc_dpo_jax.data import records, schema, synthetic
  pairs = list(synthetic.synthetic_pairs(PAIRS, 16, seed=0))
  spec = schema.pair_spec(has_costs=True, has_harmful_prompt=True)
  records.write_records(str(tmp / "pairs"), spec, pairs, name="pairs", num_shards=1)
  order = [b * BATCH + i for b in range(PAIRS // BATCH) for i in [*range(0, BATCH, 2), *range(1, BATCH, 2)]]
  records.write_records(str(tmp / "pairs_global_order"), spec, [pairs[i] for i in order], name="pairs",
                        num_shards=1)


def _main_args(workdir, data):
  return [f"--config={ROOT}/configs/duo.py:tiny", f"--workdir={workdir}", f"--config.data.train={data}",
          "--config.data.shuffle_buffer=1", f"--config.data.batch_size={BATCH}", f"--config.train.steps={STEPS}",
          "--config.train.checkpoint_every=2", "--config.train.log_every=2", "--config.train.progress=false",
          "--config.train.eval_prompts=()"]     # no sample grid: its sampler would compile in every run


def _launch(tmp, workdir, data, processes, log_name):
  # A persistent compilation cache: the restarted two-process run reuses the first one's programs.
  env = dict(compilation_cache(tmp / "jax_cache"), TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=FAST_COMPILE)
  cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "--python", sys.executable, "--cpu-devices",
         str(4 // processes)]
  if processes > 1:
    cmd += ["--processes", str(processes)]
  return start([*cmd, "--", *_main_args(workdir, data)], tmp / log_name, env=env)


def _unet(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"))


def test_two_processes_checkpoint_stop_resume_and_match_one_process(tmp_path):
  _datasets(tmp_path)
  two, one = tmp_path / "two", tmp_path / "one"

  # First run: SIGTERM once checkpoint 2 is complete (Orbax renames its tmp folder when it is).
  job = _launch(tmp_path, two, tmp_path / "pairs", 2, "first.log")
  deadline = time.time() + 240
  while not (two / "checkpoints" / "2").is_dir():
    if not job.running():
      job.fail("the first run ended before its first checkpoint")
    if time.time() > deadline:
      job.stop(grace=30)         # SIGTERM: the launcher passes it on to its processes
      job.fail("no checkpoint after 240 s")
    time.sleep(0.2)
  job.send_signal(signal.SIGTERM)
  text = job.wait(timeout=120, status=143)        # the launcher's status after SIGTERM
  assert "Cannot serialize" not in text and "Traceback" not in text, text[-4000:]
  saved = sorted(int(p) for p in os.listdir(two / "checkpoints") if p.isdigit())
  stopped_at = saved[-1]
  assert 2 <= stopped_at < STEPS, (saved, text[-3000:])
  assert "stopped by a signal" in text

  # Second run: the same command resumes and finishes.
  text = _launch(tmp_path, two, tmp_path / "pairs", 2, "second.log").wait(timeout=300)
  assert f"resumed from step {stopped_at}" in text, text[-4000:]
  summary = json.loads((two / "summary.json").read_text())
  assert summary["final_step"] == STEPS and not summary["stopped_by_signal"]
  logged = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
  assert logged == sorted(set(logged)), f"metrics.jsonl repeats steps: {logged}"
  assert logged[-1] == STEPS

  # One process, four devices, the same global batches.
  _launch(tmp_path, one, tmp_path / "pairs_global_order", 1, "one.log").wait(timeout=300)

  got, want = _unet(two), _unet(one)
  assert got.keys() == want.keys()
  worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in got)
  base = _unet_base(one)
  moved = max(float(np.max(np.abs(want[k] - base[k]))) for k in want)
  assert moved > 1e-4, f"training changed nothing (max {moved}): the comparison would prove nothing"
  assert worst <= 1e-5, f"two-process export differs from the one-process export by {worst}"


def _unet_base(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, "base_model", "unet", "diffusion_pytorch_model.safetensors"))
