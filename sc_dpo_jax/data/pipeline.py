"""The input pipeline: per-host shards of a dataset folder, seeded shuffling, decoding, batches, exact resume.

    source = records.open_source("data/pairs")          # ours or TFDS-prepared
    it = DataIterator(source, batch_size=8, seed=0, resolution=512)   # per-host batch
    batch = next(it)                  # dict of numpy arrays; strings as str
    state = it.state()                # a small JSON-able dict: save it beside the train state
    ...
    it = DataIterator(source, batch_size=8, seed=0, resolution=512)
    it.restore(state)                 # the next batch is the one the uninterrupted run would have seen

How records flow, per epoch ``e`` (epochs repeat forever unless ``num_epochs``):

1. **Host shard**: with at least as many shard files as processes, process ``i`` of ``n`` reads files
   ``i, i+n, ...`` (disjoint, complete, no wasted reads); with fewer files every process reads all files and
   keeps every ``n``-th record. :func:`host_shard` says which.
2. **Order**: the host's files in an order shuffled by ``(seed, e)``; records interleaved from ``cycle_length``
   files at a time; a shuffle buffer of ``shuffle_buffer`` records seeded by ``(seed, e)``. Everything is a
   stateless function of ``(seed, e)``, so the same seed gives the same order on every run, each epoch gets
   its own order, and epoch ``e`` can be rebuilt without replaying epochs ``< e``.
3. **Position**: each record gets its ordinal in the epoch's order. The iterator's state is ``(epoch, next
   ordinal)``; restoring rebuilds epoch ``e`` and skips the first ordinals as raw bytes (no decoding), which
   is how a resumed run sees exactly the batches the uninterrupted one would have.
4. **Decode** (``data.decode``), in parallel, order kept. Randomness (flip, latent noise) is seeded by
   ``(seed, epoch, ordinal, process)``, so it too is the same after a resume.
5. **Bad records** (undecodable image, missing field, wrong array size, non-finite number): by default the
   iterator stops with :class:`~sc_dpo_jax.data.schema.RecordError` naming the shard file, the record's index
   in it and the reason; with ``skip_bad_records=True`` they are skipped and counted (``bad_records`` in
   :meth:`DataIterator.state` and :meth:`DataIterator.metrics`). Nothing is dropped silently.
6. **Batch** of ``batch_size`` (per host) records, ``drop_remainder`` by default, prefetched.

Batches hold the decoded fields (``data.decode``) plus ``input_ids`` when a tokenizer is given (and
``input_ids_chosen`` for records with ``prompt_chosen``). Turn them into global arrays over a mesh with
``data.device.global_batch``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from absl import logging

from sc_dpo_jax.data import decode as decode_lib
from sc_dpo_jax.data import framing
from sc_dpo_jax.data.records import Source
from sc_dpo_jax.data.schema import IMAGE, PAIR, RecordError

META_KEYS = ("_epoch", "_ordinal", "_file", "_index", "_ok")
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class HostShard:
  """What one process reads: ``file_ids`` (indices into ``source.files``), and whether it keeps every
  ``process_count``-th record of them (``record_level``) rather than whole files."""
  file_ids: Sequence[int]
  record_level: bool
  process_index: int
  process_count: int
  records_per_epoch: int


def host_shard(source: Source, process_index: int, process_count: int) -> HostShard:
  """This process's share of ``source``: whole files when there are at least as many files as processes,
  else every ``process_count``-th record of all files. Disjoint across processes, complete together."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  n_files = len(source.files)
  if n_files == 0:
    raise ValueError(f"dataset {source.name!r} has no shard files")
  if n_files >= process_count:
    ids = list(range(process_index, n_files, process_count))
    count = int(sum(source.num_records[i] for i in ids))
    return HostShard(ids, False, process_index, process_count, count)
  count = len(range(process_index, source.total, process_count))
  return HostShard(list(range(n_files)), True, process_index, process_count, count)


