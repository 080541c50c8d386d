"""What every trainer does around its own models, data and step: the :class:`Run` (checkpoints and resume,
metrics, the NaN guard's counter, progress bar, stop signal, what is due after each step, the summary), and
the pieces it is made of, for a trainer that needs them one by one:

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
import dataclasses
import json
import signal
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from sc_dpo_jax import paths
from sc_dpo_jax.train import checkpoint as checkpoint_lib
from sc_dpo_jax.train import guard, preemption
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


# -- the run skeleton ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Due:
  """What is due after a step (or RL iteration) ``index`` of a run (see :meth:`Run.tick`)."""
  index: int
  last: bool          # the run's final step
  stop: bool          # a signal asked this process (or another of the job) to stop after this step
  log: bool           # every train.log_every, the last step, and a stop (a stop keeps its window)
  sample: bool        # every train.sample_every, except the last step (the run's end samples anyway)
  checkpoint: bool    # every train.checkpoint_every, the last step, and a stop


class Window:
  """The metrics of the steps since the last log line. Device metrics are read one step late, so the host
  dispatches step ``n + 1`` before it waits for step ``n``; each read is counted by the NaN guard's counter,
  which raises :class:`guard.NonFiniteError` after ``train.max_nonfinite_in_a_row`` skipped updates."""

  def __init__(self, counter: guard.NonFiniteCounter):
    self.counter = counter
    self.rows: List[Dict[str, float]] = []
    self._pending: Optional[Tuple[int, Any]] = None
    self.start = time.time()
    self.steps = 0

  def add(self, index: int, metrics: Any) -> None:
    """The device metrics of step ``index``; the previous step's are read now."""
    self.read()
    self._pending = (index, metrics)
    self.steps += 1

  def add_host(self, row: Mapping[str, float]) -> None:
    """A row already on the host (and already counted), e.g. an RL iteration's means."""
    self.rows.append(dict(row))
    self.steps += 1

  def read(self) -> None:
    """Reads (and counts) the pending device metrics, if any."""
    if self._pending is not None:
      index, metrics = self._pending
      self._pending = None
      self.rows.append(read_metrics(index, metrics, self.counter))

  def means(self) -> Tuple[Dict[str, float], int, float]:
    """``(mean of each metric, steps, seconds)`` of the window, which starts again."""
    self.read()
    means = {k: float(np.mean([m[k] for m in self.rows])) for k in self.rows[0]} if self.rows else {}
    out = (means, self.steps, time.time() - self.start)
    self.rows, self.steps, self.start = [], 0, time.time()
    return out


def read_metrics(index: int, metrics: Any, counter: guard.NonFiniteCounter) -> Dict[str, float]:
  """One step's device metrics as host floats, counted by the NaN guard's ``counter``."""
  host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
  counter.update(index, host)
  return host


