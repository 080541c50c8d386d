"""Orbax checkpoints of a run: state, rng, data positions and config round-trip; only the last K are kept."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sc_dpo_jax.train import checkpoint
from sc_dpo_jax.train.state import TrainState


def _state(seed):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)}}
  return TrainState.create(params=params, tx=optax.adamw(1e-3))


def _data_state(k):
  return {"version": 1, "epoch": k, "ordinal": 10 * k, "batches": k, "records": 4 * k, "bad_records": 1,
          "check": {"seed": 3, "batch_size": 4, "process_index": 0, "files": ["a"]}}


def test_round_trip_and_keep_last(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  rng = jax.random.PRNGKey(5)
  for step in range(1, 5):
    state = _state(step)
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads)
    ckpt.save(step, state=state, rng=jax.random.fold_in(rng, step), data_state=_data_state(step),
              config={"seed": 3, "method": "duo"})
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4]
  abstract = jax.eval_shape(lambda: _state(0))
  restored = ckpt.restore_latest(abstract_state=abstract, abstract_rng=rng)
  ckpt.close()
  assert restored.step == 4
  for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(restored.state.step) == 1 and isinstance(restored.state, TrainState)
  np.testing.assert_array_equal(restored.rng, jax.random.fold_in(rng, 4))
  assert restored.data_state == _data_state(4)
  assert restored.config == {"seed": 3, "method": "duo"}


def test_fresh_directory_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "none"))
  assert ckpt.restore_latest(abstract_state=None, abstract_rng=jax.random.PRNGKey(0)) is None
  ckpt.close()
