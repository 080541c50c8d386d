"""Preference pairs listed in a JSONL or CSV table (SC-DPO's SCP style, or any (prompt, chosen, rejected) list).

Columns (JSONL keys or CSV header):

=================================== ===========================================================================
``prompt``                          the prompt
``chosen``, ``rejected``            image paths, relative to the table's folder or absolute; the files' bytes
                                    are stored as they are (JPEG/PNG/GIF/BMP/WebP, never re-encoded)
``cost_chosen``, ``cost_rejected``  optional, both or neither: safety costs of the two images (SC-DPO)
``harmful``                         optional: true/false/1/0, whether the prompt is harmful (SC-DPO's mix)
``id``                              optional: the pair's ``source_id`` (default ``<table file>:<line>``)
=================================== ===========================================================================

Other columns are ignored (and listed in the stats as ``ignored_columns``). Which optional columns are
stored is the builder config (``plain``, ``costs``, ``harmful``, ``costs_harmful``); ``data.prepare`` picks it
from the table when none is named, and every row must then agree with the first (an error names the line
that does not). A config that stores less than the table has is allowed; one that needs a column a row lacks
is an error naming the line.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Set, Tuple

import tensorflow_datasets as tfds

from sc_dpo_jax.data.builders._base import (LocalBuilder, SourceError, csv_rows, is_missing, jsonl_rows, parse_bool,
                                            parse_float, parse_text, read_image, resolve_file)
from sc_dpo_jax.data.schema import RecordSpec, pair_spec

SUFFIXES = (".jsonl", ".csv")
REQUIRED = ("prompt", "chosen", "rejected")
COSTS = ("cost_chosen", "cost_rejected")
HARMFUL = "harmful"
KNOWN = REQUIRED + COSTS + (HARMFUL, "id")


def table_rows(path: str) -> Iterator[Tuple[int, Mapping[str, Any]]]:
  """``(line, row)`` of a ``.jsonl`` or ``.csv`` table."""
  if path.lower().endswith(".jsonl"):
    return jsonl_rows(path)
  if path.lower().endswith(".csv"):
    return csv_rows(path, required=REQUIRED)
  raise SourceError(f"{path}: a pairs table must be .jsonl or .csv")


def row_columns(row: Mapping[str, Any], where: str) -> Tuple[bool, bool]:
  """Whether ``row`` has costs and a harmful flag (a missing or empty cell counts as absent); one cost
  without the other is an error."""
  costs = [not is_missing(row.get(c)) for c in COSTS]
  if costs[0] != costs[1]:
    given, absent = (COSTS[0], COSTS[1]) if costs[0] else (COSTS[1], COSTS[0])
    raise SourceError(f"{where}: {given!r} is given but {absent!r} is not; give both costs or neither")
  return costs[0], not is_missing(row.get(HARMFUL))


def detect_columns(path: str) -> Tuple[bool, bool]:
  """``(has_costs, has_harmful)`` of the table's first row; every later row must agree (error naming both
  lines otherwise). Reads the table only, not the images."""
  first: Optional[Tuple[int, Tuple[bool, bool]]] = None
  for line, row in table_rows(path):
    where = f"{path}:{line}"
    columns = row_columns(row, where)
    if first is None:
      first = (line, columns)
    elif columns != first[1]:
      raise SourceError(f"{where}: this row {_describe(columns)} but line {first[0]} {_describe(first[1])}; all "
                        f"rows must have the same optional columns (or name a config with --config)")
  if first is None:
    raise SourceError(f"{path}: no pairs in the table")
  return first[1]


def _describe(columns: Tuple[bool, bool]) -> str:
  costs, harmful = columns
  return (f"{'has' if costs else 'has no'} costs and {'a' if harmful else 'no'} harmful flag")


def read_pairs_table(path: str, spec: RecordSpec, stats: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
  """``(key, record)`` for each row of the table at ``path``, checked against ``spec``; counts into ``stats``
  (``rows_read``, ``pairs_written``, ``harmful_prompts`` when stored, ``ignored_columns``)."""
  folder = os.path.dirname(os.path.abspath(path))
  base = os.path.basename(path)
  stats.update(table=path, rows_read=0, pairs_written=0)
  if spec.has_harmful_prompt:
    stats["harmful_prompts"] = 0
  ignored: Set[str] = set()
  seen_ids: Dict[str, int] = {}
  for line, row in table_rows(path):
    where = f"{path}:{line}"
    stats["rows_read"] += 1
    for key in REQUIRED:
      # An empty prompt is a prompt (unconditional pairs); an empty image path is not.
      if row.get(key) is None or (key != "prompt" and is_missing(row[key])):
        raise SourceError(f"{where}: no {key!r}" + ("" if key in row else f" (the row has {sorted(row)})"))
    has_costs, has_harmful = row_columns(row, where)
    ignored.update(k for k in row if k not in KNOWN)
    if has_costs and not spec.has_costs:
      ignored.update(COSTS)
    if has_harmful and not spec.has_harmful_prompt:
      ignored.add(HARMFUL)
    record: Dict[str, Any] = {"prompt": parse_text(row["prompt"], where, "prompt")}
    for key in ("chosen", "rejected"):
      file = os.path.expanduser(parse_text(row[key], where, key))
      record[f"image_{key}"] = read_image(file if os.path.isabs(file) else os.path.join(folder, file), where, key)
    if not record["prompt"].strip():
      stats["empty_prompts"] = stats.get("empty_prompts", 0) + 1
    source_id = f"{base}:{line}" if is_missing(row.get("id")) else str(row["id"]).strip()
    if source_id in seen_ids:
      raise SourceError(f"{where}: id {source_id!r} is already used on line {seen_ids[source_id]}")
    seen_ids[source_id] = line
    record["source_id"] = source_id
    if spec.has_costs:
      if not has_costs:
        raise SourceError(f"{where}: no {COSTS[0]!r}/{COSTS[1]!r}, which the config stores")
      for key in COSTS:
        record[key] = parse_float(row[key], where, key)
    if spec.has_harmful_prompt:
      if not has_harmful:
        raise SourceError(f"{where}: no {HARMFUL!r} flag, which the config stores")
      record["harmful_prompt"] = int(parse_bool(row[HARMFUL], where, HARMFUL))
      stats["harmful_prompts"] += record["harmful_prompt"]
    stats["pairs_written"] += 1
    yield f"{base}:{line}", spec.check_record(record, where=where)
  if not stats["rows_read"]:
    raise SourceError(f"{path}: no pairs in the table")
  stats["ignored_columns"] = sorted(ignored)


@dataclasses.dataclass(eq=False)
class PairsTableConfig(tfds.core.BuilderConfig):
  """Which optional columns are stored."""
  has_costs: bool = False
  has_harmful: bool = False


def config_name(has_costs: bool, has_harmful: bool) -> str:
  return {(False, False): "plain", (True, False): "costs", (False, True): "harmful",
          (True, True): "costs_harmful"}[(has_costs, has_harmful)]


CONFIGS = [PairsTableConfig(name=config_name(c, h), has_costs=c, has_harmful=h,
                            description=f"pairs with{'' if c else 'out'} costs and with{'' if h else 'out'} the "
                                        f"harmful-prompt flag")
           for c, h in ((False, False), (True, False), (False, True), (True, True))]


class PairsTable(LocalBuilder, skip_registration=True):
  """(prompt, chosen, rejected) pairs, optionally with safety costs and a harmful flag, from a JSONL/CSV table."""
  name = "pairs_table"
  DESCRIPTION = __doc__
  BUILDER_CONFIGS = CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put one pairs table (*.jsonl or *.csv with columns prompt, chosen, rejected and optionally cost_chosen,
  cost_rejected, harmful, id) in a folder together with its images (paths relative to the table's folder, or
  absolute), and pass the folder as --source, or the table itself as --source=<folder>/<table>."""

  def record_spec(self) -> RecordSpec:
    config = self.builder_config
    return pair_spec(has_costs=config.has_costs, has_harmful_prompt=config.has_harmful)

  @classmethod
  def detect_config(cls, manual_dir: str, file: Optional[str] = None) -> Optional[str]:
    return config_name(*detect_columns(resolve_file(manual_dir, file, SUFFIXES, "pairs table")))

  def _generate_examples(self, manual_dir: str):
    self.stats = {}
    path = resolve_file(manual_dir, self.input_file, SUFFIXES, "pairs table")
    yield from read_pairs_table(path, self.record_spec(), self.stats)
