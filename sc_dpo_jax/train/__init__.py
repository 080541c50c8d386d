"""Training: the train state and optimisers, and the jitted step functions of each method.

* ``optim``: ``make_optimizer(config) -> (tx, lr_schedule)`` (AdamW/Adafactor, schedules, lr rules, clipping).
* ``state``: ``TrainState`` and ``create_train_state`` (LoRA or full fine-tuning, the frozen dict).
* ``dpo_steps``: ``dpo_step_fn`` (pure) / ``make_dpo_step`` (jitted) for Diffusion-DPO, SC-DPO and DUO, and
  ``dpo_eval_fn`` / ``make_dpo_eval``; each method's UNet inputs are ``dpo_inputs``'s, gradient accumulation
  ``grad_accum``'s.

Other modules of this package (e.g. ``advantages`` for DDPO, ``sharded_state`` for the train state created
sharded on a mesh) are imported by their own names.
"""
from sc_dpo_jax.train import dpo_steps, optim, state
from sc_dpo_jax.train.dpo_steps import METHODS, dpo_eval_fn, dpo_step_fn, make_dpo_eval, make_dpo_step
from sc_dpo_jax.train.optim import make_optimizer
from sc_dpo_jax.train.state import TrainState, create_train_state

__all__ = ["dpo_steps", "optim", "state", "METHODS", "dpo_eval_fn", "dpo_step_fn", "make_dpo_eval", "make_dpo_step",
           "make_optimizer", "TrainState", "create_train_state"]
