"""The safety cost model's trainer end to end through ``python -m sc_dpo_jax.main`` (configs/cost_model.py:tiny):
a run of 100 steps, then the same command with the default 200 steps continuing from its checkpoint; held-out
accuracies on the synthetic pairs (blue shape chosen, the same shape in red rejected); the export read by
``load_cost_model`` + ``CostReward``. Plus the labelling rules, the batch sampler and the resume-config check
in-process.

Measured (2-core CPU, tiny defaults: 200 steps, lr 2e-2, 72 training and 24 held-out pairs): held-out ranking
accuracy 0.958 (23 of 24 pairs; 0.958 for seeds 0, 1, 2), anchor accuracy 0.90 (0.81 .. 0.92 over seeds), mean
held-out cost of red images +2.6 and of blue ones -4.0; on 32 fresh synthetic pairs scored by the export, red
costs more than its blue twin in 0.94 of them (mean +2.6 vs -3.6). Resuming is exact: a 100 + 100 step run
ended with an adapter.safetensors byte-identical to an uninterrupted 200-step run (checked once; a third
subprocess would take this file past its time budget). Each run takes about 14 s of CPU, 6 s of it importing
TensorFlow. SIGTERM (``train.preemption.StopSignal``, as in the DPO trainer) is not run here, for the same reason.
"""
import io
import json
import os
import sys

import numpy as np
import pytest

from tests.subprocess_helper import ROOT, compilation_cache, run

pytestmark = pytest.mark.xdist_group("cost_trainer")

STEPS = 200       # the tiny config's default
FIRST = 100


def _command(workdir, *overrides):
  return [sys.executable, "-m", "sc_dpo_jax.main", f"--config={os.path.join(ROOT, 'configs/cost_model.py')}:tiny",
          f"--workdir={workdir}", "--config.train.progress=False", *overrides]


def _env(cache):
  return dict(compilation_cache(cache), TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="--xla_backend_optimization_level=0")


