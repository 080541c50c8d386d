"""Damaged TFRecord files: the error names the file and record; skipping costs the damaged record only.

Damage is done to real files written by ``records.write_records``: a flipped byte inside one record's data
(its checksum fails, its length is intact), a flipped byte in one record's length field (the reader must find
the next frame), and a file cut short in its last record. TensorFlow's own reader stops at such a frame with
``DataLossError`` and loses the rest of the file; :mod:`sc_dpo_jax.data.framing` reads around it.
"""
import os
import struct

import numpy as np
import pytest

from sc_dpo_jax.data import framing, pipeline, records, schema
from sc_dpo_jax.data.schema import RecordError

N = 24


def _write(folder):
  spec = schema.pair_spec(image_format=schema.LATENT, latent_shape=(2, 2, 8),
                           latent_scaling_factor=0.18215)
  rows = [dict(prompt=f"prompt {i}", source_id=f"id{i}", moments_chosen=np.full((2, 2, 8), i, np.float32),
               moments_rejected=np.full((2, 2, 8), -i, np.float32)) for i in range(N)]
  return records.write_records(str(folder), spec, rows, name="pairs", num_shards=1)


def _offsets(path):
  """Byte offset of each frame of a TFRecord file (from the intact file's length fields)."""
  buf = open(path, "rb").read()
  out, pos = [], 0
  while pos < len(buf):
    out.append(pos)
    (length,) = struct.unpack_from("<Q", buf, pos)
    pos += 12 + length + 4
  return out


def _flip(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def _damaged(tmp_path, how):
  source = _write(tmp_path / how)
  path = source.files[0]
  offsets = _offsets(path)
  if how == "data":
    _flip(path, offsets[7] + 12 + 20)          # inside record 7's serialized example
  elif how == "length":
    _flip(path, offsets[7] + 1)                # record 7's length field
  elif how == "truncated":
    with open(path, "r+b") as f:
      f.truncate(offsets[N - 1] + 30)          # the last record cut short
  return records.open_source(str(tmp_path / how)), path


def _epoch_ids(source, **kwargs):
  it = pipeline.DataIterator(source, batch_size=4, seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
                             **kwargs)
  ids = [s for batch in it for s in batch["source_id"]]
  return ids, it


@pytest.mark.parametrize("how,bad", [("data", 7), ("length", 7), ("truncated", N - 1)])
def test_damaged_record_is_named_by_default_and_costs_itself_only_when_skipped(tmp_path, how, bad):
  source, path = _damaged(tmp_path, how)
  report = framing.scan(path)
  assert [b.index for b in report.bad] == [bad] and len(report.slots) == N

  with pytest.raises(RecordError) as e:
    _epoch_ids(source)
  message = str(e.value)
  assert path in message and f"record {bad} " in message and "skip_bad_records" in message

  ids, it = _epoch_ids(source, skip_bad_records=True)
  assert ids == [f"id{i}" for i in range(N) if i != bad]
  assert it.bad_records == 1


def test_skipping_over_epochs_and_resume_counts_one_per_epoch(tmp_path):
  source, _ = _damaged(tmp_path, "data")
  it = pipeline.DataIterator(source, batch_size=5, seed=3, skip_bad_records=True)
  first = [next(it) for _ in range(4)]                       # 20 records: past the damaged one of epoch 0
  state = it.state()
  rest = [next(it) for _ in range(6)]                        # into epoch 1
  assert it.bad_records == 2
  resumed = pipeline.DataIterator(source, batch_size=5, seed=3, skip_bad_records=True)
  resumed.restore(state)
  again = [next(resumed) for _ in range(6)]
  assert [list(b["source_id"]) for b in again] == [list(b["source_id"]) for b in rest]
  assert resumed.bad_records == 2
  delivered = [s for b in first + rest for s in b["source_id"]]
  assert "id7" not in delivered and len(set(delivered[:N - 1])) == N - 1
  assert os.path.exists(it._readable[0])       # pylint: disable=protected-access
