"""Dataset folders: TFRecord shards plus a description, written atomically, read as a :class:`Source`.

Two layouts are read the same way by :func:`open_source`:

* our own (``data.precompute`` and :class:`ShardWriter`)::

    DIR/dataset_info.json      {"format": "sc_dpo_jax.records/2", "spec": {...}, "shards": [...], "stats": {...}}
    DIR/<name>-00000-of-00004.tfrecord ...

  ``format`` is the version of the record layout. Version 2 names the latent moments ``moments_chosen`` /
  ``moments_rejected``; version 1 stored the same bytes as ``latent_chosen`` / ``latent_rejected``, and
  :func:`open_source` still reads it: the spec it returns maps the old names to the new ones
  (``RecordSpec.stored_names``), so readers see version 2's fields, and it logs the mapping once per open.
  Writers always write the current version.

* a TFDS-prepared dataset of ``data.builders`` (``DATA_DIR/<name>/<version>/``, or any folder that
  ``tfds.builder_from_directory`` reads), whose ``metadata.json`` carries our record spec.

A :class:`Source` is the list of shard files with their record counts and the :class:`RecordSpec`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging

from sc_dpo_jax.data.schema import RecordSpec

FORMAT = "sc_dpo_jax.records/2"
# Older formats that open_source reads, each with its stored feature names that differ from FORMAT's
# (field name -> stored name; applied where the spec has the field).
OLD_FORMATS = {"sc_dpo_jax.records/1": {"moments_chosen": "latent_chosen", "moments_rejected": "latent_rejected"}}
READABLE_FORMATS = (FORMAT,) + tuple(OLD_FORMATS)
INFO_FILE = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class Source:
  """Shard files (absolute paths, in order), their record counts, the record spec, and a name."""
  files: Sequence[str]
  num_records: Sequence[int]
  spec: RecordSpec
  name: str = "dataset"

  @property
  def total(self) -> int:
    return int(sum(self.num_records))


def shard_name(name: str, index: int, count: int) -> str:
  return f"{name}-{index:05d}-of-{count:05d}.tfrecord"


def write_json_atomic(path: str, data: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class ShardWriter:
  """Writes one dataset folder shard by shard: each shard to a temporary file renamed when complete (so a
  killed writer leaves whole shards only), then :meth:`finish` writes ``dataset_info.json``.

      writer = ShardWriter(out_dir, spec, name="pairs", num_shards=4)
      writer.write_shard(0, records)            # records: iterable of dicts, checked against the spec
      ...
      writer.finish(stats={"skipped": 3})
  """

  def __init__(self, out_dir: str, spec: RecordSpec, *, name: str, num_shards: int):
    if num_shards < 1:
      raise ValueError(f"num_shards = {num_shards} must be >= 1")
    self.out_dir, self.spec, self.name, self.num_shards = out_dir, spec, name, int(num_shards)
    os.makedirs(out_dir, exist_ok=True)

  def path(self, index: int) -> str:
    return os.path.join(self.out_dir, shard_name(self.name, index, self.num_shards))

  def write_shard(self, index: int, records, *, where: str = "") -> int:
    """Writes shard ``index`` from ``records`` (dicts); returns how many were written."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not 0 <= index < self.num_shards:
      raise ValueError(f"shard index {index} out of range [0, {self.num_shards})")
    final = self.path(index)
    tmp = final + ".tmp"
    count = 0
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in records:
        writer.write(self.spec.serialize(record, where=f"{where or final} record {count}"))
        count += 1
    os.replace(tmp, final)
    return count

  def finish(self, num_records: Sequence[int], *, stats: Optional[Mapping[str, Any]] = None,
             description: str = "") -> Source:
    if len(num_records) != self.num_shards:
      raise ValueError(f"{len(num_records)} shard counts for {self.num_shards} shards")
    info = {
        "format": FORMAT,
        "name": self.name,
        "description": description,
        "spec": self.spec.to_json(),
        "shards": [{"file": os.path.basename(self.path(i)), "num_records": int(n)}
                   for i, n in enumerate(num_records)],
        "stats": dict(stats or {}),
    }
    write_json_atomic(os.path.join(self.out_dir, INFO_FILE), info)
    return open_source(self.out_dir)


def write_records(out_dir: str, spec: RecordSpec, records: Sequence[Mapping[str, Any]], *, name: str = "data",
                  num_shards: int = 1, stats: Optional[Mapping[str, Any]] = None) -> Source:
  """Writes ``records`` (dicts) in contiguous blocks over ``num_shards`` shards of ``out_dir``."""
  records = list(records)
  writer = ShardWriter(out_dir, spec, name=name, num_shards=num_shards)
  bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
  counts = [writer.write_shard(i, records[bounds[i]:bounds[i + 1]]) for i in range(num_shards)]
  return writer.finish(counts, stats=stats)


def read_info(folder: str) -> Dict[str, Any]:
  path = os.path.join(folder, INFO_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{folder}: no {INFO_FILE}; not a dataset folder (write one with data.precompute or "
                            f"prepare one with data.prepare)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def open_source(path: str, *, split: str = "train") -> Source:
  """The :class:`Source` of a dataset folder: ours (``dataset_info.json`` with our format, current or older)
  or TFDS-prepared (``split`` chooses the split)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such dataset folder")
  info = read_info(path)
  if info.get("format") in READABLE_FORMATS:
    spec = _with_stored_names(RecordSpec.from_json(info["spec"], where=os.path.join(path, INFO_FILE)),
                              info["format"], path)
    files, counts = [], []
    for i, shard in enumerate(info.get("shards", [])):
      if "file" not in shard or "num_records" not in shard:
        raise ValueError(f"{path}/{INFO_FILE}: shards[{i}] needs 'file' and 'num_records'")
      file = os.path.join(path, shard["file"])
      if not os.path.exists(file):
        raise FileNotFoundError(f"{path}/{INFO_FILE}: shard {shard['file']!r} is missing")
      files.append(file)
      counts.append(int(shard["num_records"]))
    return Source(files, counts, spec, info.get("name", os.path.basename(path)))
  return _open_tfds(path, split)


def _with_stored_names(spec: RecordSpec, version: str, path: str) -> RecordSpec:
  """``spec`` reading the stored names of format ``version`` (logged when any differ from FORMAT's)."""
  renamed = {k: v for k, v in OLD_FORMATS.get(version, {}).items() if k in spec.fields}
  if not renamed:
    return spec
  logging.info("%s: format %s; reading %s as %s (%s's names)", path, version, ", ".join(renamed.values()),
               ", ".join(renamed), FORMAT)
  return dataclasses.replace(spec, stored_names=tuple(renamed.items()))


def _open_tfds(path: str, split: str) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder_from_directory(path)
  except Exception as e:  # TFDS raises several kinds for a folder that is not one of its datasets
    raise ValueError(f"{path}: {INFO_FILE} is neither ours (format {FORMAT!r}) nor a TFDS dataset ({e})") from e
  metadata = builder.info.metadata or {}
  if "record_spec" not in metadata:
    raise ValueError(f"{path}: a TFDS dataset without our record spec in its metadata; prepare it with "
                     f"python -m sc_dpo_jax.data.prepare")
  spec = RecordSpec.from_json(metadata["record_spec"], where=f"{path} metadata.json")
  if split not in builder.info.splits:
    raise KeyError(f"{path}: no split {split!r}; it has {sorted(builder.info.splits.keys())}")
  info = builder.info.splits[split]
  files: List[str] = [os.path.join(path, f) for f in info.filenames]
  counts = [int(n) for n in info.shard_lengths]
  return Source(files, counts, spec, builder.info.name)
