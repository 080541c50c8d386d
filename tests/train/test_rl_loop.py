"""The ShieldDiff-style RL trainer end to end through ``python -m sc_dpo_jax.main``: sample, score, update, log,
checkpoint (with the per-prompt reward buffers), export for diffusers, and a resume that ends bit-identical to
the uninterrupted run; plus the config's and the checkpoint's small contracts in-process.

The runs are subprocesses (as a user runs them) sharing a persistent compilation cache, with LLVM's
optimisations off, as tests/train/test_loop.py. Two runs only (a cold one is most of this file's time): a
3-iteration run, and the same command again in a copy of its workdir cut back to what a run stopped after
iteration 2 leaves (checkpoints 1 and 2, two metric lines), which must resume and end exactly as the first.
Both run in the background: the first starts with the module (the in-process tests, first in the file, and
the diffusers import overlap its compilation), the second as soon as the first ends (the first run's checks
overlap it). Small batches (4 samples, 2 prompts, 2 updates of 2 per iteration), one trained transition per
trajectory (``rl.timestep_fraction=0.25`` of 4 steps: under ``--xla_backend_optimization_level=0`` a DDPO update
runs 10-20x slower than optimised on a CPU), and no sample grids (``train.loop.sample_grid``, tested with the
DPO trainer; the export below goes through the same merged policy parameters).
"""
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from tests.subprocess_helper import ROOT, compilation_cache, start

pytestmark = pytest.mark.xdist_group("rl_trainer")

ITERATIONS = 3
SAMPLES, PER_PROMPT = 4, 2      # samples and samples of each prompt per iteration (2 updates of 2)
PROMPTS = SAMPLES // PER_PROMPT
TIMING = ("images_per_s", "time/sample_s", "time/reward_s", "time/update_s")


def _command(workdir):
  return [sys.executable, "-m", "sc_dpo_jax.main", f"--config={os.path.join(ROOT, 'configs/shielddiff_rl.py')}:tiny",
          f"--workdir={workdir}", f"--config.train.iterations={ITERATIONS}", "--config.train.checkpoint_every=1",
          "--config.train.progress=False", "--config.train.eval_prompts=()", "--config.rl.timestep_fraction=0.25",
          f"--config.rl.samples_per_iteration={SAMPLES}", f"--config.rl.samples_per_prompt={PER_PROMPT}",
          "--config.rl.rewrite_samples=1", "--config.rl.kl_weight=0.1", "--config.reward.clip_text=rewrite"]


