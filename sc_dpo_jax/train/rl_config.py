"""Run config of the ShieldDiff-style RL trainer (``job = "rl"``): every key, with METHODS.md's defaults.

``configs/shielddiff_rl.py`` calls :func:`rl_config` with a variant; ``main`` locks the result, so a misspelt
override (``--config.rl.num_stpes=20``) fails naming the key. Variants, as the DPO family's
(``train.config``):

* ``tiny``: a tiny random pipeline (``models.tiny``), a synthetic set of harmful and safe prompts written to
  the workdir, and random tiny reward models (a CLIP pair for the CLIP score and a cost adapter on its vision
  tower): the plumbing check, on a CPU in seconds. Its rewards mean nothing.
* ``sd15`` / ``sd21``: a Stable Diffusion folder (``model.path``), a prompt dataset (``data.train``, e.g. I2P
  prepared with ``python -m sc_dpo_jax.data.prepare``), a CLIP folder (``reward.clip_folder``, a full
  ``CLIPModel`` with its tokenizer) and a safety cost model (``reward.cost_model_folder``), all required.

What follows published code and what is ours (METHODS.md): sampling (DDIM, 50 steps, eta 1, guidance 5), the
per-prompt advantages (buffers of 16, clip 5), the PPO-clip loss (epsilon 1e-4), AdamW (lr 3e-4, weight
decay 1e-4, gradient clip 1) and LoRA on all attention projections (rank 4, diffusers' default that DDPO's
code uses) follow DDPO's official code. ShieldDiff's paper is only known by its abstract: the reward as a
weighted sum of named terms, its default weights (CLIP cosine +1, safety cost -1), the prompt mix and the
iteration counts are this project's choices, all knobs here.

The reward (``reward.weights``): ``r = sum_name weight[name] * term[name](image, prompt)``; a term with weight 0
is not even loaded. Terms: ``clip_score`` (cosine of CLIP image and prompt embeddings, ``rewards.ClipScore``),
``safety_cost`` (the safety cost model's cost, ``rewards.CostReward``: higher is more harmful, hence the
negative weight) and ``nudity`` (NudeNet's nudity score in [0, 1], ``rewards.NudityReward``: higher is more
nudity, so it too takes a negative weight, e.g. ``--config.reward.weights.nudity=-1``; weight 0 by default, so
existing runs are unchanged; its knobs are ``reward.nudenet_*``). New detectors become new names here and in
``rewards.terms.REWARD_TERMS``.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from sc_dpo_jax.rewards.nudenet import DEFAULT_EXPOSED, DEFAULT_THRESHOLD
from sc_dpo_jax.train import optim
from sc_dpo_jax.train.config import choose_variant

VARIANTS = ("tiny", "sd15", "sd21")
EVAL_PROMPTS = ("a red square", "a blue circle")


def rl_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The whole config of a ``job = "rl"`` run (ShieldDiff-style DDPO, METHODS.md)."""
  variant = choose_variant(variant, VARIANTS, "tiny")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.job = "rl"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      path=config_dict.placeholder(str),     # a diffusers Stable Diffusion folder (required unless tiny)
      tiny=tiny,                             # a random tiny pipeline made in memory (models.tiny)
      architecture=variant,                  # UNet/text shapes for `python -m sc_dpo_jax.bench` (random weights)
      dtype="float32" if tiny else "bfloat16",   # compute dtype of the pipeline; parameters stay float32
      attention="reference" if tiny else "auto",   # auto: cuDNN flash on NVIDIA GPUs where it runs, else XLA
      remat_policy=config_dict.placeholder(str),   # e.g. "nothing_saveable" (jax.checkpoint_policies)
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.min_shard_size = 2 ** 14
  # Logical axis -> mesh axes rules (parallel.rules_from_config): None = parallel.DEFAULT_RULES, or pairs in
  # priority order, e.g. --config.mesh_rules="(('embed', 'fsdp'), ('heads', ('tensor', 'fsdp')), ...)"
  c.mesh_rules = config_dict.placeholder(tuple)

  c.data = ml_collections.ConfigDict(dict(
      train=config_dict.placeholder(str),    # a prompt dataset folder (kind "prompt"); tiny: synthetic
      split="train",
      shuffle_buffer=64 if tiny else 4096,
      skip_bad_records=False,
      synthetic_prompts=12,                  # tiny without data.train: prompts written to <workdir>/data
  ))

  c.rl = ml_collections.ConfigDict(dict(
      # Sampling (METHODS.md / DDPO): DDIM with eta > 0 so every transition has a density.
      num_steps=4 if tiny else 50,
      eta=1.0,
      guidance_scale=5.0,
      # Per process and iteration: samples_per_iteration images, samples_per_prompt of each prompt (so
      # samples_per_iteration / samples_per_prompt prompts are read from the data per process).
      samples_per_iteration=8 if tiny else 32,
      samples_per_prompt=2 if tiny else 1,
      # The samples are shuffled and split into updates_per_iteration minibatches, one optimiser update each,
      # inner_epochs times (DDPO's num_inner_epochs): from the second update on, the importance ratio and the
      # clipping act.
      updates_per_iteration=2 if tiny else 4,
      inner_epochs=1,
      timestep_fraction=1.0,                 # share of each trajectory's transitions trained
      clip_range=1e-4,                       # PPO ratio clip epsilon
      adv_clip=5.0,                          # advantages clipped to +-adv_clip
      advantage_buffer=16,                   # per-prompt buffer of the last rewards (train.advantages)
      advantage_min_count=16,                # below this many, batch statistics are used
  ))

  c.reward = ml_collections.ConfigDict(dict(
      # name -> weight; 0 leaves a term out. New terms are added here with weight 0 by default.
      weights=ml_collections.ConfigDict(dict(clip_score=1.0, safety_cost=-1.0, nudity=0.0)),
      clip_folder=config_dict.placeholder(str),        # a CLIPModel folder (both towers + tokenizer files)
      cost_model_folder=config_dict.placeholder(str),  # rewards.save_cost_model's folder
      cost_clip_folder=config_dict.placeholder(str),   # the cost model's CLIP vision tower; default clip_folder
      # The nudity term (rewards.NudityReward): the score is the highest among these classes; the threshold only
      # sets the logged flag rate; model path None: the nudenet package's 320n.onnx.
      nudenet_classes=DEFAULT_EXPOSED,
      nudenet_threshold=DEFAULT_THRESHOLD,
      nudenet_model_path=config_dict.placeholder(str),
  ))

  c.optim = optim.default_config()
  c.optim.learning_rate = 1e-3 if tiny else 3e-4
  c.optim.weight_decay = 1e-4
  c.optim.grad_clip = 1.0

  # LoRA (DDPO's setting, ShieldDiff fine-tunes efficiently); enabled=False trains the full UNet (then lower
  # optim.learning_rate: 3e-4 is a LoRA rate).
  c.lora = ml_collections.ConfigDict(dict(enabled=True, rank=4, alpha=4, targets="attention"))

  c.train = ml_collections.ConfigDict(dict(
      iterations=3 if tiny else 100,         # sample-score-update rounds
      log_every=1,
      checkpoint_every=2 if tiny else 10,    # in iterations
      keep_checkpoints=3,
      async_checkpoints=True,
      allow_config_change=False,   # resume a checkpoint saved with another method/model/LoRA
      sample_every=0 if tiny else 10,        # sample grids of eval_prompts (0: only at the end)
      eval_prompts=EVAL_PROMPTS if tiny else ("a photo of a woman on a beach", "a portrait of a man"),
      sample_steps=10 if tiny else 30,
      sample_guidance=5.0 if tiny else 7.5,
      max_nonfinite_in_a_row=5,
      export=True,                           # <workdir>/export: the aligned pipeline (LoRA merged)
      progress=True,
  ))
  return c
