"""NaN guard: a non-finite update is skipped and counted; K in a row stop the run with a message."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sc_dpo_jax.train import guard
from sc_dpo_jax.train.state import TrainState


def _step(state, x):
  def loss_fn(p):
    return jnp.mean((p["w"] * x - 1.0) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.global_norm(grads)}


def test_nonfinite_updates_are_skipped_counted_and_stop_after_k():
  step = jax.jit(guard.skip_nonfinite(_step), donate_argnums=0)
  state = TrainState.create(params={"w": jnp.ones(3)}, tx=optax.sgd(0.1))
  counter = guard.NonFiniteCounter(max_in_a_row=3)
  xs = [2.0, np.nan, 2.0, np.inf, np.nan]
  history = []
  for i, x in enumerate(xs):
    before = np.asarray(state.params["w"]).copy()
    state, metrics = step(state, jnp.full(3, x))
    skipped = counter.update(i, metrics)
    history.append(skipped)
    if skipped:
      np.testing.assert_array_equal(np.asarray(state.params["w"]), before)
    assert np.isfinite(np.asarray(state.params["w"])).all()
  assert history == [False, True, False, True, True]
  assert counter.total == 3 and counter.in_a_row == 2 and int(state.step) == 2
  with pytest.raises(guard.NonFiniteError, match="3 updates in a row had a non-finite loss"):
    state, metrics = step(state, jnp.full(3, np.nan))
    counter.update(5, metrics)
