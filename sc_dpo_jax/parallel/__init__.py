"""Parallelism: the device mesh, logical-axis sharding rules, sharded init/state/step, and multi-process start.

* ``mesh``: ``make_mesh({"data": -1, "fsdp": 1, "tensor": 1})`` -> ``Mesh`` with axes (data, fsdp, tensor).
* ``rules``: ``DEFAULT_RULES`` (logical name -> mesh axes, a priority list), ``logical_specs``,
  ``module_logical_specs``, ``plan_shardings`` / ``mesh_shardings`` / ``sharding_fallbacks``.
* ``sharding``: ``shard_tree``, ``sharded_init``, ``state_shardings``, ``frozen_shardings``,
  ``sharded_train_state``, ``make_sharded_step`` / ``make_sharded_eval`` (module outputs batch-split by
  ``batch_constraint_interceptor``).
* ``distributed``: ``initialize()``: ``jax.distributed.initialize`` when the run has several processes.

See DESIGN.md ("Sharding is declared, not hand-placed") and each module's docstring.
"""
from sc_dpo_jax.parallel import distributed, mesh, rules, sharding
from sc_dpo_jax.parallel.distributed import initialize
from sc_dpo_jax.parallel.mesh import AXES, make_mesh
from sc_dpo_jax.parallel.rules import (DEFAULT_RULES, MIN_SHARD_SIZE, Fallback, ShardingPlan, logical_specs,
                                       mesh_shardings, module_logical_specs, plan_shardings, sharding_fallbacks)
from sc_dpo_jax.parallel.sharding import (TrainShardings, batch_constraint_interceptor, frozen_shardings,
                                          make_sharded_eval, make_sharded_step, opt_state_shardings, replicated,
                                          shard_tree, sharded_init, sharded_train_state, state_shardings)

__all__ = ["distributed", "mesh", "rules", "sharding", "initialize", "AXES", "make_mesh", "DEFAULT_RULES",
           "MIN_SHARD_SIZE", "Fallback", "ShardingPlan", "logical_specs", "mesh_shardings", "module_logical_specs",
           "plan_shardings", "sharding_fallbacks", "TrainShardings", "batch_constraint_interceptor",
           "frozen_shardings", "make_sharded_eval", "make_sharded_step", "opt_state_shardings", "replicated",
           "shard_tree", "sharded_init", "sharded_train_state", "state_shardings"]
