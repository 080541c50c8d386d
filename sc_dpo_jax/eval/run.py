"""``evaluate``: generate every prompt set with the model (and the base), score each image, write the report.

    result = evaluate("out/aligned", ["data/i2p_benchmark.csv", "ringabell=attacks/ring_a_bell.txt"],
                      base="models/sd15", out_dir="workdir/eval", detector="nudenet", clip="models/clip-vit-l14")

**Noise.** Every image is defined by a seed and a noise index: its initial latents are
``normal(fold_in(PRNGKey(seed), index))``, exactly those of image ``index`` of ``pipe.generate(..., seed=seed)``.
A prompt row with its own seed (I2P's ``sd_seed``) uses ``seed = sd_seed`` and ``index = j`` for its ``j``-th
image, so ``pipe.generate([prompt] * n, seed=sd_seed, guidance=sd_guidance_scale)`` reproduces its images. A row
without one uses ``seed = --seed`` and ``index = row * num_images + j``, so a whole plain list reproduces as
``python -m sc_dpo_jax.generate`` makes it. (I2P's seeds were drawn for PyTorch's generator: the same seed gives
other noise here, but the same noise for every model evaluated here.) The latents are computed per image and
passed to the pipeline, so an image does not depend on which other prompts share its batch; images are
generated in batches of exactly ``batch_size`` (the last one padded) so one program serves every batch.
Images with the same guidance scale are batched together (the scale is one number per batch), per-prompt
guidance is honoured. The base model gets the same prompts, latents and batches as the model. With ``eta > 0``
the DDIM step noise is drawn per batch, so images then depend on their batch (but stay identical between
model and base).

**Outputs** (``out_dir``, a local folder or any ``etils.epath`` one such as ``gs://bucket/eval``):
``images/model/<set>/NNNN.png`` (and ``images/base/...``), the raw images, ``NNNN`` the image's number in its
set (``row * num_images + j``); ``records.jsonl``, one line per image (set, row, file line, prompt, negative
prompt, categories, seed, noise index, guidance, and per model its image path, flag, detector score,
detections and CLIP score, plus the preservation metrics against the base); ``manifest.json``, the settings
that define the images (written before the first image); and the report (``report``): ``report.json``,
``report.md``, ``grid_<set>.png``. Every reported number is a mean of the records' values (``summary``), and
every record value can be recomputed from the saved PNGs (lossless).

**Resume.** Records are written as the run goes: once a batch's images are written, its records are appended
to ``records.jsonl`` and flushed (in a remote folder, which cannot append, the file is rewritten whole after each
batch), so a killed run loses at most the batch in flight. Run again with the same ``out_dir`` and settings, the
evaluation continues: it logs ``resuming: N of M images done``, skips every batch whose records all exist and
generates the others again, whole (so every image comes from the same batch as in an uninterrupted run); a
partially written last line (killed mid-write) is dropped and its image generated again. At the end
``records.jsonl`` is rewritten in plan order (set and file order), so records and report equal those of an
uninterrupted run, except the timings: ``seconds`` and ``generation_seconds`` count this run only, and
``resumed_images`` says how many images an earlier run made. A finished evaluation is not generated again: run
again, it writes the report from its records (``blur`` and ``grid_size`` may change) without loading a model.
The settings compared with ``manifest.json`` are those listed by ``manifest_settings`` (the model and base
paths, each prompt set's content, detector, CLIP, sampling and batching); another value is refused with an
error naming the setting, its old and new value. ``overwrite=True`` (``--overwrite``) deletes an earlier
evaluation and starts over; an ``out_dir`` holding outputs but no manifest (a run from before resume existed)
is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from absl import logging
from etils import epath
from tqdm import tqdm

from sc_dpo_jax import images as images_lib
from sc_dpo_jax import paths
from sc_dpo_jax.eval import metrics as metrics_lib
from sc_dpo_jax.eval import prompts as prompts_lib
from sc_dpo_jax.eval import report as report_lib
from sc_dpo_jax.eval import summary as summary_lib
from sc_dpo_jax.eval.detect import EvalDetector
from sc_dpo_jax.models import pipeline as pipeline_lib

FORMAT = "sc_dpo_jax.eval/1"
RECORDS = "records.jsonl"
MANIFEST = "manifest.json"
IMAGES = "images"
OUTPUTS = (IMAGES, RECORDS, MANIFEST, "report.json", "report.md")
TMP = ".tmp"             # suffix of a file being replaced (local folders: written aside, then renamed)
PathLike = Union[str, os.PathLike]
Key = Tuple[str, int]    # one image of the plan: (set, image number in the set)


class OutDirError(FileExistsError):
  """``out_dir`` holds an evaluation this run cannot continue; the message names the file or setting and the fix
  (the same settings, another ``--out``, or ``--overwrite``)."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to generate: which prompt, with which noise and guidance."""
  set: str
  row: int                # index of the prompt in its set
  image: int              # number of the image in its set: row * num_images + j
  prompt: prompts_lib.PromptRow
  negative_prompt: str
  seed: int
  noise_index: int
  guidance: float


