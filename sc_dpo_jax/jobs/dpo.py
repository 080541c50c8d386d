"""Job ``dpo``: Diffusion-DPO, SC-DPO or DUO (``config.objective.method``) with the trainer of ``train.loop``."""
from sc_dpo_jax.train.loop import train_dpo as run  # noqa: F401  (the job's entry point)
