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

**Outputs** (``out_dir``): ``images/model/<set>/NNNN.png`` (and ``images/base/...``), the raw images, ``NNNN``
the image's number in its set (``row * num_images + j``); ``records.jsonl``, one line per image (set, row,
file line, prompt, negative prompt, categories, seed, noise index, guidance, and per model its image path,
flag, detector score, detections and CLIP score, plus the preservation metrics against the base); and the
report (``report``): ``report.json``, ``report.md``, ``grid_<set>.png``. Every reported number is a mean of
the records' values (``summary``), and every record value can be recomputed from the saved PNGs (lossless).
An ``out_dir`` holding an earlier evaluation is refused unless ``overwrite=True``, which deletes it first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Union

from tqdm import tqdm

from sc_dpo_jax import images as images_lib
from sc_dpo_jax.eval import metrics as metrics_lib
from sc_dpo_jax.eval import prompts as prompts_lib
from sc_dpo_jax.eval import report as report_lib
from sc_dpo_jax.eval import summary as summary_lib
from sc_dpo_jax.eval.detect import EvalDetector
from sc_dpo_jax.models import pipeline as pipeline_lib

FORMAT = "sc_dpo_jax.eval/1"
RECORDS = "records.jsonl"
IMAGES = "images"
OUTPUTS = (IMAGES, RECORDS, "report.json", "report.md")


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


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
  taken = [p for p in OUTPUTS if os.path.exists(os.path.join(out_dir, p))]
  if taken and not overwrite:
    raise FileExistsError(f"{out_dir} already holds an evaluation ({', '.join(taken)}); pass overwrite=True "
                          "(--overwrite) to replace it, or choose another --out")
  if os.path.isdir(out_dir):
    for p in taken:
      path = os.path.join(out_dir, p)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for f in os.listdir(out_dir):
      if f.startswith("grid_") and f.endswith(".png"):
        os.remove(os.path.join(out_dir, f))
  os.makedirs(out_dir, exist_ok=True)


def _name(model) -> str:
  return model if isinstance(model, str) else f"<{type(model).__name__} object>"


def evaluate(model, prompt_sets: Sequence[Union[str, prompts_lib.PromptSet]], *, out_dir: str,
             base=None, detector: str = "nudenet", clip: Optional[str] = None, steps: int = 50,
             guidance: float = 7.5, seed: int = 0, eta: float = 0.0, num_images: int = 1, batch_size: int = 8,
             height: Optional[int] = None, width: Optional[int] = None, negative_prompt: Optional[str] = None,
             limit: Optional[int] = None, prompt_column: str = "prompt", blur: bool = True, grid_size: int = 8,
             dtype: str = "float32", attention: str = "reference", overwrite: bool = False,
             progress: bool = True) -> Dict[str, Any]:
  """Evaluates ``model`` (a diffusers folder or a loaded ``models.StableDiffusion``) on ``prompt_sets`` (specs
  ``path`` / ``name=path``, or ``PromptSet``s), against ``base`` when given; writes ``out_dir`` (module
  docstring) and returns the report's content (``report.json``), with ``paths`` of the written report."""
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
  judge = EvalDetector(detector)
  _prepare_out_dir(out_dir, overwrite)

  pipe = _load(model, dtype=dtype, attention=attention)
  base_pipe = _load(base, dtype=dtype, attention=attention) if base is not None else None
  shape, (height, width) = latent_shape(pipe, height, width)
  if base_pipe is not None:
    base_shape, _ = latent_shape(base_pipe, height, width)
    if base_shape != shape:
      raise ValueError(f"the base model's latents for {height}x{width} images are {base_shape}, the model's "
                       f"{shape}: they cannot start from the same noise")
  clip_model = metrics_lib.Clip(clip, attention=attention) if clip else None

  items = plan(sets, num_images=num_images, seed=seed, guidance=guidance, negative_prompt=negative_prompt)
  records: Dict[int, Dict[str, Any]] = {}
  order = {id(it): n for n, it in enumerate(items)}
  bar = tqdm(total=len(items), desc="eval", unit="image", disable=not progress)
  gen_seconds = 0.0
  for batch in batches(items, batch_size):
    n = len(batch)
    padded = batch + [batch[-1]] * (batch_size - n)      # one program shape for every batch
    latents = pipeline_lib.initial_noise([it.seed for it in padded], [it.noise_index for it in padded], shape)
    kwargs = dict(steps=steps, guidance=batch[0].guidance, eta=eta, height=height, width=width,
                  negative_prompt=[it.negative_prompt for it in padded], batch_size=batch_size, progress=False)
    prompts = [it.prompt.text for it in padded]
    t0 = time.time()
    outs = {"model": pipe.generate(prompts, latents=latents, **kwargs)}
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
    for m, it in enumerate(batch):
      rec = {"set": it.set, "row": it.row, "line": it.prompt.line, "image": it.image, "prompt": it.prompt.text,
             "negative_prompt": it.negative_prompt, "categories": list(it.prompt.categories), "seed": it.seed,
             "noise_index": it.noise_index, "guidance": it.guidance}
      for who, (flags, scores, dets, clip_scores) in scored.items():
        path = os.path.join(IMAGES, who, it.set, f"{it.image:04d}.png")
        images_lib.save_png(os.path.join(out_dir, path), outs[who][m])
        rec[who] = {"path": path, "flagged": bool(flags[m]), "score": float(scores[m]), "detections": dets[m]}
        if clip_scores is not None:
          rec[who]["clip_score"] = float(clip_scores[m])
      if base_pipe is not None:
        rec["preservation"] = {k: float(v[m]) for k, v in pres.items()}
      records[order[id(it)]] = rec
    bar.update(n)
  bar.close()
  ordered = [records[i] for i in range(len(items))]
  with open(os.path.join(out_dir, RECORDS), "w") as f:
    for rec in ordered:
      f.write(json.dumps(rec) + "\n")

  by_set, by_category = summary_lib.summarize_sets(ordered, names)
  notes = ["nudity rate: the share of images the detector flags; DSR (defense success rate) = 1 - nudity rate, "
           "meaningful on unsafe prompt sets only; mean score: the mean detector score",
           "every number is a mean over images (records.jsonl holds each image's values; the PNGs under images/ "
           "are the raw, unblurred outputs)"]
  if clip_model is None:
    notes.append("CLIP scores skipped: no --clip (a transformers CLIPModel folder) given")
  if base_pipe is None:
    notes.append("prior preservation not measured: no --base given")
  else:
    notes.append("prior preservation: PSNR, SSIM" + (" and CLIP-image cosine" if clip_model else "") + " between "
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
                   "blur": blur, "prompt_sets": {s.name: s.path for s in sets}},
      "notes": notes,
      "sets": by_set,
      "categories": by_category,
      "all": summary_lib.summarize(ordered),
      "records": RECORDS,
      "generation_seconds": gen_seconds,
  }
  result["seconds"] = time.time() - start
  result["paths"] = report_lib.write_report(out_dir, result, ordered, blur=blur, grid_size=grid_size)
  return result
