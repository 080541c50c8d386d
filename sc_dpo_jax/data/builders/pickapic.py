"""Pick-a-Pic v2 preference pairs from its parquet shards (the Diffusion-DPO training set).

Input: the ``*.parquet`` files of ``yuvalkirstain/pickapic_v2`` (``data/train-*.parquet``) in one folder, read
in sorted order. Columns used: ``caption``, ``jpg_0``, ``jpg_1`` (JPEG bytes), ``label_0`` (1: image 0
preferred, 0: image 1 preferred, 0.5: tie) and, when present, ``ranking_id``.

As the official Diffusion-DPO training script does, ties are dropped (counted as ``ties_dropped``) and the
preferred image is put first (``label_0 == 0`` swaps the pair; counted as ``swapped``). Shards are streamed
batch by batch with pyarrow, so a 500 MB shard never sits in memory whole.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

from sc_dpo_jax.data.builders._base import LocalBuilder, SourceError, check_image_bytes
from sc_dpo_jax.data.schema import RecordSpec, pair_spec

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
ID_COLUMN = "ranking_id"
LABELS = (0.0, 0.5, 1.0)
_HUB_SHARD = re.compile(r"^([a-z_]+)-\d{5}-of-\d{5}")
# Rows per pyarrow batch: a Pick-a-Pic row holds two JPEGs of ~0.5 MB each, so 64 rows are ~64 MB.
BATCH_SIZE = 64


def parquet_files(manual_dir: str, file: Optional[str] = None) -> List[str]:
  """The shards to read: ``file`` alone when given, else every ``*.parquet`` of ``manual_dir``, sorted."""
  if file:
    path = file if os.path.isabs(file) else os.path.join(manual_dir, file)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such parquet file")
    return [path]
  names = sorted(f for f in os.listdir(manual_dir) if f.endswith(".parquet"))
  if not names:
    raise FileNotFoundError(f"{manual_dir}: no *.parquet files (the Pick-a-Pic v2 shards, data/train-*.parquet)")
  # The hub's data/ folder holds every split (train-*, validation-*, test-*, *_unique-*): reading them all
  # would put the evaluation pairs into the training set.
  splits = sorted({m.group(1) for m in map(_HUB_SHARD.match, names) if m})
  if len(splits) > 1:
    raise SourceError(f"{manual_dir}: parquet shards of several splits {splits}; keep one split's shards in the "
                      f"folder (e.g. train-*.parquet) or pass one file")
  return [os.path.join(manual_dir, f) for f in names]


def read_pickapic(files: List[str], spec: RecordSpec, stats: Dict[str, Any], *,
                  batch_size: int = BATCH_SIZE) -> Iterator[Tuple[str, Dict[str, Any]]]:
  """``(key, record)`` of every non-tie row of ``files``, chosen image first, checked against ``spec``;
  counts into ``stats`` (``files``, ``rows_read``, ``ties_dropped``, ``swapped``, ``pairs_written``)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  for name in ("files", "rows_read", "ties_dropped", "swapped", "pairs_written"):
    stats.setdefault(name, 0)
  for path in files:
    base = os.path.basename(path)
    try:
      table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
      raise SourceError(f"{path}: not a readable parquet file ({e})") from e
    names = table.schema_arrow.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
      raise SourceError(f"{path}: no column(s) {missing} (Pick-a-Pic v2 shards have {list(COLUMNS)}; "
                        f"this file has {names})")
    columns = list(COLUMNS) + ([ID_COLUMN] if ID_COLUMN in names else [])
    stats["files"] += 1
    offset = 0  # rows of this file before the batch
    for batch in table.iter_batches(batch_size=batch_size, columns=columns):
      values = {c: batch.column(c).to_pylist() for c in columns}
      for i in range(batch.num_rows):
        row = offset + i
        where = f"{path} row {row}"
        stats["rows_read"] += 1
        label = _label(values["label_0"][i], where)
        if label == 0.5:
          stats["ties_dropped"] += 1
          continue
        caption = values["caption"][i]
        if not isinstance(caption, str):
          raise SourceError(f"{where}: caption = {caption!r} is not a string")
        images = [values["jpg_0"][i], values["jpg_1"][i]]
        for column, data in zip(("jpg_0", "jpg_1"), images):
          check_image_bytes(data, f"{where}: {column}")
        if label == 0.0:
          images.reverse()
          stats["swapped"] += 1
        ranking = values[ID_COLUMN][i] if ID_COLUMN in values else None
        source_id = f"pickapic:{ranking}" if ranking is not None else f"{base}:{row}"
        record = {"prompt": caption, "source_id": source_id, "image_chosen": images[0],
                  "image_rejected": images[1]}
        stats["pairs_written"] += 1
        yield f"{base}:{row}", spec.check_record(record, where=where)
      offset += batch.num_rows


def _label(value: Any, where: str) -> float:
  try:
    label = float(value)
  except (TypeError, ValueError):
    label = None
  if label not in LABELS:
    raise SourceError(f"{where}: label_0 = {value!r}; expected 0 (image 1 preferred), 1 (image 0 preferred) "
                      f"or 0.5 (tie)")
  return label


class Pickapic(LocalBuilder, skip_registration=True):
  """Pick-a-Pic v2 pairs (chosen image first, ties dropped) from local parquet shards."""
  name = "pickapic"
  DESCRIPTION = __doc__
  HOMEPAGE = "https://huggingface.co/datasets/yuvalkirstain/pickapic_v2"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the Pick-a-Pic v2 training shards (yuvalkirstain/pickapic_v2 on the Hugging Face hub, data/train-*.parquet,
  or any subset of them; not the validation-*/test-* shards of the same folder) in one folder and pass it as
  --source (or one shard as --source=<folder>/<file>).
  Needed columns: caption, jpg_0, jpg_1, label_0 (ranking_id, when present, names the pairs)."""

  def record_spec(self) -> RecordSpec:
    return pair_spec()

  @classmethod
  def detect_config(cls, manual_dir: str, file: Optional[str] = None) -> Optional[str]:
    parquet_files(manual_dir, file)
    return None

  def _generate_examples(self, manual_dir: str):
    self.stats = {}
    yield from read_pickapic(parquet_files(manual_dir, self.input_file), self.record_spec(), self.stats)
