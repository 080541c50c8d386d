"""The DPO-family trainer end to end through ``python -m sc_dpo_jax.main``: train, checkpoint, export, and
preemption (SIGTERM mid-run, restart) ending bit-identical to an uninterrupted run.

The runs are subprocesses (as a user runs them) sharing a persistent compilation cache, and compile with
LLVM's optimisations off (``--xla_backend_optimization_level=0``: a third of the compile time for six steps
of a tiny model; every run of a comparison uses the same flags, so results stay bit-comparable).
"""
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from tests.subprocess_helper import FAILS, ROOT, compilation_cache, run, start

pytestmark = pytest.mark.xdist_group("trainer")

STEPS = 6


def _command(workdir, config="configs/diffusion_dpo.py:tiny", *overrides):
  return [sys.executable, "-m", "sc_dpo_jax.main", f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}",
          f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=3", "--config.train.log_every=1",
          "--config.train.progress=False", "--config.train.eval_prompts=('a square',)",
          "--config.train.sample_steps=2", *overrides]


def _env(cache):
  return dict(compilation_cache(cache), TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="--xla_backend_optimization_level=0")


def _run(cmd, cache, timeout=600, status=0, cwd=ROOT):
  return run(cmd, env=_env(cache), cwd=cwd, timeout=timeout, status=status)


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _unet_bytes(workdir):
  with open(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  root = tmp_path_factory.mktemp("trainer")
  cache = root / "jax_cache"
  workdir = root / "uninterrupted"
  _run(_command(workdir), cache)
  return root, cache, workdir


def test_tiny_run_trains_checkpoints_logs_and_exports_for_diffusers(uninterrupted):
  root, _, workdir = uninterrupted
  summary = _summary(workdir)
  assert summary["final_step"] == STEPS and not summary["stopped_by_signal"] and summary["skipped_updates"] == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for key in ("loss", "implicit_accuracy", "grad_norm", "pairs_per_s", "tflops_per_device", "data/bad_records"):
    assert key in records[-1], key
  assert all(np.isfinite(r["loss"]) for r in records)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{STEPS:06d}.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  # diffusers reads the export; its UNet weights are ours.
  import torch
  from diffusers import StableDiffusionPipeline
  from safetensors.numpy import load_file
  pipe = StableDiffusionPipeline.from_pretrained(os.path.join(workdir, "export"), safety_checker=None)
  ours = load_file(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"))
  theirs = {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}
  assert set(ours) == set(theirs)
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name])
  base = load_file(os.path.join(workdir, "base_model", "unet", "diffusion_pytorch_model.safetensors"))
  assert any(not np.array_equal(base[k], ours[k]) for k in ours)     # training changed the UNet
  del torch


def test_sigterm_mid_run_then_restart_is_bit_identical(uninterrupted):
  root, cache, reference = uninterrupted
  workdir = root / "preempted"
  job = start(_command(workdir), root / "preempted.log", env=_env(cache))
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and job.running():
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      job.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  out = job.wait(timeout=300, status=128 + signal.SIGTERM)       # a scheduler can tell it from a finished run
  assert "Traceback" not in out, out[-4000:]
  first = _summary(workdir)
  assert first["stopped_by_signal"] and first["final_step"] < STEPS and first["stop_signal"] == "SIGTERM", first
  assert "export" not in first
  with open(os.path.join(workdir, "metrics.jsonl")) as f:        # the stopped step's window is logged
    assert json.loads(f.readlines()[-1])["step"] == first["final_step"]
  _run(_command(workdir), cache)
  second = _summary(workdir)
  assert second["start_step"] == first["final_step"] and second["final_step"] == STEPS
  assert _unet_bytes(workdir) == _unet_bytes(reference)


@pytest.mark.slow   # kept out of `make test` for time; `make test-slow` runs it
def test_injected_nonfinite_steps_are_skipped_and_counted(uninterrupted):
  root, cache, _ = uninterrupted
  workdir = root / "nonfinite"
  _run(_command(workdir, "configs/diffusion_dpo.py:tiny", "--config.train.inject_nonfinite_at=(1,3)",
                "--config.train.export=False", "--config.train.eval_prompts=()"), cache)
  summary = _summary(workdir)
  assert summary["skipped_updates"] == 2 and summary["final_step"] == STEPS
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    skipped = [json.loads(line)["nonfinite"] for line in f]
  assert skipped == [0, 1, 0, 1, 0, 0]
  # K skipped updates in a row stopping the run: tests/train/test_guard.py (the same NonFiniteCounter).


