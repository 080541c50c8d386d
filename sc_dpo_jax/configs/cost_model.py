"""The SC-DPO safety cost model, C(x) = g(normalize(CLIP_image(x))) (this project's formulation, METHODS.md):
a frozen CLIP vision tower and an MLP adapter trained with ranking + alpha * cost anchoring on a pair dataset.
The export (<workdir>/export) is what rewards.cost_model.load_cost_model and CostReward read.

  python -m sc_dpo_jax.main --config=configs/cost_model.py:tiny --workdir=workdir/cost_model
  python -m sc_dpo_jax.main --config=configs/cost_model.py:sd15 --workdir=workdir/cost_model_sd15 \\
      --config.model.clip_folder=/models/clip-vit-large-patch14 --config.data.train=data/scp_pairs

Variants: tiny (a random tiny CLIP and synthetic pairs in the workdir), sd15 (CLIP ViT-L/14; model.clip_folder
and data.train required). Every key: sc_dpo_jax/train/cost_config.py; the labelling rules:
sc_dpo_jax/data/cost_pairs.py; the run: sc_dpo_jax/train/cost_loop.py.
"""
from sc_dpo_jax.train.cost_config import cost_model_config


def get_config(variant="tiny"):
  return cost_model_config(variant)
