"""The evaluation report: ``report.json``, ``report.md`` (tables) and ``grid_<set>.png`` (the worst cases).

    paths = write_report(out_dir, result, records, blur=True, grid_size=8)

``result`` is what ``run.evaluate`` returns (settings, notes, per-set / per-category / overall metrics from
``summary``); ``records`` the per-image records. The grids show, per prompt set, the ``grid_size`` images of the
model with the highest detector score (ties: file order), the base model's image of the same prompt and seed
below each when there is a base. The detector's detections are **pixelated** in the grids (``blur=False``:
left as they are): each box is replaced by blocks of its mean colour, at most 8 blocks along its longer side.
The saved images under ``images/`` stay untouched (every number can be recomputed from them). Images smaller
than 64 pixels are enlarged (nearest neighbour) so the grid is readable. ``out_dir`` is read and written through
``etils.epath``: a local folder (relative or absolute) or a remote one (``gs://bucket/eval``).
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from etils import epath

from sc_dpo_jax import images as images_lib

PathLike = Union[str, os.PathLike]

MIN_CELL = 64            # grid cells are enlarged to at least this many pixels
BLOCKS = 8               # pixelation: at most this many blocks along a box's longer side
PROMPT_CHARS = 90        # prompts are cut to this length in the markdown


def pixelate(image: np.ndarray, boxes: Sequence[Sequence[int]]) -> np.ndarray:
  """A copy of uint8 ``[H, W, 3]`` ``image`` with each box ``[x, y, w, h]`` (clipped to the image) replaced by
  blocks of its mean colour, at most ``BLOCKS`` along the box's longer side."""
  out = np.array(image, np.uint8, copy=True)
  height, width = out.shape[:2]
  for box in boxes:
    x, y, w, h = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
      continue
    block = max(2, math.ceil(max(x1 - x0, y1 - y0) / BLOCKS))
    for by in range(y0, y1, block):
      for bx in range(x0, x1, block):
        cell = out[by:min(by + block, y1), bx:min(bx + block, x1)]
        cell[...] = np.round(cell.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
  return out


def _load(out_dir: PathLike, relative: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO((epath.Path(out_dir) / relative).read_bytes())) as im:
    return np.asarray(im.convert("RGB"))


def worst(records: Sequence[Mapping[str, Any]], set_name: str, k: int) -> List[Mapping[str, Any]]:
  """The ``k`` records of ``set_name`` with the highest model detector score (ties: file order)."""
  rows = [r for r in records if r["set"] == set_name]
  order = sorted(range(len(rows)), key=lambda i: (-rows[i]["model"]["score"], rows[i]["image"]))
  return [rows[i] for i in order[:k]]


def grid(out_dir: PathLike, picks: Sequence[Mapping[str, Any]], *, blur: bool = True) -> np.ndarray:
  """One row of the picked model images (and a row of the base's below when the records have them)."""
  rows = []
  for who in ("model", "base"):
    if not picks or who not in picks[0]:
      continue
    for r in picks:
      image = _load(out_dir, r[who]["path"])
      if blur:
        image = pixelate(image, [d["box"] for d in r[who]["detections"]])
      rows.append(image)
  images = np.stack(rows)
  scale = max(1, math.ceil(MIN_CELL / min(images.shape[1:3])))
  if scale > 1:
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
  return images_lib.make_grid(images, columns=len(picks))


def _fmt(value: Optional[float], digits: int = 3) -> str:
  if value is None:
    return "-"
  if math.isinf(value):
    return "inf"
  return f"{value:.{digits}f}"


def _columns(result: Mapping[str, Any]):
  """(header, getter) pairs of the table, by what the run measured."""
  has_base, has_clip = result["settings"]["base"] is not None, result["settings"]["clip"] is not None
  cols = [("prompts", lambda g: str(g["prompts"])), ("images", lambda g: str(g["images"])),
          ("nudity rate", lambda g: _fmt(g["model"]["nudity_rate"])),
          ("DSR", lambda g: _fmt(g["model"]["defense_success_rate"])),
          ("mean score", lambda g: _fmt(g["model"]["mean_score"]))]
  if has_clip:
    cols.append(("CLIP score", lambda g: _fmt(g["model"]["clip_score"])))
  if has_base:
    cols += [("base nudity rate", lambda g: _fmt(g["base"]["nudity_rate"])),
             ("base DSR", lambda g: _fmt(g["base"]["defense_success_rate"])),
             ("base mean score", lambda g: _fmt(g["base"]["mean_score"]))]
    if has_clip:
      cols.append(("base CLIP score", lambda g: _fmt(g["base"]["clip_score"])))
    cols += [("PSNR (dB)", lambda g: _fmt(g["preservation"]["psnr"], 2)),
             ("SSIM", lambda g: _fmt(g["preservation"]["ssim"]))]
    if has_clip:
      cols.append(("CLIP-image cos", lambda g: _fmt(g["preservation"]["clip_image_cosine"])))
  return cols


def _table(first: str, groups: Mapping[str, Mapping[str, Any]], cols) -> List[str]:
  lines = ["| " + " | ".join([first] + [h for h, _ in cols]) + " |", "|" + "---|" * (len(cols) + 1)]
  for name, g in groups.items():
    lines.append("| " + " | ".join([name] + [get(g) for _, get in cols]) + " |")
  return lines


def _resumed(result: Mapping[str, Any]) -> str:
  n = result.get("resumed_images", 0)
  if not n:
    return ""
  if n == result["all"]["images"]:
    return " (every image from an earlier run of this evaluation: only the report was written again)"
  return f" ({n} of the images from an earlier, interrupted run of this evaluation, not included in the time)"


def markdown(result: Mapping[str, Any], grids: Mapping[str, str], picks: Mapping[str, Sequence[Mapping[str, Any]]],
             blur: bool) -> str:
  """The report as markdown (settings, notes, the per-set and per-category tables, the worst cases)."""
  s = result["settings"]
  cols = _columns(result)
  lines = [f"# Evaluation of `{s['model']}`", ""]
  lines += [f"- base: `{s['base']}`" if s["base"] else "- base: none (no prior preservation)",
            f"- detector: {s['detector_description']}",
            f"- CLIP: `{s['clip']}`" if s["clip"] else "- CLIP: none (CLIP scores skipped)",
            f"- sampling: DDIM {s['steps']} steps, eta {s['eta']:g}, guidance {s['guidance']:g} unless the prompt "
            f"file gives one, {s['num_images']} image(s) per prompt, {s['height']}x{s['width']}, seed {s['seed']} "
            "unless the prompt file gives one",
            f"- images: {result['all']['images']} per model; records: `records.jsonl`; "
            f"time: {result['seconds']:.0f} s" + _resumed(result), ""]
  lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
  lines += ["## Prompt sets", ""] + _table("set", dict(result["sets"], **{"all": result["all"]}), cols) + [""]
  if result["categories"]:
    flat = {f"{name} / {cat}": g for name, cats in result["categories"].items() for cat, g in cats.items()}
    lines += ["## Categories", ""] + _table("set / category", flat, cols) + [""]
  lines += ["## Worst cases", "",
            "Highest detector score first" + (" (model above, base below)" if s["base"] else "") + "; detections "
            + ("pixelated." if blur else "NOT blurred (--no_blur)."), ""]
  for name, path in grids.items():
    lines += [f"### {name}", "", f"![{name}]({path})", ""]
    for i, r in enumerate(picks[name], start=1):
      text = r["prompt"] if len(r["prompt"]) <= PROMPT_CHARS else r["prompt"][:PROMPT_CHARS - 3] + "..."
      base = f", base {r['base']['score']:.3f}" if "base" in r else ""
      lines.append(f"{i}. score {r['model']['score']:.3f}{base} (seed {r['seed']}, image {r['image']}): {text}")
    lines.append("")
  return "\n".join(lines).rstrip("\n") + "\n"


def write_report(out_dir: PathLike, result: Dict[str, Any], records: Sequence[Mapping[str, Any]], *,
                 blur: bool = True, grid_size: int = 8) -> Dict[str, str]:
  """Writes ``report.json``, ``report.md`` and one ``grid_<set>.png`` per set into ``out_dir`` (any ``epath``
  folder); returns their paths (strings: ``out_dir`` joined with the file name)."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  grids, picks = {}, {}
  for name in result["sets"]:
    picks[name] = worst(records, name, grid_size)
    if picks[name]:
      grids[name] = f"grid_{name}.png"
      (out / grids[name]).write_bytes(images_lib.encode_png(grid(out, picks[name], blur=blur)))
  result["grids"] = dict(grids)
  paths = {"json": os.fspath(out / "report.json"), "markdown": os.fspath(out / "report.md")}
  (out / "report.json").write_text(json.dumps(result, indent=2))
  (out / "report.md").write_text(markdown(result, grids, picks, blur))
  paths.update({f"grid_{k}": os.fspath(out / v) for k, v in grids.items()})
  return paths
