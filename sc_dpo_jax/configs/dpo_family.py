"""Run configs of the DPO-family trainer (Diffusion-DPO, SC-DPO, DUO): every key, with METHODS.md's defaults.

Not a run config itself: ``configs/diffusion_dpo.py``, ``sc_dpo.py`` and ``duo.py`` call :func:`dpo_config`
with a variant; ``main`` locks the result, so a misspelt override (``--config.trian.steps=3``) fails naming the
key. Variants:

* ``tiny``: a tiny random pipeline (``models.tiny``) made in memory and a synthetic pair dataset written to
  the workdir; runs on a CPU in seconds. The plumbing check of every method.
* ``sd15`` / ``sd21``: the published settings for a Stable Diffusion 1.5 / 2.1 folder (``model.path``) and a
  pair dataset (``data.train``), both required, at the batch one device holds (Diffusion-DPO, SC-DPO: 8 pairs;
  ``lr_rule="per_sample"`` scales the learning rate to it).
* ``sd15_official``: the official SD1.5 run, every number of it (:func:`official_sd15`): Diffusion-DPO at its
  effective batch of 2048 pairs through gradient accumulation; DUO as published (batch 4, no accumulation).
  For SC-DPO: Diffusion-DPO's official recipe with the SC-DPO loss (SC-DPO has no published code).

Published settings (METHODS.md): Diffusion-DPO (official code): beta 5000, AdamW, lr 1e-8 x total batch,
constant with 500 warm-up steps, 2000 steps, prompt dropout 0.2, full UNet, total batch 2048. DUO (official
code): LoRA rank 32 on self-attention, beta 500, lr 3e-4 x 100 / beta, grad clip 1, batch 4, 1000 steps, empty
prompts. SC-DPO (our formulation): Diffusion-DPO's settings plus the cost margin and Dynamic Focusing.

``data.batch_size`` is the pairs of one optimiser update over all processes; ``train.grad_accum_steps = k``
computes it as ``k`` micro-batches of ``batch_size / k`` pairs inside the jitted step (``train.dpo_steps``:
activation memory of one micro-batch; steps, checkpoints and the learning-rate rules count updates), and
``batch_size`` must be divisible by ``k`` x the data-parallel devices (mesh ``data x fsdp``).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from sc_dpo_jax.configs.common import add_mesh, choose_variant, pipeline_model, sample_keys, train_section
from sc_dpo_jax.train import dpo_steps, optim

VARIANTS = ("tiny", "sd15", "sd21", "sd15_official")
EVAL_PROMPTS = ("a square", "a circle", "a bar", "a red square")


def dpo_config(method: str, variant: str = "tiny") -> ml_collections.ConfigDict:
  """The whole config of a ``job = "dpo"`` run of ``method`` (``dpo_steps.METHODS``)."""
  if method not in dpo_steps.METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {dpo_steps.METHODS}")
  variant = choose_variant(variant, VARIANTS, "tiny")
  if variant == "sd15_official":
    return official_sd15(method)
  duo = method == "duo"
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.job = "dpo"
  c.seed = 0

  c.model = pipeline_model(
      variant,
      ref_dtype="float32" if tiny else "bfloat16",   # storage of the frozen reference copy (full fine-tuning)
      # Rematerialisation of each UNet block: a name of models.layers.REMAT_POLICIES or jax.checkpoint_policies,
      # or "none". SD: keep conv/matmul outputs only (docs/performance.md, predicted: 0.69 GB of activations per
      # 512-px image instead of 2.21 GB, for a recompute of norms and activations in the backward).
      remat_policy=config_dict.placeholder(str) if tiny else config_dict.FieldReference(
          "convs_and_dots_saveable", field_type=str))
  add_mesh(c)

  c.data = ml_collections.ConfigDict(dict(
      train=config_dict.placeholder(str),    # a dataset folder (ours or TFDS-prepared); tiny: synthetic
      split="train",
      batch_size=8 if tiny else (4 if duo else 8),   # pairs per update over all processes
      resolution=0,                          # 0: the model's default size
      random_flip=False,
      shuffle_buffer=256 if tiny else 2048,
      skip_bad_records=False,
      latents="moments",                     # latent datasets: moments (sampled on the device) | sample | mean
      synthetic_pairs=64,                    # tiny without data.train: pairs written to <workdir>/data
  ))

  c.objective = dpo_steps.default_config(method)

  c.optim = optim.default_config()
  if tiny:
    c.optim.learning_rate = 1e-4
  elif duo:
    c.optim.learning_rate = 3e-4
    c.optim.lr_rule = "duo"
  else:
    c.optim.learning_rate = 1e-8
    c.optim.lr_rule = "per_sample"
    c.optim.schedule = "constant_with_warmup"
    c.optim.warmup_steps = 500

  c.lora = ml_collections.ConfigDict(dict(enabled=duo, rank=4 if tiny else 32, alpha=4 if tiny else 32,
                                          targets="self_attention"))

  c.train = train_section(
      steps=12 if tiny else (1000 if duo else 2000),
      log_every=4 if tiny else 10,
      checkpoint_every=6 if tiny else 250,
      **sample_keys(tiny, EVAL_PROMPTS, every=250),
      # k micro-batches of data.batch_size / k pairs per update, summed in a lax.scan inside the step
      grad_accum_steps=1,
      inject_nonfinite_at=(),                 # debugging/tests: steps whose batch is poisoned with NaN
  )
  return c


# Diffusion-DPO's official SD1.5 run: 2048 pairs per update; on one GPU 256 micro-batches of 8 pairs.
OFFICIAL_DPO_BATCH = 2048
OFFICIAL_DPO_ACCUM_ONE_DEVICE = 256


def official_sd15(method: str) -> ml_collections.ConfigDict:
  """The official SD1.5 recipe of ``method`` over the ``sd15`` config, every published number set here.

  Diffusion-DPO (SalesforceAIResearch/DiffusionDPO, ``launchers/sd15.sh`` and ``train.py``'s defaults):
  beta 5000; AdamW (0.9, 0.999, eps 1e-8, weight decay 1e-2), grad clip 1.0; lr ``1e-8 x 2048 = 2.048e-5``
  (``lr_rule="per_sample"`` over ``data.batch_size = 2048``), constant after 500 linear warm-up steps; 2000
  updates; prompt replaced by "" with probability 0.2; the full UNet; 512 px, centre crop, random horizontal
  flip (both images of a pair, ours: see ``data.decode``); t uniform in ``[0, 1000)``. The 2048 pairs are
  ``train.grad_accum_steps = 256`` micro-batches of 8 (one device); on ``D`` devices use
  ``grad_accum_steps = 2048 / (8 D)`` (8 pairs per device per micro-batch). ``data.random_flip`` needs an
  image dataset: with precomputed latents set it False (flip before precomputing).

  DUO (naver-ai/DUO, ``train/unlearn-sd.py`` and its scripts): LoRA rank 32, alpha 32 on self-attention q, k,
  v, out; beta 500; prior weight ``lambda = 1e6 * beta / 100 = 5e6``; lr ``3e-4 * 100 / beta = 6e-5``
  (``lr_rule="duo"``), constant, no warm-up; AdamW weight decay 1e-2, grad clip 1.0; batch 4 (no
  accumulation); 1000 updates; t uniform in ``{0..749}``; both images under the empty prompt (``duo_prompts =
  "empty"``; the official ``--given_prompt`` is ``"given"``).

  SC-DPO: Diffusion-DPO's recipe above with the SC-DPO loss (its default margin and focusing).
  """
  c = dpo_config(method, "sd15")
  c.data.resolution = 512
  c.optim.update(optimizer="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0)
  if method == "duo":
    c.objective.update(beta=500.0, min_timestep=0, max_timestep=750, duo_prompts="empty", duo_base_lambda=1e6)
    c.objective.duo_lambda = None   # lambda = duo_base_lambda * beta / 100
    c.optim.update(learning_rate=3e-4, lr_rule="duo", schedule="constant", warmup_steps=0)
    c.lora.update(enabled=True, rank=32, alpha=32, targets="self_attention")
    c.data.batch_size = 4
    c.train.update(grad_accum_steps=1, steps=1000)
    return c
  c.objective.update(beta=5000.0, prompt_dropout=0.2, min_timestep=0)
  c.objective.max_timestep = None   # the schedule's 1000
  c.optim.update(learning_rate=1e-8, lr_rule="per_sample", schedule="constant_with_warmup", warmup_steps=500)
  c.lora.enabled = False
  c.data.update(batch_size=OFFICIAL_DPO_BATCH, random_flip=True)
  c.train.update(grad_accum_steps=OFFICIAL_DPO_ACCUM_ONE_DEVICE, steps=2000, checkpoint_every=500)
  return c
