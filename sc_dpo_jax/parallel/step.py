"""A jitted step function that counts its traces.

    step = Step(pure_fn, dict(in_shardings=..., out_shardings=..., donate_argnums=(0,)))
    compiled = step.jitted.lower(state, frozen, batch, rng).compile()     # ahead of time
    state, metrics = step(state, frozen, batch, rng)
    assert step.trace_count == 1

What ``parallel.make_sharded_step`` / ``make_sharded_eval`` return, and ``train.dpo_steps.make_dpo_step`` on one
device.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax


class Step:
  """A jitted step (or eval) function with a count of how often JAX traced it.

  Calling it calls the jitted function; ``trace_count`` grows only when JAX (re)traces, which after the
  first call means a changed input structure, shape or dtype (a test asserts it stays 1). ``fn`` is the pure
  function and ``jitted`` the jitted one (``.lower(...)`` for ahead-of-time compilation).
  """

  def __init__(self, fn: Callable, jit_kwargs: Mapping[str, Any]):
    self.trace_count = 0

    @functools.wraps(fn)
    def counted(*args):
      self.trace_count += 1
      return fn(*args)

    self.fn = fn
    self.jitted = jax.jit(counted, **jit_kwargs)

  def __call__(self, *args):
    return self.jitted(*args)
