"""Metrics of a run: ``<workdir>/metrics.jsonl`` (one JSON object per logged step) and TensorBoard events.

    writer = MetricsWriter(workdir)                 # only process 0 writes; the others get a no-op writer
    writer.write(step, {"loss": 0.69, "pairs_per_s": 61.2})
    writer.close()

TensorBoard events go to ``<workdir>/tensorboard`` through ``tf.summary`` when TensorFlow is importable (the
GPU images without it still get the JSONL file, and a log line says why there are no events).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


def to_python(value: Any) -> Any:
  """A metric value as a JSON number (NaN and infinities as strings, which JSON has no words for)."""
  value = np.asarray(value).item() if not isinstance(value, (int, float, str)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends to ``metrics.jsonl`` and writes TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a")
    if tensorboard:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.info("TensorFlow is not importable: metrics go to %s only (no TensorBoard events)", self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default(step=int(step)):
        for name, value in record.items():
          if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            tf.summary.scalar(name, value)
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str):
  """The records of ``<workdir>/metrics.jsonl`` (a list of dicts)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
