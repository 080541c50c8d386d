"""Diffusion-DPO (the official recipe, METHODS.md) with the DPO-family trainer.

  python -m sc_dpo_jax.main --config=configs/diffusion_dpo.py:tiny --workdir=workdir/diffusion_dpo
  python -m sc_dpo_jax.main --config=configs/diffusion_dpo.py:sd15 --workdir=workdir/dpo_sd15 \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/pickapic_latents

Variants: tiny (CPU, seconds), sd15, sd21 (``sc_dpo_jax.train.config``). Override any key with
``--config.<key>=<value>``; a misspelt key fails naming it.
"""
from sc_dpo_jax.train.config import dpo_config


def get_config(variant="tiny"):
  return dpo_config("diffusion_dpo", variant)
