"""What the local-folder TFDS builders share: the base class, input-file lookup, and strict cell parsers.

Every builder here reads files the user already has (``dl_manager.manual_dir``) and downloads nothing. The
base class turns a builder's :class:`~sc_dpo_jax.data.schema.RecordSpec` into the TFDS features and stores
the spec's JSON in the dataset's metadata (key ``record_spec``), which is what ``records.open_source`` reads
back. Builders count what they read, skip and write in ``self.stats``; ``data.prepare`` saves those counts
next to the shards, so a dropped tie or an ignored column is visible rather than silent.

The classes are created with ``skip_registration=True``: TFDS otherwise keeps a process-wide registry keyed
by dataset name and raises "already registered" when a module is executed a second time (``importlib.reload``,
``python -m`` of a module that is also imported, notebook re-runs). Our own registry is
``builders.BUILDERS``; reading a prepared folder goes through ``tfds.builder_from_directory``, which needs no
registered class.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import tensorflow_datasets as tfds
from etils import epath

from sc_dpo_jax.data.schema import RecordSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
TRAIN = "train"


class SourceError(ValueError):
  """Input data that cannot be turned into records; the message names the file and the row/line and key."""


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder of one ``train`` split read from ``manual_dir`` (set through
  ``tfds.download.DownloadConfig(manual_dir=...)``).

  ``file``: for builders that read one table, its name inside ``manual_dir`` (or an absolute path) when the
  folder holds several candidates; ``None`` means "the only one there".
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  DESCRIPTION = ""
  HOMEPAGE: Optional[str] = None
  # Records in the order the input lists them (prompt sets, so evaluation reports follow the file); pair
  # datasets keep TFDS's key-hash shuffle, which mixes the input files across shards.
  KEEP_ORDER = False
  # Whether ``data.prepare --source`` may name one file (read from its folder) instead of a folder.
  READS_ONE_FILE = True

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This builder's source file. TFDS's own lookup (4.9.10) touches ``importlib_resources``, a package it
    only requires on Python < 3.9 (tensorflow/datasets#11212), so ``download_and_prepare`` fails with
    ModuleNotFoundError on a clean 3.11 install; TFDS uses the path only to look for a checksums file."""
    return epath.Path(os.path.abspath(sys.modules[cls.__module__].__file__))

  def __init__(self, *, file: Optional[str] = None, **kwargs):
    # Set before DatasetBuilder.__init__, which already calls _info().
    self.input_file = file
    self.stats: Dict[str, Any] = {}
    super().__init__(**kwargs)

  # -- what subclasses provide -----------------------------------------------------------------------------

  def record_spec(self) -> RecordSpec:
    """The spec of the records this builder (with its config) writes."""
    raise NotImplementedError

  def _generate_examples(self, manual_dir: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Yields ``(unique key, record)`` with records checked by ``self.record_spec().check_record``."""
    raise NotImplementedError

  @classmethod
  def detect_config(cls, manual_dir: str, file: Optional[str] = None) -> Optional[str]:
    """The config that fits the data in ``manual_dir`` (``None`` for builders without configs). Also checks
    that the input is there, so ``data.prepare`` fails before TFDS creates any folder."""
    del manual_dir, file
    return None

  # -- TFDS --------------------------------------------------------------------------------------------------

  def _info(self) -> tfds.core.DatasetInfo:
    spec = self.record_spec()
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=spec.tfds_features(),
        homepage=self.HOMEPAGE,
        disable_shuffling=self.KEEP_ORDER,
        metadata=tfds.core.MetadataDict(record_spec=spec.to_json()),
    )

  def _split_generators(self, dl_manager):
    return {TRAIN: self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def count(self, key: str, n: int = 1) -> None:
    self.stats[key] = self.stats.get(key, 0) + n


# -- finding the input ---------------------------------------------------------------------------------------


def resolve_file(manual_dir: str, file: Optional[str], suffixes: Sequence[str], what: str) -> str:
  """The input table: ``file`` (relative to ``manual_dir`` or absolute) when given, else the single file in
  ``manual_dir`` whose name ends with one of ``suffixes``; none or several is an error that lists them."""
  if file:
    path = file if os.path.isabs(file) else os.path.join(manual_dir, file)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such {what} file")
    return path
  found = sorted(f for f in os.listdir(manual_dir)
                 if f.lower().endswith(tuple(suffixes)) and os.path.isfile(os.path.join(manual_dir, f)))
  patterns = ", ".join("*" + s for s in suffixes)
  if not found:
    raise FileNotFoundError(f"{manual_dir}: no {what} file ({patterns}) in this folder")
  if len(found) > 1:
    raise SourceError(f"{manual_dir}: several {what} files {found}; name one (pass --source=<folder>/<file>)")
  return os.path.join(manual_dir, found[0])


def read_image(path: str, where: str, key: str) -> bytes:
  """The encoded bytes of an image file, as stored (never re-encoded); a missing, empty or non-image file
  is an error naming ``where`` (file and line of the table), ``key`` and the path."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: {key} image {path!r} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  check_image_bytes(data, f"{where}: {key} image {path!r}")
  return data


def check_image_bytes(data: Optional[bytes], where: str) -> None:
  """Cheap check of the first bytes, so a truncated download or a text file fails here, naming its row,
  instead of inside the training input pipeline."""
  if not data:
    raise SourceError(f"{where} is empty")
  if not image_format(data):
    raise SourceError(f"{where} is not a JPEG, PNG, GIF, BMP or WebP image (starts with {bytes(data[:8])!r})")


def image_format(data: bytes) -> Optional[str]:
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  if data[:6] in (b"GIF87a", b"GIF89a"):
    return "gif"
  if data[:2] == b"BM":
    return "bmp"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  return None


# -- cells ---------------------------------------------------------------------------------------------------


def is_missing(value: Any) -> bool:
  """Absent cell: JSON null, or an empty CSV cell."""
  return value is None or (isinstance(value, str) and not value.strip())


def parse_float(value: Any, where: str, key: str) -> float:
  if isinstance(value, bool):
    raise SourceError(f"{where}: {key!r} = {value!r} is a boolean, expected a number")
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise SourceError(f"{where}: {key!r} = {value!r} is not a number") from None
  if not math.isfinite(out):
    raise SourceError(f"{where}: {key!r} = {value!r} is not finite")
  return out


def parse_int(value: Any, where: str, key: str) -> int:
  number = parse_float(value, where, key)
  if not number.is_integer():
    raise SourceError(f"{where}: {key!r} = {value!r} is not an integer")
  if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
    return int(value.strip())  # exact for integers beyond float precision
  return int(number)


def parse_bool(value: Any, where: str, key: str) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, (int, float)) and value in (0, 1):
    return bool(value)
  if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
    return value.strip().lower() in ("true", "1")
  raise SourceError(f"{where}: {key!r} = {value!r} is not a boolean (true/false/1/0)")