def _env(cache):
  return dict(compilation_cache(cache), TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="--xla_backend_optimization_level=0")


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _unet_bytes(workdir):
  with open(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
    return f.read()


def _advantage_state(workdir, step):
  """The per-prompt reward buffers in checkpoint ``step`` (the ``extra`` item), read through Orbax."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("extra",))
  try:
    return manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]["advantages"]
  finally:
    manager.close()


class _Runs:
  """The two runs, in the background: the 3-iteration run starts with the module; :meth:`first` waits for it
  and starts the resumed copy, :meth:`second` waits for that. Logs go to files (nobody reads a pipe while
  the tests run)."""

  def __init__(self, root):
    self.root, self.reference, self.resumed = root, root / "run", root / "resumed"
    self.procs = {}
    self._start("reference", self.reference)

  def _start(self, name, workdir):
    self.procs[name] = start(_command(workdir), self.root / f"{name}.log", env=_env(self.root / "cache"))

  def _wait(self, name):
    self.procs[name].wait(timeout=600)

  def first(self):
    self._wait("reference")
    if "resumed" not in self.procs:            # what a run stopped after iteration 2 leaves, then the command
      shutil.copytree(self.reference, self.resumed)
      shutil.rmtree(self.resumed / "checkpoints" / "3")
      shutil.rmtree(self.resumed / "export")
      os.remove(self.resumed / "summary.json")
      with open(self.resumed / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _metrics(self.reference)[:2])
      self._start("resumed", self.resumed)
    return self.reference

  def second(self):
    self.first()
    self._wait("resumed")
    return self.resumed

  def close(self):
    for job in self.procs.values():
      job.kill()


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory):
  """Autouse, so the first run compiles while the in-process tests (first in the file) run (selecting only
  those, e.g. with -k, still starts it; teardown then kills it)."""
  r = _Runs(tmp_path_factory.mktemp("rl"))
  yield r
  r.close()


# -- in-process contracts (no compilation) -----------------------------------------------------------------------


def test_config_variants_and_reward_errors_name_the_key():
  from sc_dpo_jax.data import synthetic
  from sc_dpo_jax.rewards import terms
  from sc_dpo_jax.configs import shielddiff_rl as rl_config
  from sc_dpo_jax.train import rl_loop
  tiny, sd15 = rl_config.rl_config("tiny"), rl_config.rl_config("sd15")
  assert tiny.job == sd15.job == "rl" and sd15.rl.num_steps == 50 and sd15.rl.eta == 1.0
  assert sd15.rl.guidance_scale == 5.0 and sd15.rl.clip_range == 1e-4 and sd15.rl.adv_clip == 5.0
  assert sd15.optim.learning_rate == 3e-4 and sd15.optim.weight_decay == 1e-4 and sd15.lora.enabled
  assert dict(sd15.reward.weights) == {"clip_score": 1.0, "safety_cost": -1.0, "nudity": 0.0}
  with pytest.raises(ValueError, match="unknown config variant 'sdxl'"):
    rl_config.rl_config("sdxl")
  with pytest.raises(ValueError, match="config.reward.clip_folder is empty"):
    terms.make_reward(sd15, pipe=None)
  # check_config runs before any model is loaded.
  with pytest.raises(ValueError, match="config.reward.clip_folder is empty"):
    rl_loop.check_config(sd15)
  sd15.reward.clip_folder = "/models/clip"
  with pytest.raises(ValueError, match="config.reward.cost_model_folder is empty"):
    rl_loop.check_config(sd15)
  sd15.reward.weights.safety_cost = 0.0
  with pytest.raises(ValueError, match="config.data.train is empty"):
    rl_loop.check_config(sd15)
  sd15.reward.weights.clip_score = 0.0
  with pytest.raises(ValueError, match="every config.reward.weights is 0"):
    rl_loop.check_config(sd15)
  with sd15.reward.weights.unlocked():
    sd15.reward.weights.nudenet = 1.0
  with pytest.raises(ValueError, match=r"config.reward.weights.nudenet: no reward term"):
    rl_loop.check_config(sd15)
  tiny.rl.samples_per_prompt = 3
  with pytest.raises(ValueError, match="samples_per_iteration = 8 is not a multiple of config.rl.samples_per_prompt"):
    rl_loop.check_config(tiny)
  tiny.rl.samples_per_prompt, tiny.rl.updates_per_iteration = 2, 3
  with pytest.raises(ValueError, match="updates_per_iteration = 3"):
    rl_loop.check_config(tiny)
  tiny.rl.updates_per_iteration = 2
  rl_loop.check_config(tiny)
  for bad in (-1, 2):
    tiny.rl.rewrite_samples = bad
    with pytest.raises(ValueError, match=rf"config.rl.rewrite_samples = {bad}: .* must be in \[0, 1\]"):
      rl_loop.check_config(tiny)
  tiny.rl.rewrite_samples = 1
  rl_loop.check_config(tiny)
  tiny.reward.clip_text = "safe"
  with pytest.raises(ValueError, match=r"config.reward.clip_text = 'safe'; choose one of \('prompt', 'rewrite'\)"):
    rl_loop.check_config(tiny)
  # reward.clip_text = "rewrite": the CLIP term reads each prompt's safe rewrite, once per sample of the prompt.
  host = {"prompt": np.array(["a red cat", "a dog"], object), "prompt_chosen": np.array(["a blue cat", "a dog"], object)}
  parts = {"clip_score": None, "safety_cost": None}
  assert rl_loop.reward_texts(tiny, parts, host, 2) is None
  tiny.reward.clip_text = "rewrite"
  assert rl_loop.reward_texts(tiny, parts, host, 2) == {"clip_score": ["a blue cat", "a blue cat", "a dog", "a dog"]}
  assert rl_loop.reward_texts(tiny, {"safety_cost": None}, host, 2) is None
  records = synthetic.synthetic_prompt_records(4)
  assert [r["categories"] for r in records] == ["red", "", "red", ""]
  assert [r["prompt_chosen"] for r in records] == ["a blue square", "a blue square", "a green circle",
                                                   "a green circle"]


def test_rewrites_are_required_of_the_prompt_dataset_by_the_keys_that_read_them(tmp_path):
  """rl.rewrite_samples and reward.clip_text = "rewrite" read each prompt's safe rewrite (prompt_chosen): a prompt
  dataset without it is refused before any model is loaded, naming the key and the dataset."""
  from sc_dpo_jax.configs import shielddiff_rl as rl_config
  from sc_dpo_jax.data import records, schema, synthetic
  from sc_dpo_jax.train import rl_loop
  rows = [{k: v for k, v in r.items() if k != "prompt_chosen"} for r in synthetic.synthetic_prompt_records(4)]
  folder = str(tmp_path / "plain_prompts")
  records.write_records(folder, schema.prompt_spec(has_chosen_prompt=False), rows, name="plain_prompts")
  config = rl_config.rl_config("tiny")
  config.data.train = folder
  config.rl.rewrite_samples = 1
  with pytest.raises(ValueError, match=r"config.rl.rewrite_samples = 1 .* has none \(the field 'prompt_chosen'"):
    rl_loop.open_prompts(config, str(tmp_path), pipe=None)
  config.rl.rewrite_samples = 0
  config.reward.clip_text = "rewrite"
  with pytest.raises(ValueError, match=rf"config.reward.clip_text = 'rewrite' .*{folder} has none"):
    rl_loop.open_prompts(config, str(tmp_path), pipe=None)
  config.reward.weights.clip_score = 0.0     # no CLIP term: nothing reads the rewrites
  it = rl_loop.open_prompts(config, str(tmp_path), pipe=types.SimpleNamespace(tokenizer=None))
  assert rl_loop.prompts_per_process(config) == len(rows)     # one batch is the whole set, in some order
  assert sorted(next(it)["prompt"]) == sorted(r["prompt"] for r in rows)


def test_checkpoint_extra_item_round_trips_and_is_optional(tmp_path):
  import jax
  import jax.numpy as jnp
  import optax
  from sc_dpo_jax.train import checkpoint
  from sc_dpo_jax.train.state import TrainState
  state = TrainState.create(params={"w": jnp.arange(3.0)}, tx=optax.sgd(0.1))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
  extra = {"advantages": {"buffer_size": 16, "min_count": 16, "buffers": {"a red dot": [0.1, -2.5e-8]}}}
  ckpt.save(1, state=state, rng=jax.random.PRNGKey(0), data_state=None, config={}, extra=extra)
  ckpt.save(2, state=state, rng=jax.random.PRNGKey(0), data_state=None, config={})
  ckpt.wait()
  abstract = jax.eval_shape(lambda: state)
  assert ckpt.restore(1, abstract_state=abstract, abstract_rng=jax.random.PRNGKey(0)).extra == extra
  assert ckpt.restore(2, abstract_state=abstract, abstract_rng=jax.random.PRNGKey(0)).extra is None
  ckpt.close()


# -- the runs ----------------------------------------------------------------------------------------------------------


def test_tiny_run_logs_rewards_checkpoints_and_exports_for_diffusers(runs):
  from diffusers import UNet2DConditionModel          # imported while the run may still be going
  from safetensors.numpy import load_file
  workdir = runs.first()
  summary = _summary(workdir)
  assert summary["method"] == "shielddiff_rl" and summary["start_iteration"] == 0
  assert summary["final_iteration"] == ITERATIONS and summary["optimizer_steps"] == 2 * ITERATIONS
  assert summary["skipped_updates"] == 0 and not summary["stopped_by_signal"] and "resumed" not in summary
  records = _metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3]
  for key in ("reward_mean", "reward_std", "reward/clip_score", "reward/safety_cost", "loss", "approx_kl",
              "clipfrac", "advantage_mean", "advantages/prompts_tracked", "grad_norm", "learning_rate",
              "optimizer_steps", "data/records", *TIMING):
    assert all(np.isfinite(r[key]) for r in records), key
  # The reward is the weighted sum of its terms (+1 CLIP cosine, -1 safety cost), each divided by its standard
  # deviation over the iteration's samples (reward.normalize = "std"), averaged over the samples.
  for r in records:
    assert r["reward/clip_score_scale"] > 0 and r["reward/safety_cost_scale"] > 0
    np.testing.assert_allclose(r["reward_mean"], r["reward/clip_score"] / r["reward/clip_score_scale"]
                               - r["reward/safety_cost"] / r["reward/safety_cost_scale"], rtol=1e-4, atol=1e-4)
  assert all(0 <= r["clipfrac"] <= 1 and r["approx_kl"] >= 0 for r in records)
  # The KL to the reference (rl.kl_weight=0.1; under LoRA the reference is the base) is logged, never negative,
  # and positive once the policy has moved.
  assert all(r["kl_reference"] >= 0 for r in records) and records[-1]["kl_reference"] > 0, records
  # Rewrite exploration (rl.rewrite_samples=1): one of each prompt's two samples is drawn under its safe rewrite
  # (the synthetic prompts' prompt_chosen); with the buffers' advantages the two groups' means are logged.
  for r in records:
    assert all(np.isfinite(r[k]) for k in ("rewrite/reward_gap", "rewrite/advantage_mean",
                                           "rewrite/policy_advantage_mean")), r
  assert records[-1]["data/records"] == ITERATIONS * PROMPTS
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
  assert os.listdir(workdir / "tensorboard")
  with open(workdir / "data" / "synthetic_prompts" / "dataset_info.json") as f:
    assert json.load(f)["spec"]["kind"] == "prompt"
  # The reward buffers are in the checkpoint: 3 iterations x 2 prompts (all different: 12 in the set) x 2.
  buffers = _advantage_state(workdir, ITERATIONS)["buffers"]
  assert len(buffers) == ITERATIONS * PROMPTS and all(len(v) == PER_PROMPT for v in buffers.values())
  # diffusers reads the export; its UNet is ours, and LoRA on attention moved only attention projections.
  unet = UNet2DConditionModel.from_pretrained(str(workdir / "export" / "unet"))
  ours = load_file(str(workdir / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
  base = load_file(str(workdir / "base_model" / "unet" / "diffusion_pytorch_model.safetensors"))
  theirs = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
  assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
  changed = [k for k in ours if not np.array_equal(ours[k], base[k])]
  assert changed and all((".attn1.to_" in k or ".attn2.to_" in k) for k in changed), changed


def test_resume_after_iteration_2_ends_bit_identical(runs):
  """The workdir as a run stopped after iteration 2 leaves it, then the same command: state, rng, data
  position and reward buffers are restored, and the run ends exactly where the uninterrupted one ended."""
  reference, workdir = runs.first(), runs.second()
  summary = _summary(workdir)
  assert summary["start_iteration"] == 2 and summary["final_iteration"] == 3 and summary["optimizer_steps"] == 6
  assert summary["resumed"] == {"iteration": 2, "optimizer_steps": 4, "prompts_tracked": 2.0 * PROMPTS,
                                "prompts_with_full_buffer": 0.0, "buffered_rewards": 2 * SAMPLES}
  records, expected = _metrics(workdir), _metrics(reference)
  assert [r["step"] for r in records] == [1, 2, 3]
  assert {k: v for k, v in records[-1].items() if k not in TIMING} == \
      {k: v for k, v in expected[-1].items() if k not in TIMING}
  assert _advantage_state(workdir, 3) == _advantage_state(reference, 3)
  assert _unet_bytes(workdir) == _unet_bytes(reference)
