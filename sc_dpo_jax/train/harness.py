"""What every trainer does around its loop: open the checkpoints, resume (guarded), start the metrics, and end
the run without losing work.

    ckpt = harness.open_checkpoints(config, workdir)
    restored = harness.resume(ckpt, config, abstract_state=abstract, rng=rng)     # None on a fresh start
    writer = harness.open_metrics(config, workdir, start_step)
    with harness.saves_finished(ckpt, writer):    # an error (the NaN guard's stop) first waits for the save
      ...                                         # in flight and closes the metrics, then propagates
    summary.update(harness.stop_fields(stop))

A run stopped by SIGTERM/SIGINT reports ``stopped_by_signal`` and ``stop_signal`` in its summary;
``sc_dpo_jax.main`` then exits with ``128 + signal`` (143 for SIGTERM), as a shell does for a killed command,
so a scheduler can tell a preempted run (requeue it: it resumes from its checkpoint) from a finished one (0).
"""
from __future__ import annotations

import contextlib
import json
import signal
from typing import Any, Dict, Iterator, Optional

import ml_collections
from absl import logging

from sc_dpo_jax import paths
from sc_dpo_jax.train import checkpoint as checkpoint_lib
from sc_dpo_jax.train import metrics as metrics_lib


def config_dict(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The config as plain JSON values (what checkpoints store)."""
  return json.loads(config.to_json_best_effort())


def open_checkpoints(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> checkpoint_lib.Checkpointer:
  """``<workdir>/checkpoints`` with the config's ``train.keep_checkpoints`` and ``train.async_checkpoints``."""
  return checkpoint_lib.Checkpointer(paths.resolve(workdir) / "checkpoints", keep=int(config.train.keep_checkpoints),
                                     async_save=bool(config.train.async_checkpoints))


def resume(ckpt: checkpoint_lib.Checkpointer, config: ml_collections.ConfigDict, *, abstract_state: Any,
           rng: Any) -> Optional[checkpoint_lib.Restored]:
  """The newest intact checkpoint of this run (see ``Checkpointer.restore_latest``): refused when it was saved
  with another method, model or LoRA setting unless ``train.allow_config_change``; logged when found."""
  restored = ckpt.restore_latest(abstract_state=abstract_state, abstract_rng=rng, config=config_dict(config),
                                 allow_changes=bool(config.train.get("allow_config_change", False)))
  if restored is not None:
    logging.info("resumed from step %d (%s)", restored.step, ckpt.directory)
  return restored


def open_metrics(config: ml_collections.ConfigDict, workdir: paths.PathLike,
                 start_step: int) -> metrics_lib.MetricsWriter:
  """The run's metrics writer, with the lines after ``start_step`` dropped (a resumed run writes them again)
  and, on a fresh start, the config as TensorBoard hyper-parameters."""
  writer = metrics_lib.MetricsWriter(workdir, resume_step=int(start_step))
  if start_step == 0:
    writer.write_hparams(config_dict(config))
  return writer


@contextlib.contextmanager
def saves_finished(ckpt: checkpoint_lib.Checkpointer, writer: metrics_lib.MetricsWriter) -> Iterator[None]:
  """On an exception inside (the NaN guard stopping the run, a bad record, a crash): wait for the checkpoint
  being written in the background and close the metrics, then let the exception go on. Without this the
  interpreter shuts the save's threads down under it and the checkpoint is lost (only a ``*-tmp`` folder)."""
  try:
    yield
  except BaseException:
    try:
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("while stopping: the checkpoint in flight could not be finished (%s)", e)
    writer.close()
    raise


def stop_fields(stop_signal) -> Dict[str, Any]:
  """``{"stop_signal": name}``: the signal this process received (``"SIGTERM"``), or None (none, or another
  process of the job received it); the trainers' summaries carry it beside ``stopped_by_signal``."""
  received = stop_signal.received
  return {"stop_signal": signal.Signals(received).name if received else None}


def exit_status(summary: Dict[str, Any]) -> int:
  """0 for a finished run; ``128 + signal`` for one a signal stopped (143 for SIGTERM, also when another
  process of the job received it)."""
  if not summary.get("stopped_by_signal"):
    return 0
  name = summary.get("stop_signal") or "SIGTERM"
  return 128 + int(signal.Signals[name])
