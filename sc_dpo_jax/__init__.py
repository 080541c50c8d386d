"""sc_dpo_jax: safety alignment of text-to-image diffusion models (SC-DPO, DUO, ShieldDiff-style RL) in JAX."""
__version__ = "0.1.0"
