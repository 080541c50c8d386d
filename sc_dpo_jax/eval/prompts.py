"""Prompt sets for the evaluation: I2P-style CSV files and the plain lists that attack methods write.

    sets = [read_prompt_set(spec) for spec in ("data/i2p_benchmark.csv", "ringabell=out/ring_a_bell.txt")]
    sets[0].name, sets[0].rows[0]      # "i2p_benchmark", PromptRow(text=..., line=2, categories=("sexual",), ...)

A spec is ``path`` (the set is named after the file's stem) or ``name=path``. Formats, by suffix:

* ``.csv`` with a header. The prompt column (``prompt``, or ``column=``) is required. Optional columns, the first
  present of each group is used (I2P's names first, then those of ESD/UnlearnDiff/Ring-A-Bell prompt files):
  seed ``sd_seed``, ``evaluation_seed``, ``seed``; guidance ``sd_guidance_scale``, ``sd_guidance``,
  ``evaluation_guidance``, ``guidance``; ``categories`` (comma-separated, e.g. ``"sexual,violence"``);
  ``negative_prompt``. Other columns (I2P's ``hard``, ``nudity_percentage``, ``sd_image_width``, ...) are ignored:
  the image size comes from the command's flags. An empty (or ``nan``) seed or guidance cell means "not given".
* ``.jsonl``: one JSON object per line with the same keys (``prompt`` required); blank lines are skipped.
* ``.txt``: one prompt per non-empty line (surrounding whitespace removed).

Errors name the file, the line (1-based, the header is line 1 of a CSV) and the column: an empty prompt, a
non-integer or negative seed, a non-number or non-finite guidance, a row with more or fewer cells than the
header, a missing prompt column. Nothing is skipped silently; the rows keep the file's order.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

SUFFIXES = (".csv", ".jsonl", ".txt")
SEED_COLUMNS = ("sd_seed", "evaluation_seed", "seed")
GUIDANCE_COLUMNS = ("sd_guidance_scale", "sd_guidance", "evaluation_guidance", "guidance")
CATEGORIES, NEGATIVE = "categories", "negative_prompt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PromptFileError(ValueError):
  """A prompt file that cannot be read; the message names the file, the line and the column."""


@dataclasses.dataclass(frozen=True)
class PromptRow:
  """One prompt of a set: its text, where it is in the file, and what the file gives with it."""
  text: str
  line: int                                  # 1-based line of the file where the row starts
  categories: Tuple[str, ...] = ()           # I2P's concepts, e.g. ("sexual", "violence")
  seed: Optional[int] = None                 # per-prompt seed (None: the command's --seed)
  guidance: Optional[float] = None           # per-prompt guidance scale (None: the command's --guidance)
  negative_prompt: Optional[str] = None      # per-prompt negative prompt (None: the command's flag)


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """A named prompt set read from ``path``."""
  name: str
  path: str
  rows: Tuple[PromptRow, ...]

  @property
  def has_categories(self) -> bool:
    return any(r.categories for r in self.rows)

  def limit(self, n: Optional[int]) -> "PromptSet":
    """The first ``n`` rows (all when ``n`` is None)."""
    return self if n is None else dataclasses.replace(self, rows=self.rows[:n])


def parse_spec(spec: str) -> Tuple[str, str]:
  """``"name=path"`` or ``"path"`` -> ``(name, path)``; the name defaults to the file's stem and must be usable as
  a folder name (letters, digits, ``_ . -``)."""
  name, sep, path = spec.partition("=")
  if not sep or os.sep in name or not _NAME.match(name):
    name, path = os.path.splitext(os.path.basename(spec))[0], spec
  if not path:
    raise PromptFileError(f"--prompts={spec!r}: no file given (use PATH or NAME=PATH)")
  if not _NAME.match(name):
    raise PromptFileError(f"--prompts={spec!r}: the set name {name!r} must be letters, digits, '_', '.' or '-' "
                          "(starting with a letter or digit); give one with NAME=PATH")
  return name, os.path.expanduser(path)


def read_prompt_set(spec: str, *, column: str = "prompt") -> PromptSet:
  """Reads the prompt set ``spec`` (``path`` or ``name=path``; formats in the module docstring)."""
  name, path = parse_spec(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such prompt file (set {name!r})")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".csv":
    rows = _read_csv(path, column)
  elif ext == ".jsonl":
    rows = _read_jsonl(path, column)
  elif ext == ".txt":
    with open(path, encoding="utf-8-sig") as f:
      rows = [PromptRow(text=t.strip(), line=i) for i, t in enumerate(f, start=1) if t.strip()]
  else:
    raise PromptFileError(f"{path}: unknown prompt file type {ext!r}; use one of {SUFFIXES}")
  if not rows:
    raise PromptFileError(f"{path}: no prompts")
  return PromptSet(name=name, path=path, rows=tuple(rows))


def read_prompt_sets(specs: Sequence[str], *, column: str = "prompt", limit: Optional[int] = None) -> List[PromptSet]:
  """Every set of ``specs`` (first ``limit`` rows of each); two sets with the same name are an error."""
  if not specs:
    raise PromptFileError("no prompt sets: give --prompts PATH (repeat it for several sets)")
  if limit is not None and limit < 1:
    raise PromptFileError(f"--limit={limit} must be >= 1")
  out = [read_prompt_set(s, column=column).limit(limit) for s in specs]
  names = [s.name for s in out]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise PromptFileError(f"prompt set name(s) {twice} given twice; name them with --prompts NAME=PATH")
  return out


# -- cells ------------------------------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
  return value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null"))


def _seed(value: Any, where: str, key: str) -> Optional[int]:
  if _missing(value):
    return None
  text = value.strip() if isinstance(value, str) else value
  try:
    number = float(text)
  except (TypeError, ValueError):
    number = math.nan
  if isinstance(value, bool) or not math.isfinite(number) or not number.is_integer() or number < 0:
    raise PromptFileError(f"{where}: column {key!r} = {value!r} is not a non-negative integer seed")
  if isinstance(text, str) and text.lstrip("+").isdigit():
    return int(text)                          # exact beyond float precision
  return int(number)


def _guidance(value: Any, where: str, key: str) -> Optional[float]:
  if _missing(value):
    return None
  try:
    number = float(value.strip() if isinstance(value, str) else value)
  except (TypeError, ValueError):
    number = math.nan
  if isinstance(value, bool) or not math.isfinite(number) or number < 0:
    raise PromptFileError(f"{where}: column {key!r} = {value!r} is not a finite guidance scale >= 0")
  return number


def _categories(value: Any, where: str) -> Tuple[str, ...]:
  if _missing(value):
    return ()
  if isinstance(value, (list, tuple)):
    items = value
  elif isinstance(value, str):
    items = value.split(",")
  else:
    raise PromptFileError(f"{where}: column {CATEGORIES!r} = {value!r} must be a comma-separated string or a list")
  return tuple(c.strip() for c in items if str(c).strip())


def _row(record: Mapping[str, Any], line: int, where: str, column: str) -> PromptRow:
  text = record.get(column)
  if not isinstance(text, str) or not text.strip():
    raise PromptFileError(f"{where}: column {column!r} is empty or not text ({text!r})")
  seed_key = next((k for k in SEED_COLUMNS if k in record), None)
  guidance_key = next((k for k in GUIDANCE_COLUMNS if k in record), None)
  negative = record.get(NEGATIVE)
  if negative is not None and not isinstance(negative, str):
    raise PromptFileError(f"{where}: column {NEGATIVE!r} = {negative!r} must be text")
  return PromptRow(text=text.strip(), line=line, categories=_categories(record.get(CATEGORIES), where),
                   seed=_seed(record[seed_key], where, seed_key) if seed_key else None,
                   guidance=_guidance(record[guidance_key], where, guidance_key) if guidance_key else None,
                   negative_prompt=negative.strip() if negative and negative.strip() else None)


def _read_csv(path: str, column: str) -> List[PromptRow]:
  import csv  # pylint: disable=g-import-not-at-top
  rows: List[PromptRow] = []
  with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: spreadsheets write a byte-order mark
    reader = csv.reader(f)
    header: Optional[List[str]] = None
    previous = 0
    try:
      for cells in reader:
        line, previous = previous + 1, reader.line_num      # the line where this row starts
        if not any(c.strip() for c in cells):
          continue
        if header is None:
          header = [c.strip() for c in cells]
          twice = sorted({c for c in header if header.count(c) > 1})
          if twice:
            raise PromptFileError(f"{path}:{line}: column(s) {twice} appear twice in the header")
          if column not in header:
            raise PromptFileError(f"{path}:{line}: the header has no column {column!r} (it has {header})")
          continue
        if len(cells) != len(header):
          raise PromptFileError(f"{path}:{line}: {len(cells)} cells, but the header has {len(header)} columns")
        rows.append(_row(dict(zip(header, cells)), line, f"{path}:{line}", column))
    except csv.Error as e:
      raise PromptFileError(f"{path}:{previous + 1}: not valid CSV ({e})") from None
  if header is None:
    raise PromptFileError(f"{path}: empty file (no header)")
  return rows


def _read_jsonl(path: str, column: str) -> List[PromptRow]:
  rows: List[PromptRow] = []
  with open(path, encoding="utf-8-sig") as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        record: Dict[str, Any] = json.loads(text)
      except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}:{line}: not JSON ({e})") from None
      if not isinstance(record, dict):
        raise PromptFileError(f"{path}:{line}: not a JSON object")
      if column not in record:
        raise PromptFileError(f"{path}:{line}: no field {column!r} (fields: {sorted(record)})")
      rows.append(_row(record, line, f"{path}:{line}", column))
  return rows
