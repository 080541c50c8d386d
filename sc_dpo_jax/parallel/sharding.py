"""Placing trees on a mesh: sharded init, tree placement, optimiser-state shardings, and the sharded step.

    params = parallel.sharded_init(lambda rng: unet.init(rng, *unet.dummy_inputs())["params"], rng, mesh=mesh)
    placed = parallel.shard_tree(host_params, plan.shardings)              # each device gets only its slice
    step = parallel.make_sharded_step(pure_step, shardings)                # jitted with explicit shardings
    for batch in batches:                                                  # this process's rows, numpy
      state, metrics = step(state, frozen, global_batch(batch, mesh), rng)

Nothing here knows the train state: ``train.sharded_state`` builds the sharded ``TrainState`` and frozen dict
(and the ``TrainShardings`` that :func:`make_sharded_step` takes) from these pieces.

Host values (numpy arrays read from a checkpoint) given to :func:`shard_tree` are sliced per device
(``jax.make_array_from_callback``), so no device ever holds a whole unsharded UNet and the same code runs on
every process of a multi-host job (each process must pass the same values). A step's ``frozen`` argument is
never closed over, never donated; the state is donated.

Optimiser state: optax states hold trees that mirror the parameters (AdamW's ``mu`` and ``nu``, Adafactor's
unfactored ``v``) next to scalars (counts) and, for Adafactor, factored row/column statistics of other shapes.
:func:`opt_state_shardings` gives a leaf the sharding of the parameter whose key path ends its own path and
whose shape it has; every other leaf is replicated (scalars, and Adafactor's factored statistics, which are
vectors of the sum of a kernel's dims, not its product).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sc_dpo_jax.data import device as device_lib
from sc_dpo_jax.parallel import rules as rules_lib
from sc_dpo_jax.parallel.step import Step


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if jax.process_count() == 1 or not x.is_fully_addressable:   # one process, or a global array: reshard
      return jax.device_put(x, sharding)
  value = np.asarray(x)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_tree(tree: Any, shardings: Any) -> Any:
  """Every leaf of ``tree`` placed with the ``NamedSharding`` of the same place in ``shardings``.

  A ``jax.Array`` that already has its sharding is returned as is (no copy); host values (numpy, Python
  scalars) and arrays local to this process are sliced per device with ``jax.make_array_from_callback``, which
  also works on multi-process runs (every process passes the same values). ``shardings`` may be a prefix of
  ``tree`` (one sharding for a subtree).
  """
  return jax.tree.map(lambda s, x: jax.tree.map(lambda leaf: _place(leaf, s), x), shardings, tree,
                      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def sharded_init(init_fn: Callable, *args, mesh: Mesh, rules: Optional[rules_lib.Rules] = None,
                 min_shard_size: int = rules_lib.MIN_SHARD_SIZE) -> Any:
  """``init_fn(*args)`` created already sharded: shapes from ``jax.eval_shape``, logical names from the flax
  boxes ``init_fn`` returns, shardings from ``rules``, then ``jax.jit(init_fn, out_shardings=...)``, so no
  device ever holds more than its shards. The result is unboxed (plain arrays).

      params = sharded_init(lambda rng: unet.init(rng, *unet.dummy_inputs())["params"], rng, mesh=mesh)
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = rules_lib.mesh_shardings(abstract, mesh, rules, min_shard_size=min_shard_size)
  return jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)


