"""Diffusion-DPO (the official recipe, METHODS.md) with the DPO-family trainer.

  python -m sc_dpo_jax.main --config=configs/diffusion_dpo.py:tiny --workdir=workdir/diffusion_dpo
  python -m sc_dpo_jax.main --config=configs/diffusion_dpo.py:sd15 --workdir=workdir/dpo_sd15 \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/pickapic_latents

The official SD1.5 run (``sd15_official``: beta 5000, AdamW (0.9, 0.999, wd 1e-2), lr 1e-8 x 2048 = 2.048e-5
constant after 500 warm-up steps, 2000 updates of 2048 pairs, prompt dropout 0.2, full UNet, 512 px), on one
GPU as 256 micro-batches of 8 pairs (``train.grad_accum_steps``):

  python -m sc_dpo_jax.main --config=configs/diffusion_dpo.py:sd15_official --workdir=workdir/dpo_sd15_official \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/pickapic_v2

and on a TPU pod slice, 8 pairs per chip per micro-batch: grad_accum_steps = 2048 / (8 x chips), here a v4-32
(16 chips, 16 micro-batches of 128 pairs):

  launch/tpu_pod.sh --name dpo-sd15 --zone us-central2-b --accelerator-type v4-32 -- \\
      --config=configs/diffusion_dpo.py:sd15_official --workdir=gs://my-bucket/runs/dpo_sd15_official \\
      --config.model.path=gs://my-bucket/models/stable-diffusion-v1-5 \\
      --config.data.train=gs://my-bucket/data/pickapic_v2 --config.train.grad_accum_steps=16

``data.batch_size`` (2048) must be divisible by ``grad_accum_steps`` x the data-parallel devices. The official
code flips images at random: ``data.random_flip`` is on, which needs an image dataset; with precomputed latents
add ``--config.data.random_flip=False``.

Variants: tiny (CPU, seconds), sd15, sd21, sd15_official (``sc_dpo_jax.configs.dpo_family``). Override any key with
``--config.<key>=<value>``; a misspelt key fails naming it.
"""
from sc_dpo_jax.configs.dpo_family import dpo_config


def get_config(variant="tiny"):
  return dpo_config("diffusion_dpo", variant)