def _run(cmd, cache, timeout=300):
  return run(cmd, env=_env(cache), timeout=timeout)


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A run of FIRST steps, then the same command without the override (STEPS): the second continues the first."""
  root = tmp_path_factory.mktemp("cost_trainer")
  cache, workdir = root / "jax_cache", root / "run"
  _run(_command(workdir, f"--config.train.steps={FIRST}"), cache)
  first = _summary(workdir)
  with open(os.path.join(workdir, "export", "adapter.safetensors"), "rb") as f:
    first_export = f.read()
  _run(_command(workdir), cache)
  return workdir, first, first_export


def test_more_steps_continue_from_the_checkpoint(runs):
  workdir, first, first_export = runs
  second = _summary(workdir)
  assert first["start_step"] == 0 and first["final_step"] == FIRST and not first["stopped_by_signal"]
  assert first["train_data"]["embeddings"]["cached"] is False
  assert second["start_step"] == FIRST and second["final_step"] == STEPS and not second["stopped_by_signal"]
  assert second["train_data"]["embeddings"]["cached"] is True      # CLIP is not run again on resume
  assert second["eval_at_start"] == first["eval_final"]            # it starts from the saved adapter
  assert second["skipped_updates"] == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [0, 25, 50, 75, 100, 125, 150, 175, 200]
  for key in ("loss", "rank_loss", "anchor_loss", "ranking_accuracy", "anchor_accuracy", "grad_norm",
              "learning_rate", "pairs_per_s"):
    assert key in records[-1], key
  assert all("eval/ranking_accuracy" in r for r in records if r["step"] % 50 == 0)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(FIRST), str(STEPS)]
  with open(os.path.join(workdir, "export", "adapter.safetensors"), "rb") as f:
    assert f.read() != first_export                                # the export is the continued adapter


def test_held_out_accuracy_and_export_ranks_red_above_blue(runs):
  workdir, first, _ = runs
  summary = _summary(workdir)
  assert summary["labels"]["rank_by"] == "cost" and summary["labels"]["anchor_by"] == "cost"
  assert summary["train_data"]["ranking_pairs"] == 72 and summary["eval_data"]["pairs"] == 24
  assert summary["train_data"]["harmful"] == summary["train_data"]["safe"] == 72
  start, final = first["eval_at_start"], summary["eval_final"]
  print("held-out at step 0", start, "at the end", final)
  assert final["eval/ranking_accuracy"] >= 0.9, final            # measured 0.958
  assert final["eval/anchor_accuracy"] >= 0.75, final            # measured 0.90
  assert final["eval/cost_rejected"] > 1.0 and final["eval/cost_chosen"] < -1.0, final
  assert final["eval/loss"] < 0.5 * start["eval/loss"], (start, final)

  # The export, as the RL trainer and SC-DPO pair building load it, scores fresh pairs: red above blue.
  from PIL import Image

  from sc_dpo_jax.data import synthetic
  from sc_dpo_jax.rewards.cost_model import CostReward, load_cost_model
  model, params = load_cost_model(os.path.join(workdir, "export"), os.path.join(workdir, "clip"))
  pairs = list(synthetic.synthetic_pairs(32, resolution=32, seed=1234))
  blue = np.stack([np.asarray(Image.open(io.BytesIO(p["image_chosen"])).convert("RGB")) for p in pairs])
  red = np.stack([np.asarray(Image.open(io.BytesIO(p["image_rejected"])).convert("RGB")) for p in pairs])
  costs, info = CostReward(model, params)(np.concatenate([blue, red]), [p["prompt"] for p in pairs] * 2)
  cost_blue, cost_red = costs[:32], costs[32:]
  print(f"fresh pairs: cost red {cost_red.mean():+.2f}, blue {cost_blue.mean():+.2f}, red > blue "
        f"{np.mean(cost_red > cost_blue):.3f}")
  assert info == {} and costs.dtype == np.float32
  assert np.mean(cost_red > cost_blue) >= 0.9                    # measured 0.94
  assert cost_red.mean() > 0 > cost_blue.mean()


def test_labelling_rules():
  from sc_dpo_jax.data import cost_pairs
  costs_c, costs_r = np.array([0.0, 0.9, 0.3, 0.5]), np.array([1.0, 0.1, 0.35, 0.5])
  harmful = np.array([1, 0, 1, 0])
  more, less = cost_pairs.ranking_pairs(4, "cost", cost_chosen=costs_c, cost_rejected=costs_r, min_cost_gap=0.1)
  np.testing.assert_array_equal(more, [4, 1])        # pair 0: rejected (index 4 + 0); pair 1: chosen (index 1)
  np.testing.assert_array_equal(less, [0, 5])        # pairs 2 (gap 0.05) and 3 (tie) give no ranking pair
  more, less = cost_pairs.ranking_pairs(4, "preference", harmful_prompt=harmful)
  np.testing.assert_array_equal(more, [4, 6])
  np.testing.assert_array_equal(less, [0, 2])
  more, _ = cost_pairs.ranking_pairs(4, "preference")
  np.testing.assert_array_equal(more, [4, 5, 6, 7])
  labels = cost_pairs.anchor_labels(4, "cost", cost_chosen=costs_c, cost_rejected=costs_r, harmful_above=0.6,
                                   safe_below=0.4)
  np.testing.assert_array_equal(labels, [-1, 1, -1, 0, 1, -1, -1, 0])
  labels = cost_pairs.anchor_labels(4, "preference", harmful_prompt=harmful)
  np.testing.assert_array_equal(labels, [-1, -1, -1, -1, 1, -1, 1, -1])   # clean-prompt pairs: both safe
  np.testing.assert_array_equal(cost_pairs.anchor_labels(2, "preference"), [-1, -1, 1, 1])
  with pytest.raises(ValueError, match="safe_below = 0.7 > labels.harmful_above = 0.5"):
    cost_pairs.anchor_labels(4, "cost", cost_chosen=costs_c, cost_rejected=costs_r, harmful_above=0.5,
                            safe_below=0.7)
  assert cost_pairs.resolve_rule("auto", True, "labels.rank_by", "d") == "cost"
  assert cost_pairs.resolve_rule("auto", False, "labels.rank_by", "d") == "preference"
  with pytest.raises(ValueError, match="labels.anchor_by = 'cost' but the records of d carry no cost"):
    cost_pairs.resolve_rule("cost", False, "labels.anchor_by", "d")


def test_sampler_covers_each_epoch_and_resume_config_is_checked():
  from sc_dpo_jax.data import cost_pairs
  from sc_dpo_jax.train import cost_loop
  sampler = cost_pairs.EpochSampler(10, 4, seed=0, stream=1)
  seen = np.concatenate([sampler.indices(k) for k in range(5)])       # 20 positions = 2 epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  np.testing.assert_array_equal(cost_pairs.EpochSampler(10, 4, seed=0, stream=1).indices(3), sampler.indices(3))
  saved = {"seed": 0, "data": {"batch_size": 8}, "labels": {"rank_by": "auto"}, "train": {"steps": 100}}
  cost_loop.check_resume_config(saved, {**saved, "train": {"steps": 200}}, "ckpt")
  with pytest.raises(ValueError, match="ckpt was saved with config data.batch_size = 8; this run has 4"):
    cost_loop.check_resume_config(saved, {**saved, "data": {"batch_size": 4}}, "ckpt")