def _keys(path) -> tuple:
  return tuple(rules_lib.path_str((k,)) for k in path)


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of an optax state (arrays or abstract): a leaf whose key path ends with a parameter's key path
  (the longest such) and that has that parameter's shape gets the parameter's sharding; everything else
  (counts, Adafactor's factored statistics, ...) is replicated. ``params`` and ``param_shardings`` share a
  structure."""
  by_path: Dict[tuple, tuple] = {}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree_util.tree_leaves(param_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  if len(flat_params) != len(flat_shardings):
    raise ValueError(f"params has {len(flat_params)} leaves but param_shardings {len(flat_shardings)}")
  for (path, value), sharding in zip(flat_params, flat_shardings):
    by_path[_keys(path)] = (tuple(np.shape(value)), sharding)
  rep = replicated(mesh)

  def choose(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None:
        return hit[1] if hit[0] == tuple(np.shape(leaf)) else rep
    return rep

  return jax.tree_util.tree_map_with_path(choose, opt_state)


def batch_constraint_interceptor(mesh: Mesh, batch_axes=device_lib.BATCH_AXES) -> Callable:
  """A ``flax.linen.intercept_methods`` interceptor that pins the leading (batch) axis of every array a linen
  module's ``__call__`` returns to the mesh's ``batch_axes`` (other dims unconstrained: XLA still splits
  heads over ``tensor``). Arrays whose leading size the batch shards do not divide are left alone.

  Why: with weights split over ``fsdp`` and no constraint on activations, XLA's sharding propagation often
  follows the weights into the activations (a conv whose output channels are split produces channel-split
  activations) and then reshuffles between layouts; pinning the batch axis makes it all-gather the weights
  instead, which is FSDP. On a small UNet (64, 128 channels) under (data 2, fsdp 4) this cut the collectives of a
  DPO step from about 3,500 to 860 and its time threefold. It works on any linen model, with no annotations in it.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

  def constrain(y):
    if not isinstance(y, jax.Array) or y.ndim == 0 or shards == 1 or y.shape[0] % shards:
      return y
    spec = PartitionSpec(axes, *([PartitionSpec.UNCONSTRAINED] * (y.ndim - 1)))
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    return jax.tree.map(constrain, out)

  return interceptor


def with_batch_constraints(fn: Callable, mesh: Mesh) -> Callable:
  """``fn`` traced with every module output batch-split over ``mesh`` (:func:`batch_constraint_interceptor`):
  what :func:`make_sharded_step` and :func:`make_sharded_eval` jit, and any other sharded function (the RL
  trainer's sampling step) should."""
  interceptor = batch_constraint_interceptor(mesh)

  def constrained(*args):
    with nn.intercept_methods(interceptor):
      return fn(*args)

  return constrained


def _pure(fn, what: str) -> Callable:
  if isinstance(fn, Step):
    raise TypeError(f"{what} takes the pure function, not a jitted Step (jitting it again would nest two jits): "
                    f"pass its .fn, or build the pure function (e.g. train.dpo_steps.dpo_step_fn)")
  return fn


def make_sharded_step(step: Callable, shardings: Any, frozen_shardings: Any = None, batch_sharding: Any = None,
                      *, donate: bool = True, constrain_activations: bool = True) -> Step:
  """``jax.jit`` of a pure train step ``(state, frozen, batch, rng) -> (state, metrics)`` with explicit shardings.

  Args:
    step: the pure step function.
    shardings: an object with fields ``state``, ``frozen``, ``batch`` and ``mesh`` (e.g.
      ``train.sharded_state.TrainShardings``; then the next two default to its own), or the state's tree of
      shardings (then ``frozen_shardings`` is required).
    frozen_shardings: the frozen dict's shardings.
    batch_sharding: one sharding for every batch field (default ``data.device.batch_sharding(mesh)``: the
      leading axis over ("data", "fsdp"), what ``data.device.global_batch`` gives) or a dict of them.
    donate: donate the state (argument 0).
    constrain_activations: trace under :func:`batch_constraint_interceptor` (module outputs batch-split).

  Returns:
    A :class:`~sc_dpo_jax.parallel.step.Step` (``trace_count``; ``.jitted.lower(...)`` for ahead-of-time
    compilation). The rng is replicated, the metrics come back replicated (readable on every process).
  """
  fn = _pure(step, "make_sharded_step")
  state_sh, frozen_sh, batch_sh, mesh = _unpack(shardings, frozen_shardings, batch_sharding)
  rep = replicated(mesh)
  fn = with_batch_constraints(fn, mesh) if constrain_activations else fn
  return Step(fn, dict(in_shardings=(state_sh, frozen_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                       donate_argnums=(0,) if donate else ()))


def make_sharded_eval(evaluate: Callable, shardings: Any, frozen_shardings: Any = None, batch_sharding: Any = None,
                      *, constrain_activations: bool = True) -> Step:
  """:func:`make_sharded_step` for a pure eval function ``(state, frozen, batch, rng) -> metrics`` (no
  donation)."""
  fn = _pure(evaluate, "make_sharded_eval")
  state_sh, frozen_sh, batch_sh, mesh = _unpack(shardings, frozen_shardings, batch_sharding)
  rep = replicated(mesh)
  fn = with_batch_constraints(fn, mesh) if constrain_activations else fn
  return Step(fn, dict(in_shardings=(state_sh, frozen_sh, batch_sh, rep), out_shardings=rep))


_ALL_SHARDINGS = ("state", "frozen", "batch", "mesh")


def _unpack(first, frozen_sh, batch_sh):
  if all(hasattr(first, field) for field in _ALL_SHARDINGS):
    return first.state, first.frozen, first.batch if batch_sh is None else batch_sh, first.mesh
  if frozen_sh is None:
    raise ValueError("make_sharded_step needs the frozen shardings (or, as its second argument, shardings with "
                     "fields state, frozen, batch and mesh, e.g. train.sharded_state.TrainShardings)")
  mesh = _mesh_of(first)
  return first, frozen_sh, device_lib.batch_sharding(mesh) if batch_sh is None else batch_sh, mesh


def _mesh_of(tree) -> Mesh:
  for s in jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)):
    if isinstance(s, NamedSharding):
      return s.mesh
  raise ValueError("no NamedSharding found in the state shardings; build them with "
                   "train.sharded_state.state_shardings")