@pytest.mark.xdist_group("trainer_methods")
@pytest.mark.parametrize("method", [pytest.param("sc_dpo", marks=pytest.mark.slow), "duo"])
def test_other_methods_train_and_export_for_diffusers(tmp_path_factory, method):
  root = tmp_path_factory.mktemp(method)
  workdir = root / "run"
  _run(_command(workdir, f"configs/{method}.py:tiny", "--config.train.checkpoint_every=6"),
       tmp_path_factory.getbasetemp() / "methods_cache")
  summary = _summary(workdir)
  assert summary["method"] == method and summary["final_step"] == STEPS and summary["skipped_updates"] == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  if method == "sc_dpo":
    assert last["focus_weight_max"] >= 1.0 >= last["focus_weight_min"], last
  else:
    assert last["loss_prior"] >= 0 and "loss_dpo" in last, last
  from diffusers import UNet2DConditionModel
  from safetensors.numpy import load_file
  unet = UNet2DConditionModel.from_pretrained(os.path.join(workdir, "export", "unet"))
  ours = load_file(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"))
  base = load_file(os.path.join(workdir, "base_model", "unet", "diffusion_pytorch_model.safetensors"))
  theirs = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
  changed = [k for k in ours if not np.array_equal(ours[k], base[k])]
  assert changed and all(np.array_equal(ours[k], theirs[k]) for k in ours)
  if method == "duo":        # LoRA on self-attention only: merged into attn1's projections, nothing else moves
    assert all(".attn1.to_" in k for k in changed), [k for k in changed if ".attn1.to_" not in k]


def test_misspelt_config_key_names_it(tmp_path):
  result = _run(_command(tmp_path / "w", "configs/duo.py:tiny", "--config.trian.steps=3"), tmp_path / "cache",
                timeout=120, status=FAILS)
  assert "trian" in result.stderr


def test_duo_given_prompts_on_pairs_without_chosen_prompts_fail_before_training(tmp_path):
  """duo_prompts = "given" on pairs without prompt_chosen (the tiny run's synthetic pairs) stops before the
  state is made, saying what the dataset needs."""
  result = _run(_command(tmp_path / "w", "configs/duo.py:tiny", "--config.objective.duo_prompts=given"),
                tmp_path / "cache", timeout=180, status=FAILS)
  assert "duo_prompts = 'given'" in result.stderr and "prompt_chosen" in result.stderr, result.stderr[-2000:]
  assert "build_duo_pairs" in result.stderr and not os.path.exists(tmp_path / "w" / "checkpoints")


def _copy_run(reference, workdir):
  import shutil
  shutil.copytree(reference, workdir)
  return workdir


def _steps_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.mark.slow   # make test-slow, for time; in make test: test_checkpoint.py, test_workdir_paths.py
def test_corrupted_latest_checkpoint_falls_back_and_metrics_are_not_doubled(uninterrupted):
  """Checkpoint 6's arrays damaged (a flipped byte in every data file): the rerun sets it aside, resumes from 3,
  logs steps 4-6 once (the first run's lines after step 3 are dropped), and ends bit-identical."""
  root, cache, reference = uninterrupted
  workdir = _copy_run(reference, root / "corrupted")
  from tests.train.test_checkpoint import damage_arrays
  damage_arrays(workdir / "checkpoints" / "6")
  result = _run(_command(workdir), cache)
  assert "cannot be read" in result.stderr and "moved it to" in result.stderr, result.stderr[-3000:]
  assert "Event loop is closed" not in result.stderr
  assert os.path.isdir(str(workdir / "checkpoints") + ".corrupt" + os.sep + "6")
  summary = _summary(workdir)
  assert summary["start_step"] == 3 and summary["final_step"] == STEPS
  assert _steps_logged(workdir) == list(range(1, STEPS + 1))
  assert _unet_bytes(workdir) == _unet_bytes(reference)


@pytest.mark.slow   # make test-slow, for time; in make test: test_checkpoint.py (both refusals)
def test_resuming_with_another_method_or_lora_is_refused_with_the_key(uninterrupted):
  root, cache, reference = uninterrupted
  workdir = _copy_run(reference, root / "other_method")
  result = _run(_command(workdir, "configs/diffusion_dpo.py:tiny", "--config.objective.method=sc_dpo"), cache,
                status=1)
  assert "objective.method = 'diffusion_dpo' in the checkpoint, 'sc_dpo' now" in result.stderr, result.stderr[-3000:]
  assert "allow_config_change" in result.stderr and "Traceback" not in result.stderr
  result = _run(_command(workdir, "configs/diffusion_dpo.py:tiny", "--config.lora.enabled=True"), cache, status=1)
  assert "lora.enabled = False in the checkpoint, True now" in result.stderr, result.stderr[-3000:]
  # Told to go on anyway, the train state itself does not fit: the message names the arrays, not a tree diff.
  result = _run(_command(workdir, "configs/diffusion_dpo.py:tiny", "--config.lora.enabled=True",
                         "--config.train.allow_config_change=True"), cache, status=1)
  assert "does not hold this run's train state" in result.stderr and "lora_a" in result.stderr, result.stderr[-3000:]
  assert os.path.join("checkpoints", "6") in result.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]     # nothing set aside or overwritten


