"""Parallelism: the device mesh, logical-axis sharding rules, sharded init and step, and multi-process start.

* ``mesh``: ``make_mesh({"data": -1, "fsdp": 1, "tensor": 1})`` -> ``Mesh`` with axes (data, fsdp, tensor).
* ``rules``: ``DEFAULT_RULES`` (logical name -> mesh axes, a priority list), ``rules_from_config``
  (``config.mesh_rules``, checked), ``logical_specs``, ``module_logical_specs``, ``plan_shardings`` /
  ``mesh_shardings`` / ``sharding_fallbacks``.
* ``sharding``: ``shard_tree``, ``sharded_init``, ``opt_state_shardings``, ``replicated``,
  ``make_sharded_step`` / ``make_sharded_eval`` (module outputs batch-split by ``batch_constraint_interceptor``;
  ``with_batch_constraints`` for any other sharded function).
* ``step``: ``Step``, a jitted function that counts its traces (what ``make_sharded_step`` returns).
* ``distributed``: ``initialize()``: ``jax.distributed.initialize`` when the run has several processes.

This package imports nothing from ``sc_dpo_jax.train`` (a test checks it): the sharded train state
(``TrainState`` and frozen dict created on the mesh, ``TrainShardings``) is ``train.sharded_state``.

See DESIGN.md ("Sharding is declared, not hand-placed") and each module's docstring.
"""
from sc_dpo_jax.parallel import distributed, mesh, rules, sharding, step
from sc_dpo_jax.parallel.distributed import initialize
from sc_dpo_jax.parallel.mesh import AXES, make_mesh
from sc_dpo_jax.parallel.rules import (DEFAULT_RULES, MIN_SHARD_SIZE, Fallback, ShardingPlan, logical_specs,
                                       mesh_shardings, module_logical_specs, plan_shardings, rules_from_config,
                                       sharding_fallbacks)
from sc_dpo_jax.parallel.sharding import (batch_constraint_interceptor, make_sharded_eval, make_sharded_step,
                                          opt_state_shardings, replicated, shard_tree, sharded_init,
                                          with_batch_constraints)
from sc_dpo_jax.parallel.step import Step

__all__ = ["distributed", "mesh", "rules", "sharding", "step", "initialize", "AXES", "make_mesh", "DEFAULT_RULES",
           "MIN_SHARD_SIZE", "Fallback", "ShardingPlan", "logical_specs", "mesh_shardings", "module_logical_specs",
           "plan_shardings", "rules_from_config", "sharding_fallbacks", "batch_constraint_interceptor",
           "make_sharded_eval", "make_sharded_step", "opt_state_shardings", "replicated", "shard_tree",
           "sharded_init", "with_batch_constraints", "Step"]
