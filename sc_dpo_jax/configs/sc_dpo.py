"""SC-DPO (this project's formulation, METHODS.md): Diffusion-DPO with a safety-cost margin and Dynamic Focusing.
Pairs must carry both costs (``cost_chosen``, ``cost_rejected``).

  python -m sc_dpo_jax.main --config=configs/sc_dpo.py:tiny --workdir=workdir/sc_dpo
  python -m sc_dpo_jax.main --config=configs/sc_dpo.py:sd15 --workdir=workdir/sc_dpo_sd15 \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/scp_latents

Variants: tiny, sd15, sd21 (``sc_dpo_jax.configs.dpo_family``), and sd15_official: Diffusion-DPO's official SD1.5
recipe (2048 pairs per update as 256 micro-batches of 8, ``configs/diffusion_dpo.py``) with the SC-DPO loss.
"""
from sc_dpo_jax.configs.dpo_family import dpo_config


def get_config(variant="tiny"):
  return dpo_config("sc_dpo", variant)
