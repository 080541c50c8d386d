"""The train state and the frozen dict created already sharded on a mesh (``train.state`` on ``parallel``).

The training driver's sequence::

    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.rules_from_config(config.mesh_rules)                   # None: parallel.DEFAULT_RULES
    unet_specs = parallel.module_logical_specs(unet)                       # abstract init: logical names
    state, frozen, shardings = sharded_state.sharded_train_state(
        params, tx, lr_schedule, mesh=mesh, param_specs=unet_specs, rules=rules,
        lora=config.lora, rng=rng, empty_text=empty)                       # created sharded, on the devices
    logging.info(shardings.unet_plan.describe("UNet"))
    step = parallel.make_sharded_step(dpo_steps.dpo_step_fn(unet, schedule, config.objective), shardings)
    for batch in batches:                                                  # this process's rows, numpy
      state, metrics = step(state, frozen, global_batch(batch, mesh), rng)

``params`` may be host (numpy) arrays read from a checkpoint: ``parallel.shard_tree`` copies each device only
its own slice, so no device ever holds a whole unsharded UNet and the same code runs on every process of a
multi-host job (each process must pass the same values). ``frozen`` is an argument of the step, never closed
over, never donated; the state is donated. The optimiser state follows the parameters
(``parallel.opt_state_shardings``).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sc_dpo_jax import parallel
from sc_dpo_jax.data import device as device_lib
from sc_dpo_jax.models import lora as lora_lib
from sc_dpo_jax.parallel import rules as rules_lib
from sc_dpo_jax.train import state as state_lib


def state_shardings(state: state_lib.TrainState, param_shardings: Any, mesh: Mesh) -> state_lib.TrainState:
  """A :class:`TrainState` of shardings for ``state`` (arrays or ``jax.eval_shape`` output): ``params`` take
  ``param_shardings``, the optimiser state follows them (``parallel.opt_state_shardings``), ``step`` is
  replicated. Usable as ``in_shardings``/``out_shardings`` of ``jax.jit`` (the static ``tx`` is kept)."""
  return state.replace(step=parallel.replicated(mesh), params=param_shardings,
                       opt_state=parallel.opt_state_shardings(state.opt_state, state.params, param_shardings, mesh))


def frozen_shardings(frozen: Mapping[str, Any], mesh: Mesh, unet: Any, **others: Any) -> Dict[str, Any]:
  """Shardings of the frozen dict (``train.state``): ``"unet"`` and ``"ref_unet"`` take ``unet`` (the UNet
  parameter shardings; a bfloat16 reference has the same shapes), ``"empty_text"`` is replicated, and any
  other key needs its shardings passed by name (``text_encoder=...``; one sharding for a whole subtree is
  fine). A key without shardings raises ``KeyError`` naming it."""
  out = {}
  for key in frozen:
    if key in others:
      out[key] = others[key]
    elif key in (state_lib.BASE_UNET, state_lib.REF_UNET):
      out[key] = unet
    elif key == state_lib.EMPTY_TEXT:
      out[key] = parallel.replicated(mesh)
    else:
      raise KeyError(f"frozen[{key!r}] has no shardings: pass {key}=<tree of shardings or one sharding> to "
                     f"frozen_shardings (known keys: unet, ref_unet, empty_text)")
  return out


class TrainShardings(NamedTuple):
  """Everything ``parallel.make_sharded_step`` needs (``state``, ``frozen``, ``batch``, ``mesh``), and the
  plans for logs (``unet_plan.describe()``)."""
  state: state_lib.TrainState     # a TrainState of NamedShardings
  frozen: Dict[str, Any]
  batch: NamedSharding
  unet_plan: rules_lib.ShardingPlan
  trainable_plan: rules_lib.ShardingPlan
  mesh: Mesh


def sharded_train_state(params: Mapping, tx, lr_schedule=None, *, mesh: Mesh, param_specs: Any,
                        rules: Optional[rules_lib.Rules] = None, min_shard_size: int = rules_lib.MIN_SHARD_SIZE,
                        lora: Optional[Mapping] = None, rng: Optional[jax.Array] = None, ref_dtype: Any = None,
                        empty_text: Optional[Any] = None, frozen_extra: Optional[Mapping[str, Any]] = None):
  """``train.state.create_train_state`` on the mesh: ``(state, frozen, TrainShardings)``, created sharded.

  Args:
    params: the UNet parameters (host numpy arrays or jax Arrays).
    tx, lr_schedule, lora, rng, ref_dtype, empty_text: as ``create_train_state``.
    mesh: the mesh.
    param_specs: the logical specs of the UNet parameters (``parallel.module_logical_specs``). LoRA
      adapters take theirs from them (``models.lora.logical_axes``).
    rules, min_shard_size: as ``parallel.plan_shardings`` (``parallel.rules_from_config`` reads ``rules``
      from a config).
    frozen_extra: more frozen entries ``{key: (tree, shardings)}`` (text encoder, cost model, ...) placed with
      their shardings and added to ``frozen``.

  Returns:
    ``(state, frozen, shardings)``. The sharded ``params`` themselves become ``frozen["unet"]`` (LoRA) or
    ``frozen["ref_unet"]`` (full fine-tuning without ``ref_dtype``), so the device memory holds no copy
    beyond what the state needs; those entries may share device buffers with ``params`` when ``params``
    already were jax Arrays (``jax.device_put`` does not copy what is already in place). Nothing the caller
    passed is donated.
  """
  unet_plan = rules_lib.plan_shardings(params, mesh, rules, specs=param_specs, min_shard_size=min_shard_size)
  params = parallel.shard_tree(params, unet_plan.shardings)
  # Entries of the frozen dict that ARE the sharded params (create_train_state stores them as given or as an
  # exact copy); they are taken as they are instead of being copied out of the jitted function.
  same_dtype = ref_dtype is None or all(x.dtype == np.dtype(ref_dtype) for x in jax.tree.leaves(params))
  passthrough = {state_lib.BASE_UNET} if lora is not None else ({state_lib.REF_UNET} if same_dtype else set())

  def make(p, r, e):
    state, frozen = state_lib.create_train_state(p, tx, lr_schedule, lora=lora, rng=r, ref_dtype=ref_dtype,
                                                 empty_text=e)
    return state, {k: v for k, v in frozen.items() if k not in passthrough}

  abstract_state, abstract_frozen = jax.eval_shape(make, params, rng, empty_text)
  if isinstance(abstract_state.params, lora_lib.LoRA):
    trainable_specs = lora_lib.logical_axes(abstract_state.params, param_specs)
    trainable_plan = rules_lib.plan_shardings(abstract_state.params, mesh, rules, specs=trainable_specs,
                                              min_shard_size=min_shard_size)
  else:
    trainable_plan = unet_plan
  state_sh = state_shardings(abstract_state, trainable_plan.shardings, mesh)
  made_sh = frozen_shardings(abstract_frozen, mesh, unet_plan.shardings)
  state, frozen = jax.jit(make, out_shardings=(state_sh, made_sh))(params, rng, empty_text)
  for key in sorted(passthrough):
    frozen[key] = params
  extra = dict(frozen_extra or {})
  for key, (tree, shardings) in extra.items():
    if key in frozen:
      raise KeyError(f"frozen_extra[{key!r}] would replace the frozen entry of that name")
    frozen[key] = parallel.shard_tree(tree, shardings)
  frozen_sh = frozen_shardings(frozen, mesh, unet_plan.shardings, **{k: s for k, (_, s) in extra.items()})
  logging.info("sharded train state on %s:\n%s", dict(mesh.shape), unet_plan.describe("UNet parameters"))
  return state, frozen, TrainShardings(state_sh, frozen_sh, device_lib.batch_sharding(mesh), unet_plan,
                                       trainable_plan, mesh)
