"""ShieldDiff-style RL: DDPO with importance sampling and PPO clipping on a CLIP-score-minus-safety-cost reward.

  python -m sc_dpo_jax.main --config=configs/shielddiff_rl.py:tiny --workdir=workdir/shielddiff_rl
  python -m sc_dpo_jax.main --config=configs/shielddiff_rl.py:sd15 --workdir=workdir/rl_sd15 \\
      --config.model.path=/models/stable-diffusion-v1-5 --config.data.train=data/i2p_prompts \\
      --config.reward.clip_folder=/models/clip-vit-large-patch14 --config.reward.cost_model_folder=out/cost_model

Variants: tiny (CPU, seconds; random reward models, plumbing only), sd15, sd21 (``sc_dpo_jax.train.rl_config``).
NudeNet as a further safety term (its score is higher for more nudity, hence the negative weight; 0 by default):
``--config.reward.weights.nudity=-1`` (threshold and classes: ``--config.reward.nudenet_threshold=0.45``, ...).
Override any key with ``--config.<key>=<value>``; a misspelt key fails naming it.
"""
from sc_dpo_jax.train.rl_config import rl_config


def get_config(variant="tiny"):
  return rl_config(variant)
