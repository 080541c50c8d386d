"""Metrics of a run: ``<workdir>/metrics.jsonl`` (one JSON object per logged step) and TensorBoard.

    writer = MetricsWriter(workdir, resume_step=start_step)   # process 0 writes; the others get a no-op writer
    writer.write_hparams(config.to_dict())
    writer.write(step, {"loss": 0.69, "pairs_per_s": 61.2})
    writer.write_images(step, {"samples": grid})               # HxWx3 uint8, shown in TensorBoard's images
    writer.close()

``metrics.jsonl`` is written through ``etils.epath`` (local, or ``gs://``: a bucket object cannot be appended
to, so there the whole file is rewritten at each write; it holds one line per ``log_every`` steps). When a run
resumes from the checkpoint of step S, the lines of steps after S (written by the first run after its last
checkpoint, and about to be written again) are dropped, so the file has one line per logged step.

TensorBoard scalars, images and hyper-parameters go to ``<workdir>/tensorboard`` through
``clu.metric_writers`` (TensorFlow's summary writer, which also writes to ``gs://``) when TensorFlow is
importable; the GPU images without it still get the JSONL file, and a log line says why there are no events.
"""
from __future__ import annotations

import json
import math
from typing import Any, List, Mapping, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from sc_dpo_jax import paths

FILE = "metrics.jsonl"


def to_python(value: Any) -> Any:
  """A metric value as a JSON number (NaN and infinities as strings, which JSON has no words for)."""
  value = np.asarray(value).item() if not isinstance(value, (int, float, str)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Writes ``metrics.jsonl`` and TensorBoard events (process 0 only; see the module docstring)."""

  def __init__(self, workdir: paths.PathLike, *, tensorboard: bool = True, resume_step: Optional[int] = None):
    self.active = jax.process_index() == 0
    self._file = None
    self._tb = None
    self._lines: List[str] = []
    if not self.active:
      return
    workdir = paths.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / FILE
    self._remote = paths.is_uri(self.path)
    if self.path.exists():
      self._lines = _kept_lines(self.path, resume_step)
    if not self._remote:      # local: keep the file open and append (rewritten once if lines were dropped)
      self.path.write_text("".join(self._lines))
      self._file = open(self.path, "a")    # pylint: disable=consider-using-with
      self._lines = []
    if tensorboard:
      try:
        from clu.metric_writers import summary_writer  # pylint: disable=g-import-not-at-top
        self._tb = summary_writer.SummaryWriter(str(workdir / "tensorboard"))
      except ImportError as e:
        logging.info("no TensorBoard events (%s): metrics go to %s only", e, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    if self._tb is not None:
      scalars = {k: v for k, v in record.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
      self._tb.write_scalars(int(step), scalars)
      self._tb.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Images (``HxWxC`` or ``NxHxWxC``, uint8) to TensorBoard's image tab."""
    if self.active and self._tb is not None:
      self._tb.write_images(int(step), {k: np.asarray(v)[None] if np.ndim(v) == 3 else np.asarray(v)
                                        for k, v in images.items()})
      self._tb.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's config (flattened; lists and None as text) to TensorBoard's hyper-parameter tab."""
    if self.active and self._tb is not None:
      flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flatten(hparams).items()}
      self._tb.write_hparams(flat)
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _kept_lines(path: epath.Path, resume_step: Optional[int]) -> List[str]:
  """The lines of an existing metrics file that a run starting at ``resume_step`` keeps: those of steps up to
  it (a fresh start passes 0, dropping a killed first attempt's lines); None keeps every complete line."""
  kept, dropped = [], 0
  for line in path.read_text().splitlines(keepends=True):
    if not line.strip():
      continue
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      dropped += 1          # a line cut short by a kill mid-write
      continue
    if resume_step is not None and step > resume_step:
      dropped += 1
      continue
    kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    logging.info("%s: dropped %d lines after step %s (they are written again from the checkpoint)", path, dropped,
                 resume_step)
  return kept


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def read_metrics(workdir: paths.PathLike):
  """The records of ``<workdir>/metrics.jsonl`` (a list of dicts)."""
  text = (paths.resolve(workdir) / FILE).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