@pytest.mark.slow   # make test-slow, for time; in make test: test_checkpoint.py (the save in flight)
def test_nan_guard_stop_waits_for_the_save_and_says_why(uninterrupted):
  """Five non-finite updates in a row stop the run with the guard's message (exit 1); the checkpoint saved at
  the step before is complete, not a ``*-tmp`` folder."""
  root, cache, _ = uninterrupted
  workdir = root / "guard_stop"
  result = _run(_command(workdir, "configs/diffusion_dpo.py:tiny", "--config.train.inject_nonfinite_at=(1,2,3,4,5)",
                         "--config.train.checkpoint_every=1", "--config.train.max_nonfinite_in_a_row=5"),
                cache, status=1)
  assert "5 updates in a row had a non-finite loss or gradient" in result.stderr, result.stderr[-3000:]
  assert "cannot schedule new futures" not in result.stderr and "Traceback" not in result.stderr
  saved = os.listdir(workdir / "checkpoints")
  assert "5" in saved and not [d for d in saved if "tmp" in d], saved


def test_relative_workdir_and_tiny_with_a_model_path(uninterrupted, tmp_path):
  """The README's first command with a relative workdir trains and exports; a :tiny config with a model path
  is refused before anything is built, naming both keys."""
  _, cache, _ = uninterrupted
  cmd = [sys.executable, "-m", "sc_dpo_jax.main", f"--config={ROOT}/configs/diffusion_dpo.py:tiny",
         "--workdir=workdir/x", "--config.train.steps=2", "--config.train.checkpoint_every=2",
         "--config.train.progress=False", "--config.train.eval_prompts=()"]
  _run(cmd, cache, cwd=tmp_path)
  assert (tmp_path / "workdir" / "x" / "checkpoints" / "2").is_dir()
  assert (tmp_path / "workdir" / "x" / "export" / "unet").is_dir()
  result = _run([*cmd[:5], "--config.model.path=/models/sd15"], cache, status=1, cwd=tmp_path)
  assert "config.model.tiny" in result.stderr and "config.model.path" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow   # make test-slow, for time; in make test: test_grad_accum.py (the step)
def test_gradient_accumulation_through_main(uninterrupted):
  """``train.grad_accum_steps=2`` trains the tiny run (each update over 8 pairs as 2 micro-batches); a batch
  the micro-batches cannot split evenly is refused before anything is built, naming the keys. The update equals
  one pass's up to float32 rounding for the same inputs (tests/train/test_grad_accum.py); here the VAE encodes
  the images inside each micro-batch, drawing its posterior samples from that micro-batch's rng, so the run is
  another draw of the same training, not the one-pass run's numbers."""
  root, cache, reference = uninterrupted
  workdir = root / "accumulated"
  _run(_command(workdir, "configs/diffusion_dpo.py:tiny", "--config.train.grad_accum_steps=2",
                "--config.train.eval_prompts=()"), cache)
  summary = _summary(workdir)
  assert summary["final_step"] == STEPS and summary["skipped_updates"] == 0
  from safetensors.numpy import load_file
  ours = load_file(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"))
  one_pass = load_file(os.path.join(reference, "export", "unet", "diffusion_pytorch_model.safetensors"))
  base = load_file(os.path.join(workdir, "base_model", "unet", "diffusion_pytorch_model.safetensors"))
  moved = max(float(np.abs(ours[k] - base[k]).max()) for k in ours)
  moved_one_pass = max(float(np.abs(one_pass[k] - base[k]).max()) for k in ours)
  assert 0.2 * moved_one_pass < moved < 5 * moved_one_pass, (moved, moved_one_pass)   # an update of the same size
  result = _run(_command(root / "bad_split", "configs/diffusion_dpo.py:tiny", "--config.train.grad_accum_steps=3"),
                cache, status=1)
  assert "config.data.batch_size" in result.stderr and "config.train.grad_accum_steps" in result.stderr
