"""Job ``cost_model``: the SC-DPO safety cost model (CLIP + MLP adapter) with the trainer of ``train.cost_loop``."""
from sc_dpo_jax.train.cost_loop import train_cost_model as run  # noqa: F401  (the job's entry point)
