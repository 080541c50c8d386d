"""Random parameters drawn on the host, for tests, demos and fresh models on a CPU.

``jax.jit(module.init)`` of a UNet spends ~15 s of a CPU compiling its random number generation; drawing
the same kind of values with numpy takes milliseconds. Sharded initialisation on accelerators belongs to
``sc_dpo_jax.parallel`` (jitted init with out_shardings); this is for the single-host, small-model case.
"""
import concurrent.futures
import os
from typing import Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def host_random_params(module: nn.Module, seed: int = 0, inputs: Optional[Sequence] = None,
                       norm_jitter: float = 0.1, bias_scale: float = 0.1, fast: bool = False) -> Dict:
  """Parameters of ``module`` with the shapes and dtypes its ``init`` would give, drawn with numpy.

  Kernels ~ N(0, 1/fan_in) (fan_in = product of all but the last axis, i.e. variance-scaling "fan_in"),
  norm scales ~ 1 + N(0, norm_jitter²), every other leaf ~ N(0, bias_scale²). ``inputs`` default to
  ``module.dummy_inputs()``. Logical-partitioning boxes are removed (plain arrays are returned).

  ``fast=True`` draws each leaf from its own generator (PCG64 seeded by ``(seed, leaf index)``) in float32 on
  all host cores: the same distributions, other values than ``fast=False`` (one ``RandomState(seed)`` stream
  in float64, which the tests' reference values use). SD1.5's 860 M parameters on a 2-core CPU: 9 s against
  16 s; the benchmark uses it.
  """
  inputs = module.dummy_inputs() if inputs is None else inputs
  abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"])
  leaves = sorted(traverse_util.flatten_dict(abstract).items())

  def scaled(path, leaf, normal):
    if path[-1] == "kernel":
      return normal / np.sqrt(int(np.prod(leaf.shape[:-1])))
    if path[-1] == "scale":
      return 1 + norm_jitter * normal
    return bias_scale * normal

  if fast:
    def draw(index):
      path, leaf = leaves[index]
      normal = np.random.default_rng((seed, index)).standard_normal(leaf.shape, dtype=np.float32)
      return path, scaled(path, leaf, normal).astype(leaf.dtype)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      flat = {path: jnp.asarray(value) for path, value in pool.map(draw, range(len(leaves)))}
    return traverse_util.unflatten_dict(flat)
  rng = np.random.RandomState(seed)
  flat = {}
  for path, leaf in leaves:
    flat[path] = jnp.asarray(scaled(path, leaf, rng.randn(*leaf.shape)).astype(leaf.dtype))
  return traverse_util.unflatten_dict(flat)
