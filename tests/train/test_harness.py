"""The run skeleton every trainer shares (``train.harness.Run``), without a model: what is due after each step,
the metrics window read one step late and counted by the NaN guard, a signal's stop, and the summary."""
import json
import os
import signal

import jax.numpy as jnp
import ml_collections
import pytest

from sc_dpo_jax.train import guard, harness
from sc_dpo_jax.train import metrics as metrics_lib


def _config(**train):
  defaults = dict(log_every=2, sample_every=3, checkpoint_every=4, max_nonfinite_in_a_row=2, progress=False,
                  keep_checkpoints=2, async_checkpoints=False, allow_config_change=False)
  defaults.update(train)
  return ml_collections.ConfigDict({"seed": 0, "train": defaults})


def test_what_is_due_after_each_step(tmp_path):
  run = harness.Run(_config(), tmp_path, name="t", unit="step", total=6)
  run.open(0)
  with run:
    dues = [run.tick(i + 1) for i in run.indices(0)]
  summary = run.end()
  assert [d.index for d in dues if d.log] == [2, 4, 6]
  assert [d.index for d in dues if d.sample] == [3]                 # not at the last step: the end samples
  assert [d.index for d in dues if d.checkpoint] == [4, 6]
  assert [d.index for d in dues if d.last] == [6] and not any(d.stop for d in dues)
  assert summary == {"stopped_by_signal": False, "stop_signal": None, "skipped_updates": 0}
  assert harness.exit_status(summary) == 0
  run.close(summary, t_start=0.0)
  assert json.loads((tmp_path / "summary.json").read_text())["stopped_by_signal"] is False


def test_window_reads_one_step_late_and_the_guard_stops_the_run(tmp_path):
  run = harness.Run(_config(), tmp_path, name="t", unit="step", total=10)
  run.open(0)
  run.window.add(0, {"loss": jnp.float32(1.0), "nonfinite": jnp.float32(0.0)})
  assert run.window.rows == []                                      # not read yet: dispatch runs ahead
  run.window.add(1, {"loss": jnp.float32(3.0), "nonfinite": jnp.float32(0.0)})
  assert run.window.rows == [{"loss": 1.0, "nonfinite": 0.0}]
  means, steps, seconds = run.window.means()
  assert means == {"loss": 2.0, "nonfinite": 0.0} and steps == 2 and seconds >= 0
  assert run.window.means()[1] == 0                                 # a new window
  with pytest.raises(guard.NonFiniteError, match="2 updates in a row"):
    with run:
      for i in (2, 3, 4):
        run.window.add(i, {"loss": jnp.float32(jnp.nan), "nonfinite": jnp.float32(1.0)})
  assert run.counter.total == 2


def test_a_signal_stops_after_the_step_with_a_checkpoint_due(tmp_path):
  run = harness.Run(_config(checkpoint_every=100), tmp_path, name="t", unit="it", total=10)
  run.open(0)
  run.log(1, {"loss": 0.5})
  with run:
    for i in run.indices(0):
      if i == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      due = run.tick(i + 1)
      if due.stop:
        break
  assert (due.index, due.stop, due.checkpoint, due.log, due.last) == (3, True, True, True, False)
  summary = run.end()
  assert summary["stopped_by_signal"] and summary["stop_signal"] == "SIGTERM"
  assert harness.exit_status(summary) == 143
  run.close(summary, t_start=0.0)
  assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1]


def test_open_comes_before_with(tmp_path):
  run = harness.Run(_config(), tmp_path, name="t", unit="step", total=1)
  with pytest.raises(RuntimeError, match=r"Run.open\(start\) comes before"):
    with run:
      pass