def parse_text(value: Any, where: str, key: str, *, allow_empty: bool = True) -> str:
  if not isinstance(value, str):
    raise SourceError(f"{where}: {key!r} = {value!r} must be a string")
  if not allow_empty and not value.strip():
    raise SourceError(f"{where}: {key!r} is empty")
  return value


# -- tables --------------------------------------------------------------------------------------------------


def csv_rows(path: str, required: Sequence[str] = ()) -> Iterator[Tuple[int, Dict[str, str]]]:
  """``(line, {column: cell})`` for each data row of a CSV file with a header; ``line`` is the 1-based line
  where the row starts (the header is line 1 unless blank lines precede it), so a quoted cell spanning
  several lines still names the right place. Blank rows are skipped; a row with a different number of cells
  than the header, or a header without a ``required`` column, is an error naming the file (and line)."""
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
    reader = csv.reader(f)
    header: Optional[Sequence[str]] = None
    previous = 0
    try:
      for row in reader:
        line, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in row):
          continue
        if header is None:
          header = [cell.strip() for cell in row]
          duplicates = sorted({c for c in header if header.count(c) > 1})
          if duplicates:
            raise SourceError(f"{path}:{line}: duplicate column(s) {duplicates} in the header")
          missing = [c for c in required if c not in header]
          if missing:
            raise SourceError(f"{path}: no column(s) {missing} in the header (it has {list(header)})")
          continue
        if len(row) != len(header):
          raise SourceError(f"{path}:{line}: {len(row)} cells, but the header has {len(header)} columns")
        yield line, dict(zip(header, row))
    except csv.Error as e:
      raise SourceError(f"{path}:{reader.line_num}: not valid CSV ({e})") from e
  if header is None and required:
    raise SourceError(f"{path}: empty CSV file (no header with {list(required)})")


def jsonl_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
  """``(line, object)`` for each non-blank line of a JSON-lines file; a line that is not a JSON object is an
  error naming file and line."""
  import json  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8-sig") as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        value = json.loads(text)
      except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{line}: not valid JSON ({e})") from e
      if not isinstance(value, dict):
        raise SourceError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
      yield line, value
