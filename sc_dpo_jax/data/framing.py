"""TFRecord framing checks: find the records of a shard whose bytes are damaged, and read around them.

A TFRecord file is a sequence of frames ``[length u64][masked crc32c(length) u32][data][masked crc32c(data)
u32]``. TensorFlow's reader stops at the first damaged frame with ``DataLossError: corrupted record at
<offset>`` and cannot go on in that file, so one flipped byte would cost every record after it. Here:

    report = scan("data/pairs/train-00001-of-00004.tfrecord")
    report.bad          # [BadFrame(index=7, offset=7894, reason="data checksum mismatch")]
    path = readable_copy(source_path, report, folder)    # the same records, each damaged one as an empty record

:func:`scan` walks the frames: a frame whose data checksum fails is one bad record (its length is trusted, so
the next frame is found); a frame whose length checksum fails, or that runs past the end of the file, makes
the scan look for the next offset where a whole valid frame starts, and everything in between is one bad
record. :func:`readable_copy` writes a copy in which every bad record is an empty record, so record indices
stay those of the original file and the input pipeline counts the empty record as one bad record (under
``skip_bad_records``) or names it. Checksums are CRC-32C (``google_crc32c``, in C).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from typing import List, Optional, Tuple

import google_crc32c
from etils import epath

_HEADER = 12         # u64 length + u32 crc
_FOOTER = 4


def masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class BadFrame:
  index: int         # the record's index in the file (what the reader would have numbered it)
  offset: int        # byte offset where the damage starts
  reason: str


@dataclasses.dataclass
class Scan:
  path: str
  frames: List[Tuple[int, int]]          # (data offset, data length) of every readable record, in order...
  slots: List[Optional[int]]             # ...and per record index: position in ``frames``, or None when bad
  bad: List[BadFrame]


def _frame_at(buf: bytes, pos: int) -> Optional[Tuple[int, str]]:
  """``(data length, "")`` of a whole valid frame at ``pos``, else ``(-1 or length, reason)``."""
  if pos + _HEADER > len(buf):
    return -1, f"truncated frame header ({len(buf) - pos} bytes left)"
  length, length_crc = struct.unpack_from("<QI", buf, pos)
  if masked_crc(buf[pos:pos + 8]) != length_crc:
    return -1, "length checksum mismatch"
  end = pos + _HEADER + length + _FOOTER
  if end > len(buf):
    return -1, f"truncated record ({length} bytes announced, {len(buf) - pos - _HEADER} left)"
  data = buf[pos + _HEADER:pos + _HEADER + length]
  (data_crc,) = struct.unpack_from("<I", buf, pos + _HEADER + length)
  if masked_crc(data) != data_crc:
    return length, "data checksum mismatch"
  return length, ""


def scan(path: str) -> Scan:
  """Every frame of ``path``, readable or not (see the module docstring)."""
  buf = epath.Path(path).read_bytes()
  frames: List[Tuple[int, int]] = []
  slots: List[Optional[int]] = []
  bad: List[BadFrame] = []
  pos = 0
  while pos < len(buf):
    length, reason = _frame_at(buf, pos)
    if not reason:
      slots.append(len(frames))
      frames.append((pos + _HEADER, length))
      pos += _HEADER + length + _FOOTER
      continue
    bad.append(BadFrame(index=len(slots), offset=pos, reason=reason))
    slots.append(None)
    if length >= 0:                       # the frame's length is trustworthy: skip just this record
      pos += _HEADER + length + _FOOTER
      continue
    pos = _next_valid_frame(buf, pos + 1)
  return Scan(path=str(path), frames=frames, slots=slots, bad=bad)


def _next_valid_frame(buf: bytes, start: int) -> int:
  """The first offset from ``start`` where a whole valid frame begins (the end of ``buf`` if none)."""
  for pos in range(start, len(buf) - _HEADER + 1):
    if not _frame_at(buf, pos)[1]:
      return pos
  return len(buf)


def _frame(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def readable_copy(report: Scan, folder: str) -> str:
  """A copy of ``report.path`` in ``folder`` with every bad record replaced by an empty record (same record
  indices), named by the source's path and size so a rerun reuses it; returns its path."""
  source = epath.Path(report.path)
  buf = source.read_bytes()
  key = hashlib.sha1(f"{report.path}:{len(buf)}".encode()).hexdigest()[:12]
  out = os.path.join(folder, f"{key}-{source.name}")
  if os.path.exists(out):
    return out
  os.makedirs(folder, exist_ok=True)
  chunks = []
  for slot in report.slots:
    if slot is None:
      chunks.append(_frame(b""))
    else:
      offset, length = report.frames[slot]
      chunks.append(buf[offset - _HEADER:offset + length + _FOOTER])
  tmp = f"{out}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(b"".join(chunks))
  os.replace(tmp, out)
  return out