class DataIterator(Iterator[Dict[str, np.ndarray]]):
  """Batches of ``source`` for this process, resumable exactly (see the module docstring).

  Args:
    source: a :class:`~sc_dpo_jax.data.records.Source` (``records.open_source(folder)``).
    batch_size: records per batch on this process (the global batch is this times ``process_count``).
    seed: the order, flips and latent noise are functions of it.
    resolution: images are resized (shorter side) and centre-cropped to it; required for image datasets.
    random_flip: flip both images of a pair together with probability 1/2.
    latents: latent datasets: ``"sample"`` (the model's latents drawn from the stored moments), ``"mean"``,
      or ``"moments"`` (``moments_chosen``/``moments_rejected`` for ``data.latents.sample_latents`` on the
      device; the fastest).
    shuffle, shuffle_buffer: file-order and record shuffling (off: file after file, each in its order).
      ``shuffle_buffer = 0``: a full permutation of each epoch (a buffer of every record this process reads;
      what a small dataset such as a prompt set should use: a buffer smaller than the epoch leaves a file
      written in order, e.g. harmful prompts first, in nearly that order).
    num_epochs: None repeats forever.
    drop_remainder: drop a last partial batch (only reachable with ``num_epochs``).
    skip_bad_records: skip and count bad records instead of raising.
    process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
    tokenizer: optional callable ``list[str] -> int array [B, L]``; adds ``input_ids`` from ``prompt`` (and
      ``input_ids_chosen`` from ``prompt_chosen`` where the records have it).
    cycle_length: how many files are read at once.
    num_parallel_calls: decoding parallelism (default: tf.data's autotuning).
  """

  def __init__(self, source: Source, *, batch_size: int, seed: int = 0, resolution: Optional[int] = None,
               random_flip: bool = False, latents: str = "sample", shuffle: bool = True,
               shuffle_buffer: int = 1024, num_epochs: Optional[int] = None, drop_remainder: bool = True,
               skip_bad_records: bool = False, process_index: Optional[int] = None,
               process_count: Optional[int] = None, tokenizer: Optional[Callable] = None, cycle_length: int = 8,
               num_parallel_calls: Optional[int] = None, prefetch: int = 2):
    if batch_size < 1:
      raise ValueError(f"batch_size = {batch_size} must be >= 1")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs = {num_epochs} must be >= 1 or None (forever)")
    if shuffle and shuffle_buffer < 0:
      raise ValueError(f"shuffle_buffer = {shuffle_buffer} must be >= 1, or 0 for a full shuffle of each epoch")
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.source = source
    self.spec = source.spec
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle, self.shuffle_buffer = bool(shuffle), int(shuffle_buffer)
    self.num_epochs = num_epochs
    self.drop_remainder = drop_remainder
    self.skip_bad_records = skip_bad_records
    self.tokenizer = tokenizer
    self.cycle_length = max(1, int(cycle_length))
    self.num_parallel_calls = num_parallel_calls or tf.data.AUTOTUNE
    self.prefetch = prefetch
    self.shard = host_shard(source, int(process_index), int(process_count))
    if self.shard.records_per_epoch == 0:
      raise ValueError(f"process {process_index} of {process_count} gets no records of {source.name!r} "
                       f"({source.total} records in {len(source.files)} files)")
    self._decode = decode_lib.make_decoder(self.spec, resolution=resolution, random_flip=random_flip,
                                           latents=latents)
    self.resolution = resolution
    self._epoch, self._ordinal = 0, 0
    self._batches = self._records = self._bad = 0
    self._iterator = None
    self._readable: Dict[int, str] = {}      # file id -> a copy that reads around damaged records
    if skip_bad_records:
      self._read_around_damage()

  # -- the tf.data graph ---------------------------------------------------------------------------------------

  def raw_records(self, epoch: int, ordinal: int) -> tf.data.Dataset:
    """``(epoch, ordinal, file_id, index, serialized)`` of this host's records in training order, from the
    position ``(epoch, ordinal)`` on (undecoded, so skipping is cheap)."""
    shard = self.shard
    files = tf.constant([self._readable.get(i, self.source.files[i]) for i in shard.file_ids])
    file_ids = tf.constant(list(shard.file_ids), tf.int64)
    n_files = len(shard.file_ids)
    cycle = min(self.cycle_length, n_files) if self.shuffle else 1     # unshuffled: the files' own order
    seed = tf.constant(self.seed, tf.int64)
    start_epoch, start_ordinal = tf.constant(epoch, tf.int64), tf.constant(ordinal, tf.int64)

    def read_file(file_id, path):
      return tf.data.TFRecordDataset(path).enumerate().map(lambda index, raw: (file_id, index, raw))

    def epoch_records(e):
      order = tf.range(n_files)
      if self.shuffle:
        order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([seed, e]))
      ds = tf.data.Dataset.from_tensor_slices((tf.gather(file_ids, order), tf.gather(files, order)))
      if cycle > 1:
        ds = ds.interleave(read_file, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                           deterministic=True)
      else:
        ds = ds.flat_map(read_file)
      if shard.record_level:
        ds = ds.shard(shard.process_count, shard.process_index)
      if self.shuffle:
        ds = ds.shuffle(self.shuffle_buffer or shard.records_per_epoch, seed=seed * 1_000_003 + e + 1,
                        reshuffle_each_iteration=False)
      ds = ds.enumerate().map(lambda o, rec: (e, o) + rec)
      return ds.skip(tf.where(tf.equal(e, start_epoch), start_ordinal, tf.constant(0, tf.int64)))

    end = self.num_epochs if self.num_epochs is not None else np.iinfo(np.int64).max
    return tf.data.Dataset.range(epoch, end).flat_map(epoch_records)

  def dataset(self) -> tf.data.Dataset:
    """The ``tf.data.Dataset`` of batches from the current position (what :meth:`__next__` iterates).

    A record whose decoding raises inside the graph (corrupt proto, wrong feature type, undecodable image)
    is dropped by ``ignore_errors``; the iterator sees the gap in the ordinals and counts it or explains it.
    """
    decode, seed = self._decode, tf.constant(self.seed, tf.int64)
    process, process_count = self.shard.process_index, self.shard.process_count

    def decode_with_meta(epoch, ordinal, file_id, index, raw):
      element_seed = tf.stack([seed, (epoch * process_count + process) * (1 << 32) + ordinal])
      out = decode(raw, element_seed)
      out.update({"_epoch": epoch, "_ordinal": ordinal, "_file": file_id, "_index": index})
      return out

    ds = self.raw_records(self._epoch, self._ordinal)
    ds = ds.map(decode_with_meta, num_parallel_calls=self.num_parallel_calls, deterministic=True).ignore_errors()
    if self.skip_bad_records:
      ds = ds.filter(lambda d: d["_ok"])
    ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(self.prefetch)

  # -- iteration -------------------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, Any]:
    if self._iterator is None:
      self._iterator = iter(self.dataset().as_numpy_iterator())
    try:
      batch = next(self._iterator)
    except StopIteration:
      self._check_end()
      raise
    ok = batch.pop("_ok")
    epochs, ordinals = batch.pop("_epoch"), batch.pop("_ordinal")
    file_ids, indices = batch.pop("_file"), batch.pop("_index")
    rpe = self.shard.records_per_epoch
    positions = epochs * rpe + ordinals                      # this host's record positions, increasing
    before = self._epoch * rpe + self._ordinal
    if not self.skip_bad_records:
      if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        self._raise_bad(int(file_ids[k]), int(indices[k]))
      expected = before + np.arange(len(positions))
      if (positions != expected).any():                      # a record raised while decoding: find which
        missing = int(expected[np.flatnonzero(positions != expected)[0]])
        self._raise_bad(*self._locate(missing // rpe, missing % rpe))
    last_epoch, last_ordinal = int(epochs[-1]), int(ordinals[-1])
    self._bad += int(positions[-1]) + 1 - before - len(ok)
    self._epoch, self._ordinal = (last_epoch, last_ordinal + 1) if last_ordinal + 1 < rpe else (last_epoch + 1, 0)
    n = len(ok)
    self._batches += 1
    self._records += n
    for name, value in batch.items():
      if value.dtype == object:
        batch[name] = np.array([v.decode("utf-8") for v in value], dtype=object)
    if self.tokenizer is not None:
      batch["input_ids"] = np.asarray(self.tokenizer(list(batch["prompt"])))
      if "prompt_chosen" in batch:     # the chosen image's own prompt (schema: has_chosen_prompt)
        batch["input_ids_chosen"] = np.asarray(self.tokenizer(list(batch["prompt_chosen"])))
    return batch

  def _check_end(self):
    """At the end of finite epochs without ``drop_remainder``, every record must have been delivered; a gap
    there is a bad record (with ``drop_remainder`` the last partial batch hides such a gap: it is neither
    counted nor raised)."""
    if self.num_epochs is None or self.drop_remainder:
      return
    rpe = self.shard.records_per_epoch
    missing = self.num_epochs * rpe - (self._epoch * rpe + self._ordinal)
    if missing > 0:
      if not self.skip_bad_records:
        self._raise_bad(*self._locate(self._epoch, self._ordinal))
      self._bad += missing
      self._epoch, self._ordinal = self.num_epochs, 0

  def _damaged_files(self):
    """``[(file id, framing.Scan)]`` of this host's files that have damaged frames (``data.framing``)."""
    found = []
    for file_id in self.shard.file_ids:
      report = framing.scan(self.source.files[file_id])
      if report.bad:
        found.append((file_id, report))
    return found

  def _read_around_damage(self) -> None:
    """``skip_bad_records``: check the framing of this host's files once, at the start (a full read of them,
    logged), and read each damaged file from a copy in which every damaged record is an empty one, so that it
    costs that record only (counted as bad) instead of the rest of its file (TensorFlow's reader stops at a
    damaged frame)."""
    start = time.time()
    found = self._damaged_files()
    logging.info("checked the TFRecord framing of %d files in %.1f s (skip_bad_records)", len(self.shard.file_ids),
                 time.time() - start)
    folder = os.path.join(tempfile.gettempdir(), "sc_dpo_jax_readable")
    for file_id, report in found:
      self._readable[file_id] = framing.readable_copy(report, folder)
      logging.warning("%s: %d damaged records (first: record %d, %s); reading the others from %s",
                      self.source.files[file_id], len(report.bad), report.bad[0].index, report.bad[0].reason,
                      self._readable[file_id])

  def _locate(self, epoch: int, ordinal: int):
    """(file id, index in file) of the record at ``(epoch, ordinal)``, by replaying the undecoded stream; a
    damaged file on the way raises :class:`RecordError` naming it, the record and the fix."""
    try:
      for _, _, file_id, index, _ in self.raw_records(epoch, ordinal).take(1):
        return int(file_id), int(index)
    except tf.errors.DataLossError as error:     # damaged framing: TensorFlow's message names no file
      found = self._damaged_files()
      if not found:
        raise RecordError(f"TensorFlow could not read the records of {self.source.name!r} "
                          f"({_tf_message(error)}) and no damaged frame was found in this host's "
                          f"{len(self.shard.file_ids)} files") from error
      file_id, report = found[0]
      b = report.bad[0]
      raise RecordError(f"{self.source.files[file_id]}: record {b.index} (byte {b.offset}) is damaged: {b.reason} "
                        f"({sum(len(r.bad) for _, r in found)} damaged records in {len(found)} files). Re-create "
                        f"the file, or pass skip_bad_records=True (config: data.skip_bad_records) to skip each "
                        f"damaged record and count it") from error
    raise RuntimeError(f"no record at epoch {epoch}, ordinal {ordinal}")

  def _raise_bad(self, file_id: int, index: int):
    path = self.source.files[file_id]
    raise RecordError(f"{path}: record {index}: {explain_record(self.spec, path, index)} "
                      f"(pass skip_bad_records=True to skip and count such records)")

  # -- state -------------------------------------------------------------------------------------------------

  def _fingerprint(self) -> Dict[str, Any]:
    return {
        "seed": self.seed, "batch_size": self.batch_size, "shuffle": self.shuffle,
        "shuffle_buffer": self.shuffle_buffer if self.shuffle else 0,
        "skip_bad_records": bool(self.skip_bad_records),
        "process_index": self.shard.process_index, "process_count": self.shard.process_count,
        "files": [os.path.basename(f) for f in self.source.files],
        "num_records": [int(n) for n in self.source.num_records],
    }

  def state(self) -> Dict[str, Any]:
    """The position as a JSON-able dict: the next record ``(epoch, ordinal)``, counters, and what must match
    when restoring (seed, batch size, shuffling, process, files)."""
    return {"version": STATE_VERSION, "epoch": self._epoch, "ordinal": self._ordinal, "batches": self._batches,
            "records": self._records, "bad_records": self._bad, "check": self._fingerprint()}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continue from ``state`` (of :meth:`state`); raises ``ValueError`` naming what differs when the state
    was saved by an iterator over other data or with other order-defining settings."""
    missing = [k for k in ("version", "epoch", "ordinal", "batches", "records", "bad_records", "check")
               if k not in state]
    if missing:
      raise ValueError(f"data iterator state lacks {missing}")
    if int(state["version"]) != STATE_VERSION:
      raise ValueError(f"data iterator state version {state['version']}; this code reads {STATE_VERSION}")
    mine = self._fingerprint()
    for key, value in state["check"].items():
      if key in mine and _plain(value) != mine[key]:
        raise ValueError(f"data iterator state was saved with {key}={value!r}, this iterator has "
                         f"{key}={mine[key]!r}: the resumed order would differ")
    if self.num_epochs is not None and int(state["epoch"]) >= self.num_epochs:
      raise ValueError(f"data iterator state is at epoch {state['epoch']}, past num_epochs={self.num_epochs}")
    self._epoch, self._ordinal = int(state["epoch"]), int(state["ordinal"])
    self._batches, self._records, self._bad = int(state["batches"]), int(state["records"]), int(state["bad_records"])
    self._iterator = None

  def metrics(self) -> Dict[str, int]:
    """Counters for the metrics log: epoch, batches and records delivered, bad records skipped."""
    return {"data/epoch": self._epoch, "data/batches": self._batches, "data/records": self._records,
            "data/bad_records": self._bad}

  @property
  def bad_records(self) -> int:
    return self._bad


def _plain(value):
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _tf_message(error: Exception) -> str:
  """A TensorFlow op error's message without its ``{{function_node ...}}`` and ``[Op:...]`` decorations."""
  text = getattr(error, "message", None) or str(error)
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
  text = re.sub(r"\s*\[Op:[^\]]*\]", "", text)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def read_record(path: str, index: int) -> bytes:
  """The serialised record ``index`` of the TFRecord file ``path``."""
  for raw in tf.data.TFRecordDataset(path).skip(index).take(1):
    return raw.numpy()
  raise IndexError(f"{path} has no record {index}")


def explain_record(spec, path: str, index: int) -> str:
  """Why record ``index`` of ``path`` is bad, found on the slow, precise path (Python parsing, eager image
  decoding); the pipeline calls it only for a record its graph rejected."""
  try:
    raw = read_record(path, index)
    record = spec.parse_python(raw)
  except (RecordError, IndexError) as e:
    return str(e).removeprefix("record: ")
  if spec.kind == PAIR and spec.image_format == IMAGE:
    for name in ("image_chosen", "image_rejected"):
      try:
        tf.io.decode_image(record[name], channels=3, expand_animations=False)
      except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return f"field {name!r} is not a decodable image ({len(record[name])} bytes; {_tf_message(e)})"
  return "rejected by the input pipeline's checks (no reason found on re-reading)"
