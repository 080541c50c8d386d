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


def _save_two(directory):
  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  rng = jax.random.PRNGKey(5)
  for step in (1, 2):
    ckpt.save(step, state=_state(step), rng=rng, data_state=_data_state(step), config={"objective": {"method": "duo"}})
  ckpt.wait()
  return ckpt, rng


def damage_arrays(step_dir):
  """Flips a byte in the middle of every array data file of the checkpoint folder ``step_dir``."""
  import os
  data = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(step_dir, "state")) for f in files
          if os.sep + "d" + os.sep in os.path.join(d, f)]
  assert data, f"no array data files under {step_dir}"
  for path in data:
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_restored(tmp_path):
  ckpt, rng = _save_two(tmp_path / "ckpt")
  damage_arrays(tmp_path / "ckpt" / "2")
  restored = ckpt.restore_latest(abstract_state=jax.eval_shape(lambda: _state(0)), abstract_rng=rng)
  assert restored.step == 1 and restored.data_state == _data_state(1)
  assert ckpt.all_steps() == [1]
  assert (tmp_path / "ckpt.corrupt" / "2").is_dir()
  ckpt.close()


def test_another_runs_checkpoint_is_refused_naming_the_key_or_the_arrays(tmp_path):
  import pytest
  ckpt, rng = _save_two(tmp_path / "ckpt")
  abstract = jax.eval_shape(lambda: _state(0))
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="objective.method = 'duo' in the checkpoint, 'sc_dpo'"):
    ckpt.restore_latest(abstract_state=abstract, abstract_rng=rng, config={"objective": {"method": "sc_dpo"}})
  restored = ckpt.restore_latest(abstract_state=abstract, abstract_rng=rng, config={"objective": {"method": "sc_dpo"}},
                                 allow_changes=True)
  assert restored.step == 2
  other = jax.eval_shape(lambda: TrainState.create(params={"dense": {"kernel": jnp.zeros((4, 5))}},
                                                   tx=optax.adamw(1e-3)))
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"params.dense.kernel \(4, 3\) in the checkpoint"):
    ckpt.restore_latest(abstract_state=other, abstract_rng=rng)
  assert ckpt.all_steps() == [1, 2]          # a mismatch is not damage: nothing set aside
  ckpt.close()


def test_an_error_inside_the_run_waits_for_the_save_in_flight(tmp_path):
  """The NaN guard's stop (any exception) inside ``harness.saves_finished``: when it propagates, the
  asynchronous save started just before is complete on disk (not a ``*-tmp`` folder), and the metrics closed."""
  import os
  import pytest
  from sc_dpo_jax.train import guard, harness
  from sc_dpo_jax.train import metrics as metrics_lib
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  big = TrainState.create(params={"w": jnp.ones((2048, 4096), jnp.float32)}, tx=optax.adamw(1e-3))   # 100 MB
  with pytest.raises(guard.NonFiniteError):
    with harness.saves_finished(ckpt, writer):
      ckpt.save(1, state=big, rng=jax.random.PRNGKey(0), data_state=None, config={})
      raise guard.NonFiniteError("5 updates in a row had a non-finite loss")
  assert os.listdir(tmp_path / "ckpt") == ["1"], os.listdir(tmp_path / "ckpt")
  assert writer._file is None                    # pylint: disable=protected-access
