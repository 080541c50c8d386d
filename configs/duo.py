"""DUO (the official recipe, METHODS.md): LoRA on self-attention, preference between SDEdit-ed safe images and
unsafe ones, output preservation on pure noise.

  python -m sc_dpo_jax.main --config=configs/duo.py:tiny --workdir=workdir/duo
  python -m sc_dpo_jax.main --config=configs/duo.py:sd15 --workdir=workdir/duo_sd15 \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/duo_pairs/duo_folder/1.0.0

Variants: tiny, sd15, sd21 (``sc_dpo_jax.train.config``).
"""
from sc_dpo_jax.train.config import dpo_config


def get_config(variant="tiny"):
  return dpo_config("duo", variant)
