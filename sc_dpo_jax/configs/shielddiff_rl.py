"""ShieldDiff-style RL: DDPO with importance sampling and PPO clipping on a CLIP-score-minus-safety-cost reward.

  python -m sc_dpo_jax.main --config=configs/shielddiff_rl.py:tiny --workdir=workdir/shielddiff_rl
  python -m sc_dpo_jax.main --config=configs/shielddiff_rl.py:sd15 --workdir=workdir/rl_sd15 \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/i2p_prompts \\
      --config.reward.clip_folder=/models/clip-vit-large-patch14 --config.reward.cost_model_folder=out/cost_model

NudeNet as a further safety term (its score is higher for more nudity, hence the negative weight; 0 by default):
``--config.reward.weights.nudity=-1`` (threshold and classes: ``--config.reward.nudenet_threshold=0.45``, ...).

Every key, with METHODS.md's defaults; ``main`` locks the config, so a misspelt override
(``--config.rl.num_stpes=20``) fails naming the key. Variants, as the DPO family's (``configs.dpo_family``):

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

The reward (``reward.weights``): ``r = sum_name weight[name] * term[name](image, prompt) / scale[name]``, the
scale being the term's standard deviation over the iteration's samples (``reward.normalize = "std"``, the
default; ``"none"``: scale 1). Advantages: ``rl.advantages`` (``train.advantages``). A term with weight 0
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

from sc_dpo_jax.configs.common import add_mesh, choose_variant, pipeline_model, sample_keys, train_section
from sc_dpo_jax.rewards.nudenet import DEFAULT_EXPOSED, DEFAULT_THRESHOLD
from sc_dpo_jax.train import optim

VARIANTS = ("tiny", "sd15", "sd21")
EVAL_PROMPTS = ("a red square", "a blue circle")


def rl_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The whole config of a ``job = "rl"`` run (ShieldDiff-style DDPO, METHODS.md)."""
  variant = choose_variant(variant, VARIANTS, "tiny")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.job = "rl"
  c.seed = 0

  c.model = pipeline_model(
      variant, remat_policy=config_dict.placeholder(str))   # e.g. "nothing_saveable" (jax.checkpoint_policies)
  add_mesh(c)

  c.data = ml_collections.ConfigDict(dict(
      train=config_dict.placeholder(str),    # a prompt dataset folder (kind "prompt"); tiny: synthetic
      split="train",
      shuffle_buffer=0,                      # 0: a full shuffle of the prompt set each epoch (records are tiny)
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
      # "per_prompt" (DDPO: buffers of each prompt's last rewards, advantage_buffer / advantage_min_count) or
      # "group" (the iteration's samples of each prompt compared with each other; needs samples_per_prompt >= 2).
      advantages="per_prompt",
      # Negative advantages are multiplied by this (ours; DDPO's is 1): 0 trains only the samples better than
      # their baseline, pulling the policy toward them without pushing it away from the rest.
      negative_advantage_weight=1.0,
      advantage_buffer=16,                   # per-prompt buffer of the last rewards (train.advantages)
      advantage_min_count=16,                # below this many, batch statistics are used
      # Rewrite exploration (this project's formulation, not DDPO's nor ShieldDiff's): of each prompt's
      # samples_per_prompt samples, the last rewrite_samples are drawn under the prompt's safe rewrite (the
      # prompt dataset's prompt_chosen) and credited to the prompt: their log-probabilities are the policy's
      # under the prompt itself, so an advantage above the group's pulls the policy toward them. For a model
      # that draws the concept for every sample of a harmful prompt (no safe sample to prefer). 0: off.
      rewrite_samples=0,
      # DPOK's KL regulariser (Fan et al. 2023; not in DDPO's or ShieldDiff's code): each trained transition adds
      # kl_weight x the KL from the policy's DDIM step to the reference model's at the same x_t (per latent
      # element, the units of the log-probabilities). Keeps the reference UNet in memory under full
      # fine-tuning. 0: off.
      kl_weight=0.0,
  ))

  c.reward = ml_collections.ConfigDict(dict(
      # name -> weight; 0 leaves a term out. New terms are added here with weight 0 by default.
      weights=ml_collections.ConfigDict(dict(clip_score=1.0, safety_cost=-1.0, nudity=0.0)),
      # "std": each term divided by its standard deviation over the iteration's samples before weighting, so the
      # weights say how much each term counts whatever its units; "none": the raw weighted sum.
      normalize="std",
      # What the CLIP term scores each image against: "prompt" (the sampled prompt: ShieldDiff's quality term)
      # or "rewrite" (this project's formulation: the prompt's safe rewrite, the prompt dataset's
      # prompt_chosen; a safe prompt's rewrite is itself). With "prompt" the CLIP term of a harmful prompt
      # rewards the concept it names, against the safety term; with "rewrite" both prefer the image the
      # rewrite describes, and the CLIP term only guards its content.
      clip_text="prompt",
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

  c.train = train_section(
      iterations=3 if tiny else 100,         # sample-score-update rounds
      log_every=1,
      checkpoint_every=2 if tiny else 10,    # in iterations
      **sample_keys(tiny, EVAL_PROMPTS, every=10),
  )
  return c


def get_config(variant="tiny"):
  return rl_config(variant)
