"""Prompt records from an I2P-style CSV or a plain text list (evaluation sets and on-line RL prompts).

* ``.csv`` with a header: ``prompt`` (required), and when present ``categories`` (I2P's comma-separated
  concepts), ``sd_seed``, ``sd_guidance_scale`` and ``negative_prompt``; other columns (I2P's ``hard``,
  ``inappropriate_percentage``, ...) are ignored. An empty (or ``nan``) seed or guidance cell becomes -1 ("not
  given"; counted as ``missing_seed`` / ``missing_guidance``). An empty prompt is an error naming the line.
* ``.txt``: one prompt per line (surrounding whitespace removed), blank lines skipped; seed -1, guidance -1,
  no categories.

``source_id`` is ``<file name>:<line>``. Records keep the file's order.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Tuple

from sc_dpo_jax.data.builders._base import (LocalBuilder, SourceError, csv_rows, parse_float, parse_int, parse_text,
                                            resolve_file)
from sc_dpo_jax.data.schema import RecordSpec, prompt_spec

SUFFIXES = (".csv", ".txt")
SEED, GUIDANCE, CATEGORIES, NEGATIVE = "sd_seed", "sd_guidance_scale", "categories", "negative_prompt"


def _optional(row: Dict[str, str], key: str, parse, where: str, stats: Dict[str, Any], stat: str):
  value = row.get(key)
  if value is None or not value.strip() or value.strip().lower() == "nan":
    stats[stat] += 1
    return parse("-1", where, key)
  return parse(value, where, key)


def read_prompts(path: str, spec: RecordSpec, stats: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
  """``(key, record)`` for each prompt of the ``.csv`` or ``.txt`` file at ``path``; counts into ``stats``."""
  base = os.path.basename(path)
  stats.update(file=path, prompts_written=0)
  if path.lower().endswith(".txt"):
    stats["blank_lines_skipped"] = 0
    with open(path, encoding="utf-8-sig") as f:
      for line, text in enumerate(f, start=1):
        prompt = text.strip()
        if not prompt:
          stats["blank_lines_skipped"] += 1
          continue
        record = {"prompt": prompt, "negative_prompt": "", "seed": -1, "guidance": -1.0, "categories": "",
                  "source_id": f"{base}:{line}"}
        stats["prompts_written"] += 1
        yield f"{base}:{line}", spec.check_record(record, where=f"{path}:{line}")
  elif path.lower().endswith(".csv"):
    stats.update(missing_seed=0, missing_guidance=0)
    for line, row in csv_rows(path, required=("prompt",)):
      where = f"{path}:{line}"
      prompt = parse_text(row["prompt"], where, "prompt", allow_empty=False)
      record = {
          "prompt": prompt,
          "negative_prompt": row.get(NEGATIVE, ""),
          "seed": _optional(row, SEED, parse_int, where, stats, "missing_seed"),
          "guidance": _optional(row, GUIDANCE, parse_float, where, stats, "missing_guidance"),
          "categories": row.get(CATEGORIES, "").strip(),
          "source_id": f"{base}:{line}",
      }
      stats["prompts_written"] += 1
      yield f"{base}:{line}", spec.check_record(record, where=where)
  else:
    raise SourceError(f"{path}: a prompt list must be .csv or .txt")
  if not stats["prompts_written"]:
    raise SourceError(f"{path}: no prompts")


class Prompts(LocalBuilder, skip_registration=True):
  """Prompts (with I2P's categories, seeds and guidance scales when given) from a CSV or a text list."""
  name = "prompts"
  DESCRIPTION = __doc__
  KEEP_ORDER = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put one prompt file in a folder, an I2P-style CSV (columns prompt and optionally categories, sd_seed,
  sd_guidance_scale, negative_prompt) or a .txt list with one prompt per line, and pass the folder as --source
  (or the file itself as --source=<folder>/<file>)."""

  def record_spec(self) -> RecordSpec:
    return prompt_spec()

  @classmethod
  def detect_config(cls, manual_dir: str, file: Optional[str] = None) -> Optional[str]:
    resolve_file(manual_dir, file, SUFFIXES, "prompt")  # fail early, before TFDS creates folders
    return None

  def _generate_examples(self, manual_dir: str):
    self.stats = {}
    yield from read_prompts(resolve_file(manual_dir, self.input_file, SUFFIXES, "prompt"), self.record_spec(),
                            self.stats)