class Run:
  """The skeleton every trainer shares around its own models, data and step:

      run = harness.Run(config, workdir, name="duo", unit="step", total=config.train.steps)
      restored = run.resume(abstract_state=abstract, rng=rng)       # None on a fresh start
      run.open(start_step)                                          # metrics (trimmed on resume) and progress bar
      with run:                                                     # SIGTERM/SIGINT -> a stop after the step;
        for index in run.indices(start_step):                       # an error waits for the save in flight
          state, metrics = step(...)
          run.window.add(index, metrics)
          due = run.tick(index + 1)
          if due.log: run.log(due.index, {...})
          if due.checkpoint: run.ckpt.save(due.index, ...)
          if due.stop: break
      summary.update(run.end())

``config.train`` supplies ``log_every``, ``sample_every``, ``checkpoint_every``, ``max_nonfinite_in_a_row``,
``progress``, ``keep_checkpoints``, ``async_checkpoints`` and ``allow_config_change``.
"""

  def __init__(self, config: ml_collections.ConfigDict, workdir: paths.PathLike, *, name: str, unit: str,
               total: int):
    self.config = config
    self.workdir = paths.resolve(workdir)
    self.name, self.unit, self.total = name, unit, int(total)
    self.ckpt = open_checkpoints(config, self.workdir)
    self.counter = guard.NonFiniteCounter(int(config.train.max_nonfinite_in_a_row))
    self.window = Window(self.counter)
    self.stop = preemption.StopSignal()
    self.stopped_by_signal = False
    self.writer: Optional[metrics_lib.MetricsWriter] = None
    self.bar = None
    self._guard = None

  def resume(self, *, abstract_state: Any, rng: Any) -> Optional[checkpoint_lib.Restored]:
    """The newest intact checkpoint (:func:`resume`), or None."""
    return resume(self.ckpt, self.config, abstract_state=abstract_state, rng=rng)

  def open(self, start: int) -> None:
    """Opens the metrics (lines after ``start`` dropped) and the progress bar (process 0)."""
    self.writer = open_metrics(self.config, self.workdir, start)
    self.bar = tqdm(total=self.total, initial=min(int(start), self.total), desc=self.name, unit=self.unit,
                    disable=not self.config.train.progress or jax.process_index() != 0)

  def __enter__(self) -> "Run":
    if self.writer is None:
      raise RuntimeError("Run.open(start) comes before `with run:`")
    self.stop.__enter__()
    self._guard = saves_finished(self.ckpt, self.writer)
    self._guard.__enter__()
    return self

  def __exit__(self, *exc) -> bool:
    try:
      self._guard.__exit__(*exc)
    finally:
      self.stop.__exit__(*exc)
    return False

  def indices(self, start: int) -> Iterator[int]:
    """``start, start + 1, ..., total - 1``; the caller breaks after a stop."""
    return iter(range(int(start), self.total))

  def tick(self, index: int) -> Due:
    """After step (or iteration) ``index`` (counted from 1): the progress bar, the stop signal (a collective
    when there are several processes: every process calls it at every step) and what is due."""
    train = self.config.train
    self.bar.update(1)
    last = index == self.total
    stop = self.stop.requested(index)
    self.stopped_by_signal = stop
    return Due(index=index, last=last, stop=stop, log=index % int(train.log_every) == 0 or last or stop,
               sample=bool(train.get("sample_every")) and index % int(train.sample_every) == 0 and not last,
               checkpoint=index % int(train.checkpoint_every) == 0 or last or stop)

  def log(self, index: int, values: Mapping[str, Any], **postfix: str) -> None:
    """One line of ``metrics.jsonl`` and TensorBoard; ``postfix`` goes to the progress bar."""
    self.writer.write(index, values)
    if postfix:
      self.bar.set_postfix(**postfix)

  def stopped(self, index: int) -> None:
    """Logs that a signal stopped the run after ``index`` (its checkpoint is saved; a rerun resumes)."""
    logging.warning("stopped by a signal after %s %d; checkpoint saved, rerun to resume", self.unit_name, index)

  @property
  def unit_name(self) -> str:
    """The unit in words ("iteration" for tqdm's "it")."""
    return {"it": "iteration"}.get(self.unit, self.unit)

  def end(self) -> Dict[str, Any]:
    """After the loop: the bar closed, the last save finished; the summary's stop and guard fields."""
    self.window.read()
    self.bar.close()
    self.ckpt.wait()
    return {"stopped_by_signal": self.stopped_by_signal, **stop_fields(self.stop),
            "skipped_updates": self.counter.total}

  def close(self, summary: Dict[str, Any], t_start: float) -> Dict[str, Any]:
    """The checkpointer and metrics closed; ``summary.json`` written (process 0) with the wall time."""
    self.ckpt.close()
    self.writer.close()
    summary["wall_s"] = round(time.time() - t_start, 2)
    if jax.process_index() == 0:
      paths.write_json(self.workdir / "summary.json", summary)
    return summary