def plan(prompt_sets: Sequence[prompts_lib.PromptSet], *, num_images: int, seed: int, guidance: float,
         negative_prompt: Optional[str]) -> List[Item]:
  """Every image of every set, in set and file order (seeds and guidance as the module docstring says)."""
  items = []
  for s in prompt_sets:
    for k, row in enumerate(s.rows):
      for j in range(num_images):
        own = row.seed is not None
        items.append(Item(set=s.name, row=k, image=k * num_images + j, prompt=row,
                          negative_prompt=row.negative_prompt if row.negative_prompt is not None else
                          (negative_prompt or ""),
                          seed=row.seed if own else seed, noise_index=j if own else k * num_images + j,
                          guidance=row.guidance if row.guidance is not None else guidance))
  return items


def batches(items: Sequence[Item], batch_size: int) -> List[List[Item]]:
  """``items`` in batches of at most ``batch_size`` with one guidance scale each (groups in order of first
  appearance, file order inside a group)."""
  groups: Dict[float, List[Item]] = {}
  for it in items:
    groups.setdefault(it.guidance, []).append(it)
  return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def _load(model, *, dtype: str, attention: str):
  if not isinstance(model, str):
    return model
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  return models.load_pipeline(model, dtype=jnp.dtype(dtype), attention=attention)


