"""Job ``rl``: ShieldDiff-style RL (DDPO with importance sampling and clipping) with ``train.rl_loop``."""
from sc_dpo_jax.train.rl_loop import train_rl as run  # noqa: F401  (the job's entry point)
