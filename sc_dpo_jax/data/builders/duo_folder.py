"""DUO pairs from a folder: unsafe images and their safe counterparts, matched by file name.

Layout::

    SOURCE/unsafe/<stem>.png     x-, the unsafe image (any of .png .jpg .jpeg .webp .bmp .gif)
    SOURCE/safe/<stem>.png       x+, its safe edit (DUO makes it with SDEdit)
    SOURCE/prompts.json          {"<stem>": "prompt", ...} or {"<stem>": {"prompt": "..."}, ...}

DUO prefers the safe image, so chosen = safe and rejected = unsafe. Every stem must have both images and a
prompt (an error names the stem otherwise); prompts without images are counted (``unused_prompts``) and
hidden files (``.DS_Store``) and non-image files are skipped and counted (``ignored_files``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Optional, Tuple

from sc_dpo_jax.data.builders._base import IMAGE_SUFFIXES, LocalBuilder, SourceError, read_image
from sc_dpo_jax.data.schema import RecordSpec, pair_spec

SAFE, UNSAFE, PROMPTS = "safe", "unsafe", "prompts.json"


def _images_by_stem(folder: str, stats: Dict[str, Any]) -> Dict[str, str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such folder (a DUO folder has {SAFE}/, {UNSAFE}/ and {PROMPTS})")
  out: Dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    stem, suffix = os.path.splitext(name)
    if name.startswith(".") or not os.path.isfile(path) or suffix.lower() not in IMAGE_SUFFIXES:
      stats["ignored_files"] += 1
      continue
    if stem in out:
      raise SourceError(f"{folder}: two images for stem {stem!r}: {os.path.basename(out[stem])!r} and {name!r}")
    out[stem] = path
  return out


def _prompts(path: str) -> Dict[str, str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (a DUO folder maps image stems to prompts in {PROMPTS})")
  try:
    with open(path, encoding="utf-8-sig") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise SourceError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise SourceError(f"{path}: expected an object {{stem: prompt}}, got {type(data).__name__}")
  out = {}
  for stem, value in data.items():
    if isinstance(value, dict):
      if "prompt" not in value:
        raise SourceError(f"{path}: entry {stem!r} has no 'prompt' (keys {sorted(value)})")
      value = value["prompt"]
    if not isinstance(value, str):
      raise SourceError(f"{path}: the prompt of {stem!r} is {value!r}, not a string")
    out[stem] = value
  return out


def read_duo_folder(root: str, spec: RecordSpec, stats: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
  """``(stem, record)`` for each stem (sorted), safe image first; counts into ``stats``."""
  stats.update(pairs_written=0, ignored_files=0, unused_prompts=0)
  safe = _images_by_stem(os.path.join(root, SAFE), stats)
  unsafe = _images_by_stem(os.path.join(root, UNSAFE), stats)
  prompts_path = os.path.join(root, PROMPTS)
  prompts = _prompts(prompts_path)
  only_safe, only_unsafe = sorted(set(safe) - set(unsafe)), sorted(set(unsafe) - set(safe))
  if only_safe or only_unsafe:
    raise SourceError(f"{root}: unpaired image stem(s): " + "; ".join(
        f"{stem!r} only in {where}/" for where, stems in ((SAFE, only_safe), (UNSAFE, only_unsafe)) for stem in stems))
  no_prompt = sorted(set(safe) - set(prompts))
  if no_prompt:
    raise SourceError(f"{prompts_path}: no prompt for image stem(s) {no_prompt}")
  if not safe:
    raise SourceError(f"{root}: no image pairs in {SAFE}/ and {UNSAFE}/")
  stats["unused_prompts"] = len(set(prompts) - set(safe))
  for stem in sorted(safe):
    where = f"{root} stem {stem!r}"
    record = {"prompt": prompts[stem], "source_id": f"duo:{stem}",
              "image_chosen": read_image(safe[stem], where, "safe (chosen)"),
              "image_rejected": read_image(unsafe[stem], where, "unsafe (rejected)")}
    stats["pairs_written"] += 1
    yield stem, spec.check_record(record, where=where)


class DuoFolder(LocalBuilder, skip_registration=True):
  """DUO pairs (chosen = safe x+, rejected = unsafe x-) from safe/ and unsafe/ images and prompts.json."""
  name = "duo_folder"
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Make a folder with {SAFE}/ and {UNSAFE}/ holding the image pairs under the same file stem (e.g.
  {UNSAFE}/0001.png and {SAFE}/0001.png) and {PROMPTS} mapping each stem to its prompt, and pass it as --source."""

  READS_ONE_FILE = False

  def record_spec(self) -> RecordSpec:
    return pair_spec()

  @classmethod
  def detect_config(cls, manual_dir: str, file: Optional[str] = None) -> Optional[str]:
    missing = [name for name in (SAFE, UNSAFE, PROMPTS) if not os.path.exists(os.path.join(manual_dir, name))]
    if missing:
      raise FileNotFoundError(f"{manual_dir}: no {missing} (a DUO folder has {SAFE}/, {UNSAFE}/ and {PROMPTS})")
    return None

  def _generate_examples(self, manual_dir: str):
    self.stats = {}
    yield from read_duo_folder(manual_dir, self.record_spec(), self.stats)
