"""The NaN/Inf guard: a step whose loss or gradient norm is not finite leaves the state unchanged.

    fn = skip_nonfinite(step.fn)           # wrap the pure step before jitting it
    counter = NonFiniteCounter(max_in_a_row=5)
    state, metrics = jitted(state, frozen, batch, rng)
    counter.update(step, metrics)          # counts skips; raises NonFiniteError after 5 in a row

Inside the step the choice is ``jnp.where(ok, new, old)`` leaf by leaf, so nothing leaves the device and the
compiled program is the same either way. ``metrics["nonfinite"]`` is 1.0 for a skipped update.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(FloatingPointError):
  """Too many consecutive non-finite steps: the run is diverging or the data is broken."""


def skip_nonfinite(step_fn: Callable, keys=("loss", "grad_norm")) -> Callable:
  """``step_fn(state, *args) -> (state, metrics)`` that keeps the incoming state when any of ``keys`` in the
  metrics is non-finite, and reports ``metrics["nonfinite"]``."""

  def guarded(state, *args):
    new_state, metrics = step_fn(state, *args)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in keys if k in metrics]))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return new_state, {**metrics, "nonfinite": 1.0 - ok.astype(jnp.float32)}

  return guarded


class NonFiniteCounter:
  """Host-side count of skipped updates; :meth:`update` raises :class:`NonFiniteError` after
  ``max_in_a_row`` consecutive ones."""

  def __init__(self, max_in_a_row: int = 5):
    if max_in_a_row < 1:
      raise ValueError(f"max_in_a_row = {max_in_a_row} must be >= 1")
    self.max_in_a_row = int(max_in_a_row)
    self.in_a_row = 0
    self.total = 0

  def update(self, step: int, metrics: Mapping) -> bool:
    """Records the step's outcome; returns whether it was skipped."""
    skipped = bool(np.asarray(metrics.get("nonfinite", 0.0)) > 0)
    if not skipped:
      self.in_a_row = 0
      return False
    self.in_a_row += 1
    self.total += 1
    if self.in_a_row >= self.max_in_a_row:
      loss = np.asarray(metrics.get("loss", np.nan)).item()
      raise NonFiniteError(f"{self.in_a_row} updates in a row had a non-finite loss or gradient (last at step "
                           f"{step}, loss {loss}); the state is the last finite one. Lower the learning rate, "
                           f"check the data (skip_bad_records counts bad records) or raise "
                           f"train.max_nonfinite_in_a_row")
    return True
