"""DUO (the official recipe, METHODS.md): LoRA on self-attention, preference between SDEdit-ed safe images and
unsafe ones, output preservation on pure noise.

  python -m sc_dpo_jax.main --config=configs/duo.py:tiny --workdir=workdir/duo
  python -m sc_dpo_jax.main --config=configs/duo.py:sd15 --workdir=workdir/duo_sd15 \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/duo_pairs/duo_folder/1.0.0

The official SD1.5 run (``sd15_official``: LoRA rank 32, alpha 32 on self-attention q/k/v/out, beta 500,
lambda = 1e6 x 500 / 100, lr 3e-4 x 100 / 500 = 6e-5 constant, AdamW wd 1e-2, grad clip 1.0, batch 4, 1000
updates, t in 0..749, empty prompts), on one GPU:

  python -m sc_dpo_jax.main --config=configs/duo.py:sd15_official --workdir=workdir/duo_sd15_official \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/duo_pairs/duo_folder/1.0.0

and on a TPU pod slice (a v5litepod-4: 4 chips, one pair each; batch 4 must be divisible by the chips):

  launch/tpu_pod.sh --name duo-sd15 --zone us-west4-a --accelerator-type v5litepod-4 -- \\
      --config=configs/duo.py:sd15_official --workdir=gs://my-bucket/runs/duo_sd15_official \\
      --config.model.path=gs://my-bucket/models/stable-diffusion-v1-5 \\
      --config.data.train=gs://my-bucket/data/duo_pairs/duo_folder/1.0.0

Variants: tiny, sd15, sd21, sd15_official (``sc_dpo_jax.configs.dpo_family``).
"""
from sc_dpo_jax.configs.dpo_family import dpo_config


def get_config(variant="tiny"):
  return dpo_config("duo", variant)