def latent_shape(pipe, height: Optional[int], width: Optional[int]):
  """``(h, w, C)`` of the latents of ``height`` x ``width`` images (default: the model's size)."""
  height, width = height or pipe.default_size, width or pipe.default_size
  f = pipe.vae_scale_factor
  if height % f or width % f:
    raise ValueError(f"--height/--width must be multiples of {f}, got {height}x{width}")
  return (height // f, width // f, int(pipe.unet.config.in_channels)), (height, width)


def _name(model) -> str:
  return model if isinstance(model, str) else f"<{type(model).__name__} object>"


def _local(path: PathLike) -> bool:
  return not paths.is_uri(path)


def _where(model) -> Optional[str]:
  """How a model (or CLIP) is compared between runs: a local path made absolute, a remote one as given, a loaded
  object by its type (the manifest cannot tell two loaded models apart)."""
  if model is None or not isinstance(model, (str, os.PathLike)):
    return None if model is None else _name(model)
  path = os.fspath(model)
  return os.path.abspath(path) if _local(path) else path


def fingerprint(prompt_set: prompts_lib.PromptSet) -> str:
  """``"<n> prompts, sha256 <16 hex digits>"`` of the set's rows (text, line, categories, seed, guidance, negative
  prompt): the manifest compares prompt sets by content, not by path."""
  h = hashlib.sha256()
  for row in prompt_set.rows:
    h.update(json.dumps(dataclasses.asdict(row), sort_keys=True).encode() + b"\n")
  return f"{len(prompt_set.rows)} prompts, sha256 {h.hexdigest()[:16]}"


def manifest_settings(model, prompt_sets: Sequence[prompts_lib.PromptSet], *, base, detector: str,
                      clip: Optional[str], steps: int, guidance: float, seed: int, eta: float, num_images: int,
                      batch_size: int, height: Optional[int], width: Optional[int], negative_prompt: Optional[str],
                      limit: Optional[int], dtype: str, attention: str) -> Dict[str, Any]:
  """The settings that define an evaluation's images and records, as ``manifest.json`` stores them: a resumed run
  must have the same (``blur``, ``grid_size`` and ``progress`` only change the report or the console)."""
  settings = {"model": _where(model), "base": _where(base), "prompt_sets": [s.name for s in prompt_sets]}
  settings.update({f"prompts/{s.name}": fingerprint(s) for s in prompt_sets})
  settings.update(detector=detector, clip=_where(clip), steps=steps, guidance=guidance, seed=seed, eta=eta,
                  num_images=num_images, batch_size=batch_size, height=height, width=width,
                  negative_prompt=negative_prompt, limit=limit, dtype=dtype, attention=attention)
  return json.loads(json.dumps(settings))          # as read back from the file


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  missing = object()
  keys = list(new) + [k for k in old if k not in new]
  return [f"{k} was {json.dumps(old[k]) if k in old else '(absent)'}, now "
          f"{json.dumps(new[k]) if k in new else '(absent)'}"
          for k in keys if old.get(k, missing) != new.get(k, missing)]


def _write_text(path: epath.Path, text: str) -> None:
  """Replaces ``path``'s content so that a kill never leaves half of it: locally written aside and renamed; in an
  object store (``gs://``) an object is replaced whole anyway."""
  if _local(path):
    tmp = path.with_name(path.name + TMP)
    tmp.write_text(text)
    tmp.replace(path)
  else:
    path.write_text(text)


def _open_out_dir(out: epath.Path, settings: Dict[str, Any], overwrite: bool) -> Optional[Dict[str, Any]]:
  """The manifest of the evaluation in ``out`` when it has ``settings`` (to be resumed); ``None`` when ``out`` holds
  no evaluation (after ``overwrite`` deleted one). Raises ``OutDirError`` for another evaluation."""
  exists = out.exists()
  grids = sorted(f.name for f in out.iterdir() if f.name.startswith("grid_") and f.name.endswith(".png")
                 ) if exists and out.is_dir() else []
  taken = [p for p in OUTPUTS if exists and (out / p).exists()] + grids
  if overwrite:
    # The manifest first: a kill while deleting leaves outputs without one, which are refused, never resumed.
    for name in sorted(taken, key=lambda p: p != MANIFEST) + [RECORDS + TMP, MANIFEST + TMP]:
      path = out / name
      if path.is_dir():
        path.rmtree()
      elif path.exists():
        path.unlink()
    return None
  manifest_path = out / MANIFEST
  fix = "choose another --out, or pass --overwrite (overwrite=True) to delete it and start over"
  if MANIFEST in taken:
    try:
      manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
      raise OutDirError(f"{manifest_path} is not valid JSON ({e}), so the evaluation in {out} cannot be resumed; "
                        f"{fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise OutDirError(f"{manifest_path} is not a {FORMAT} manifest, so the evaluation in {out} cannot be "
                        f"resumed; {fix}")
    diffs = _differences(manifest.get("settings", {}), settings)
    if diffs:
      raise OutDirError(f"{out} already holds an evaluation with other settings ({MANIFEST}): {'; '.join(diffs)}. "
                        f"To continue it, run with its settings; otherwise {fix}")
    return manifest
  if taken:
    raise OutDirError(f"{out} already holds an evaluation ({', '.join(taken)}) without {MANIFEST} (made before "
                      f"evaluations could resume, or not by this command), so it cannot be resumed; {fix}")
  return None


def _head(it: Item) -> Dict[str, Any]:
  """What a record says about its image before any model made it."""
  return {"set": it.set, "row": it.row, "line": it.prompt.line, "image": it.image, "prompt": it.prompt.text,
          "negative_prompt": it.negative_prompt, "categories": list(it.prompt.categories), "seed": it.seed,
          "noise_index": it.noise_index, "guidance": it.guidance}


def read_records(path: PathLike, items: Dict[Key, Item]) -> Dict[Key, Dict[str, Any]]:
  """The records of an earlier run in ``path`` (``records.jsonl``, any order) by ``(set, image)``, checked against
  the plan ``items``. A partial last line (the run was killed while writing it: the text after the last newline)
  is dropped, from the file too, so its image is generated again; any other unreadable line raises
  ``OutDirError`` naming the line."""
  path = epath.Path(path)
  if not path.exists():
    return {}
  body, _, partial = path.read_text().rpartition("\n")
  if partial:
    logging.warning("%s: dropped its partial last line (%d characters: the run was stopped while writing it); that "
                    "image is generated again", path, len(partial))
    _write_text(path, body + "\n" if body else "")
  fix = "pass --overwrite (overwrite=True) to start over, or choose another --out"
  records: Dict[Key, Dict[str, Any]] = {}
  for number, line in enumerate(body.split("\n") if body else [], start=1):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise OutDirError(f"{path}:{number}: not a JSON record ({e}); {fix}") from None
    key = (rec.get("set"), rec.get("image")) if isinstance(rec, dict) else None
    item = items.get(key)
    if item is None or any(rec.get(k) != v for k, v in _head(item).items()):
      raise OutDirError(f"{path}:{number}: not the record of an image of this evaluation (set {key and key[0]!r}, "
                        f"image {key and key[1]}: another prompt, seed or guidance); {fix}")
    if key in records:
      raise OutDirError(f"{path}:{number}: a second record of set {key[0]!r} image {key[1]}; {fix}")
    records[key] = rec
  return records


class _RecordsFile:
  """``records.jsonl`` while the run writes it: each batch's lines appended and flushed (a local folder) or the
  whole file written again (an object store cannot append; an object is replaced whole)."""

  def __init__(self, path: epath.Path, records: Sequence[Dict[str, Any]]):
    self.path, self.lines = path, [json.dumps(r) + "\n" for r in records]

  def add(self, records: Sequence[Dict[str, Any]]) -> None:
    lines = [json.dumps(r) + "\n" for r in records]
    self.lines += lines
    if _local(self.path):
      with self.path.open("a") as f:
        f.write("".join(lines))
        f.flush()
    else:
      self.path.write_text("".join(self.lines))


def evaluate(model, prompt_sets: Sequence[Union[str, prompts_lib.PromptSet]], *, out_dir: PathLike,
             base=None, detector: str = "nudenet", clip: Optional[str] = None, steps: int = 50,
             guidance: float = 7.5, seed: int = 0, eta: float = 0.0, num_images: int = 1, batch_size: int = 8,
             height: Optional[int] = None, width: Optional[int] = None, negative_prompt: Optional[str] = None,
             limit: Optional[int] = None, prompt_column: str = "prompt", blur: bool = True, grid_size: int = 8,
             dtype: str = "float32", attention: str = "reference", overwrite: bool = False,
             progress: bool = True, on_batch: Optional[Callable[[int, int], None]] = None,
             safety=None, projection=None) -> Dict[str, Any]:
  """Evaluates ``model`` (a diffusers folder or a loaded ``models.StableDiffusion``) on ``prompt_sets`` (specs
  ``path`` / ``name=path``, or ``PromptSet``s), against ``base`` when given; writes ``out_dir`` (any ``epath``
  folder; module docstring), resuming an unfinished evaluation of the same settings there, and returns the
  report's content (``report.json``), with ``paths`` of the written report. ``on_batch(done, total)`` is called
  after each generated batch's records are written (images done so far, images in the plan); an exception it
  raises stops the run there, as a kill would. ``safety`` (Safe Latent Diffusion: a preset name or an
  ``SLDConfig``) and ``projection`` (a SAFREE-style ``ProjectionConfig``) are training-free defences of
  ``pipe.generate``, applied to the model (not to the base, which stays the undefended reference)."""
  start = time.time()
  if num_images < 1 or batch_size < 1 or grid_size < 1:
    raise ValueError(f"num_images ({num_images}), batch_size ({batch_size}) and grid_size ({grid_size}) must be "
                     ">= 1")
  if steps < 1 or guidance < 0 or eta < 0:
    raise ValueError(f"steps ({steps}) must be >= 1, guidance ({guidance}) and eta ({eta}) >= 0")
  # Everything that can fail cheaply fails before a model is loaded.
  sets = [s.limit(limit) if isinstance(s, prompts_lib.PromptSet) else s for s in prompt_sets]
  specs = [s for s in sets if isinstance(s, str)]
  read = iter(prompts_lib.read_prompt_sets(specs, column=prompt_column, limit=limit) if specs else [])
  sets = [next(read) if isinstance(s, str) else s for s in sets]
  names = [s.name for s in sets]
  if len(set(names)) != len(names) or not names:
    raise ValueError(f"prompt sets {names}: give at least one, each with its own name")
  from sc_dpo_jax.diffusion import safe_guidance  # pylint: disable=g-import-not-at-top
  safety = safe_guidance.resolve(safety)
  if safety is not None and not guidance > 1.0:
    raise ValueError(f"safety (SLD) acts through classifier-free guidance: it needs guidance > 1, got {guidance}")
  defence = {k: dataclasses.asdict(v) for k, v in (("safety", safety), ("projection", projection)) if v is not None}
  judge = EvalDetector(detector)
  items = plan(sets, num_images=num_images, seed=seed, guidance=guidance, negative_prompt=negative_prompt)
  by_key = {(it.set, it.image): it for it in items}
  settings = manifest_settings(model, sets, base=base, detector=detector, clip=clip, steps=steps, guidance=guidance,
                               seed=seed, eta=eta, num_images=num_images, batch_size=batch_size, height=height,
                               width=width, negative_prompt=negative_prompt, limit=limit, dtype=dtype,
                               attention=attention)
  if defence:
    settings["defence"] = json.loads(json.dumps(defence))
  out = epath.Path(out_dir)
  earlier = _open_out_dir(out, settings, overwrite)
  records = read_records(out / RECORDS, by_key) if earlier is not None else {}
  resumed = len(records)
  complete = earlier is not None and resumed == len(items)
  if complete:
    logging.info("complete: all %d images of the evaluation in %s are done; writing its report again", len(items),
                 out)
  elif earlier is not None:
    logging.info("resuming: %d of %d images done (%s)", resumed, len(items), out / RECORDS)

  pipe = base_pipe = clip_model = None
  if complete:
    height, width = earlier["image_size"]
  else:
    pipe = _load(model, dtype=dtype, attention=attention)
    base_pipe = _load(base, dtype=dtype, attention=attention) if base is not None else None
    shape, (height, width) = latent_shape(pipe, height, width)
    if base_pipe is not None:
      base_shape, _ = latent_shape(base_pipe, height, width)
      if base_shape != shape:
        raise ValueError(f"the base model's latents for {height}x{width} images are {base_shape}, the model's "
                         f"{shape}: they cannot start from the same noise")
    clip_model = metrics_lib.Clip(clip, attention=attention) if clip else None
    if earlier is None:
      out.mkdir(parents=True, exist_ok=True)
      manifest = {"format": FORMAT, "settings": settings, "images": len(items), "image_size": [height, width],
                  "prompt_files": {s.name: s.path for s in sets}}
      _write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    elif earlier.get("image_size") != [height, width]:
      raise OutDirError(f"{out / MANIFEST}: image_size was {earlier.get('image_size')}, the model now makes "
                        f"{[height, width]} (its folder changed?); choose another --out, or pass --overwrite "
                        "(overwrite=True) to delete it and start over")

  records_file = _RecordsFile(out / RECORDS, list(records.values()))
  folders = set()
  bar = tqdm(total=len(items), initial=resumed, desc="eval", unit="image", disable=not progress or complete)
  gen_seconds = 0.0
  for batch in batches(items, batch_size) if not complete else []:
    todo = [it for it in batch if (it.set, it.image) not in records]
    if not todo:
      continue        # done by an earlier run; a batch with some records is generated again, whole
    n = len(batch)
    padded = batch + [batch[-1]] * (batch_size - n)      # one program shape for every batch
    latents = pipeline_lib.initial_noise([it.seed for it in padded], [it.noise_index for it in padded], shape)
    kwargs = dict(steps=steps, guidance=batch[0].guidance, eta=eta, height=height, width=width,
                  negative_prompt=[it.negative_prompt for it in padded], batch_size=batch_size, progress=False)
    prompts = [it.prompt.text for it in padded]
    t0 = time.time()
    outs = {"model": pipe.generate(prompts, latents=latents, safety=safety, projection=projection, **kwargs)}
    if base_pipe is not None:
      outs["base"] = base_pipe.generate(prompts, latents=latents, **kwargs)
    gen_seconds += time.time() - t0
    scored = {}
    for who, imgs in outs.items():
      flags, scores, dets = judge(imgs[:n])
      clip_scores = clip_model.score(imgs, prompts)[:n] if clip_model else None
      scored[who] = (flags, scores, dets, clip_scores)
    if base_pipe is not None:
      a, b = outs["model"][:n], outs["base"][:n]
      pres = {"psnr": metrics_lib.psnr(a, b), "ssim": metrics_lib.ssim(a, b)}
      if clip_model:
        pres["clip_image_cosine"] = clip_model.image_cosine(outs["model"], outs["base"])[:n]
    new = []
    for m, it in enumerate(batch):
      if (it.set, it.image) in records:
        continue      # its image and record were written by the earlier run (the same values)
      rec = _head(it)
      for who, (flags, scores, dets, clip_scores) in scored.items():
        folder = f"{IMAGES}/{who}/{it.set}"
        if folder not in folders:
          (out / folder).mkdir(parents=True, exist_ok=True)
          folders.add(folder)
        path = f"{folder}/{it.image:04d}.png"
        (out / path).write_bytes(images_lib.encode_png(outs[who][m]))
        rec[who] = {"path": path, "flagged": bool(flags[m]), "score": float(scores[m]), "detections": dets[m]}
        if clip_scores is not None:
          rec[who]["clip_score"] = float(clip_scores[m])
      if base_pipe is not None:
        rec["preservation"] = {k: float(v[m]) for k, v in pres.items()}
      new.append(json.loads(json.dumps(rec)))      # as a resumed run reads it back
    records_file.add(new)                           # after the batch's images: a record implies its image
    records.update({(r["set"], r["image"]): r for r in new})
    bar.update(len(new))
    if on_batch is not None:
      on_batch(len(records), len(items))
  bar.close()
  ordered = [records[(it.set, it.image)] for it in items]
  _write_text(out / RECORDS, "".join(json.dumps(rec) + "\n" for rec in ordered))     # plan order

  by_set, by_category = summary_lib.summarize_sets(ordered, names)
  notes = ["nudity rate: the share of images the detector flags; DSR (defense success rate) = 1 - nudity rate, "
           "meaningful on unsafe prompt sets only; mean score: the mean detector score",
           "every number is a mean over images (records.jsonl holds each image's values; the PNGs under images/ "
           "are the raw, unblurred outputs)"]
  if not clip:
    notes.append("CLIP scores skipped: no --clip (a transformers CLIPModel folder) given")
  if base is None:
    notes.append("prior preservation not measured: no --base given")
  else:
    notes.append("prior preservation: PSNR, SSIM" + (" and CLIP-image cosine" if clip else "") + " between "
                 "the model's and the base's image of the same prompt and initial noise; PSNR is inf for "
                 "identical images")
  if eta > 0:
    notes.append(f"eta = {eta:g} > 0: the DDIM step noise is drawn per batch, so images depend on their batch")
  result = {
      "format": FORMAT,
      "settings": {"model": _name(model), "base": _name(base) if base is not None else None, "detector": detector,
                   "detector_description": judge.description, "detector_threshold": judge.threshold,
                   "clip": clip, "steps": steps, "guidance": guidance, "seed": seed, "eta": eta,
                   "num_images": num_images, "batch_size": batch_size, "height": height, "width": width,
                   "negative_prompt": negative_prompt, "limit": limit, "dtype": dtype, "attention": attention,
                   "blur": blur, "prompt_sets": {s.name: s.path for s in sets}, "defence": defence or None},
      "notes": notes,
      "sets": by_set,
      "categories": by_category,
      "all": summary_lib.summarize(ordered),
      "records": RECORDS,
      "generation_seconds": gen_seconds,
      "resumed_images": resumed,
  }
  result["seconds"] = time.time() - start
  result["paths"] = report_lib.write_report(out, result, ordered, blur=blur, grid_size=grid_size)
  return result
