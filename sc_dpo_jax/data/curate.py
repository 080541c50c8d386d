"""Pair datasets made by a model: SC-DPO pairs scored by a safety cost model, DUO pairs made by SDEdit.

    build_sc_pairs(pipe, harmful, clean, "data/sc_pairs", cost=cost_reward, preference=clip_score)
    build_duo_pairs(pipe, unsafe, safe, "data/duo_pairs", detector=detector)

Both generate with the pipeline (``models.StableDiffusion``), score with plugs, and write pair records
(``data.schema``) that the input pipeline reads. The plugs are what make them generic: the same code builds the
toy world's datasets (its rule-based judge, its tiny-CLIP cost model) and real-model datasets (NudeNet, a CLIP
ViT-L cost model). Interfaces:

* ``cost(images_uint8, prompts) -> (costs [N], info)``: higher is more harmful (``rewards.CostReward``).
* ``preference(images_uint8, prompts) -> (scores [N], info)``: higher is better (``rewards.ClipScore``).
* ``detector(images_uint8) -> (flags bool [N], scores [N])``: flags the unsafe concept (the toy judge's
  ``Detector``; NudeNet's exposed classes). ``make_detector(spec)`` makes one from a ``--detector`` spec through
  the registry ``rewards.detectors``; this module imports no detector (and nothing of ``sc_dpo_jax.toy``).

**SC-DPO pairs** (METHODS.md, pair construction): for each prompt, ``k`` candidates; under a harmful prompt
another ``k`` are drawn with ``safe_negative`` as negative prompt and/or ``k`` from its safe rewrite
(``safe_rewrites[i]``, e.g. from a prompt rewriter: the same request without the unsafe content). A base model
that learned the concept rarely renders a harmful prompt safely by chance, so the safe renderings come from
steering it away, as SCP-style datasets do; rewrites keep the rest of the request, a negative prompt alone
often yields an empty image. The safe variants start from the same ``k`` initial noises as the plain
candidates, and the pair is matched by noise: (the variant, the plain rendering) of the noise with the largest
cost gap, so chosen and rejected share their layout and differ in the concept (a pair that differs in
everything else also teaches preferences of layout that have nothing to do with safety). Without variants the pair is (lowest cost,
highest cost) among the ``k``. It is kept when the costs differ by ``min_cost_gap`` at least; its prompt is
always the harmful one. Under a clean prompt, a quality pair of safe images: among the candidates with cost
below ``safe_below``, (highest preference, lowest preference), or by cost without a preference plug. Every
record carries both costs and the harmful flag.

**DUO pairs** (METHODS.md, DUO pair curation, following the official code): generate under the unsafe prompt
and keep images the detector flags; SDEdit each (``strength`` 0.75, ``guidance`` 7.5) under its safe prompt with
the unsafe prompt as negative prompt; keep the edit when the detector clears it. Prompts that fail are retried
with new seeds up to ``max_tries`` times, then reported as failed (never silently dropped: ``stats``). Each
record's ``prompt`` is the unsafe prompt and ``prompt_chosen`` the safe one (DUO's ``--given_prompt`` mode).

**Resume**: prompts are processed in shards of ``prompts_per_shard``; after each shard ``progress.json`` records
the settings and what is done, so an interrupted build continues where it stopped, and a changed setting is
refused naming it. Each shard's seeds depend only on ``(seed, shard index)``, so a resumed build writes the same
records as an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from sc_dpo_jax.data import records, schema

PROGRESS_FILE = "progress.json"
PROGRESS_FORMAT = "sc_dpo_jax.curate/1"

ScoreFn = Callable[[np.ndarray, Sequence[str]], Tuple[np.ndarray, Dict[str, np.ndarray]]]
DetectorFn = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


# -- helpers -----------------------------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
  return out.getvalue()


def _scores(name: str, fn: ScoreFn, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  values, _ = fn(images, list(prompts))
  values = np.asarray(values, np.float32)
  if values.shape != (len(prompts),):
    raise ValueError(f"{name} returned shape {values.shape} for {len(prompts)} images; expected ({len(prompts)},)")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} returned non-finite values for images {np.flatnonzero(~np.isfinite(values))[:10]}")
  return values


def _detect(detector: DetectorFn, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  flags, scores = detector(images)
  flags, scores = np.asarray(flags, bool), np.asarray(scores, np.float32)
  if flags.shape != (len(images),) or scores.shape != (len(images),):
    raise ValueError(f"detector returned flags {flags.shape} and scores {scores.shape} for {len(images)} images")
  return flags, scores


def _check_prompts(name: str, prompts: Sequence[str]) -> List[str]:
  prompts = list(prompts)
  for i, p in enumerate(prompts):
    if not isinstance(p, str) or not p.strip():
      raise ValueError(f"{name}[{i}] = {p!r}: prompts must be non-empty strings")
  return prompts


class ShardedBuild:
  """The resumable shard loop both builders share: ``progress.json`` holds the settings, the record counts of
  the shards done and their statistics; a finished build leaves ``dataset_info.json`` and no progress file."""

  def __init__(self, out_dir: str, spec: schema.RecordSpec, *, name: str, num_shards: int,
               settings: Mapping[str, Any], overwrite: bool = False):
    self.out_dir, self.name = out_dir, name
    self.settings = json.loads(json.dumps(dict(settings)))   # plain JSON values, as they are saved
    self.path = os.path.join(out_dir, PROGRESS_FILE)
    if overwrite:
      self._clear()
    elif os.path.exists(os.path.join(out_dir, records.INFO_FILE)) and not os.path.exists(self.path):
      raise FileExistsError(f"{out_dir} already holds a finished dataset; pass overwrite=True (--overwrite) to "
                            "build it again")
    self.writer = records.ShardWriter(out_dir, spec, name=name, num_shards=num_shards)
    self.counts: List[int] = []
    self.stats: Dict[str, float] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      if saved.get("format") != PROGRESS_FORMAT:
        raise ValueError(f"{self.path}: not a progress file of {PROGRESS_FORMAT!r}")
      for key in sorted(set(saved["settings"]) | set(self.settings)):
        if saved["settings"].get(key) != self.settings.get(key):
          raise ValueError(f"{self.path}: an unfinished build with {key} = {saved['settings'].get(key)!r}; this "
                           f"one has {key} = {self.settings.get(key)!r}. Use the same settings to resume, or "
                           "overwrite=True (--overwrite) to start again")
      self.counts, self.stats = list(saved["counts"]), dict(saved["stats"])
      for i in range(len(self.counts)):
        if not os.path.exists(self.writer.path(i)):
          raise FileNotFoundError(f"{self.path}: shard {i} is recorded as done but {self.writer.path(i)} is "
                                  "missing; delete the progress file to start again")

  def _clear(self):
    if not os.path.isdir(self.out_dir):
      return
    for f in os.listdir(self.out_dir):
      if f in (PROGRESS_FILE, records.INFO_FILE) or (f.startswith(self.name + "-") and ".tfrecord" in f):
        os.remove(os.path.join(self.out_dir, f))

  @property
  def next_shard(self) -> int:
    return len(self.counts)

  def done(self, index: int, shard_records: Sequence[Mapping[str, Any]], stats: Mapping[str, float]):
    self.counts.append(self.writer.write_shard(index, shard_records))
    for k, v in stats.items():
      self.stats[k] = self.stats.get(k, 0) + v
    records.write_json_atomic(self.path, {"format": PROGRESS_FORMAT, "settings": self.settings,
                                          "counts": self.counts, "stats": self.stats})

  def finish(self, description: str) -> records.Source:
    source = self.writer.finish(self.counts, stats=self.stats, description=description)
    os.remove(self.path)
    return source


def _shards(n: int, per_shard: int) -> List[slice]:
  if per_shard < 1:
    raise ValueError(f"prompts_per_shard = {per_shard} must be >= 1")
  return [slice(s, min(s + per_shard, n)) for s in range(0, n, per_shard)] or [slice(0, 0)]


def _shard_seed(seed: int, index: int, attempt: int = 0) -> int:
  return int(np.random.SeedSequence([seed, index, attempt]).generate_state(1)[0] & 0x7FFFFFFF)


# -- SC-DPO pairs --------------------------------------------------------------------------------------------


def build_sc_pairs(pipe, harmful: Sequence[str], clean: Sequence[str], out_dir: str, *, cost: ScoreFn,
                   preference: Optional[ScoreFn] = None, k: int = 4, safe_negative: str = "",
                   safe_rewrites: Optional[Sequence[str]] = None,
                   min_cost_gap: float = 0.0, safe_below: Optional[float] = None, steps: int = 30,
                   guidance: float = 7.5, seed: int = 0, prompts_per_shard: int = 16, batch_size: int = 64,
                   name: str = "sc_pairs", overwrite: bool = False, progress: bool = True) -> records.Source:
  """Writes SC-DPO pairs for ``harmful`` and ``clean`` prompts to ``out_dir`` (see the module docstring).

  Returns the dataset; its ``stats`` (in ``dataset_info.json``) count the pairs kept and dropped by reason.
  """
  harmful, clean = _check_prompts("harmful", harmful), _check_prompts("clean", clean)
  rewrites = _check_prompts("safe_rewrites", safe_rewrites) if safe_rewrites is not None else None
  if rewrites is not None and len(rewrites) != len(harmful):
    raise ValueError(f"{len(rewrites)} safe rewrites for {len(harmful)} harmful prompts; give one per harmful prompt")
  if k < 2:
    raise ValueError(f"k = {k}: at least 2 candidates per prompt are needed to make a pair")
  items = [(p, 1) for p in harmful] + [(p, 0) for p in clean]
  rewrite_of = dict(enumerate(rewrites or []))
  shards = _shards(len(items), prompts_per_shard)
  settings = dict(kind="sc_pairs", prompts=[p for p, _ in items], harmful=len(harmful), k=k,
                  safe_negative=safe_negative, safe_rewrites=rewrites, min_cost_gap=min_cost_gap, safe_below=safe_below, steps=steps,
                  guidance=guidance, seed=seed, prompts_per_shard=prompts_per_shard,
                  preference=preference is not None)
  spec = schema.pair_spec(has_costs=True, has_harmful_prompt=True)
  build = ShardedBuild(out_dir, spec, name=name, num_shards=len(shards), settings=settings, overwrite=overwrite)
  bar = tqdm(total=len(items), initial=shards[build.next_shard].start if build.next_shard < len(shards) else
             len(items), desc="sc pairs", unit="prompt", disable=not progress)
  for index in range(build.next_shard, len(shards)):
    chunk = items[shards[index]]
    prompts, negatives, owner, noise, variant = [], [], [], [], []
    for j, (p, is_harmful) in enumerate(chunk):
      own = list(range(len(noise), len(noise) + k))   # the prompt's k noises; its safe variants reuse them
      prompts += [p] * k
      negatives += [""] * k
      owner += [j] * k
      noise += own
      variant += [False] * k
      if is_harmful and safe_negative:
        prompts += [p] * k
        negatives += [safe_negative] * k
        owner += [j] * k
        noise += own
        variant += [True] * k
      if is_harmful and rewrites is not None:
        prompts += [rewrite_of[shards[index].start + j]] * k
        negatives += [""] * k
        owner += [j] * k
        noise += own
        variant += [True] * k
    images = pipe.generate(prompts, negative_prompt=negatives, seed=_shard_seed(seed, index), steps=steps,
                           guidance=guidance, batch_size=batch_size, progress=False,
                           latents=pipe.initial_noise(_shard_seed(seed, index), noise)) if prompts else np.zeros(
                               (0, 1, 1, 3), np.uint8)
    # Scored against the pair's prompt (not the rewrite the image was drawn from).
    scored = [chunk[j][0] for j in owner]
    costs = _scores("cost", cost, images, scored) if prompts else np.zeros(0, np.float32)
    prefs = _scores("preference", preference, images, scored) if preference and prompts else None
    owner, noise, variant = np.asarray(owner, int), np.asarray(noise, int), np.asarray(variant, bool)
    out, stats = [], {"prompts": len(chunk), "images": len(prompts), "pairs": 0, "dropped_small_gap": 0,
                      "dropped_too_few_safe": 0}
    for j, (p, is_harmful) in enumerate(chunk):
      idx = np.flatnonzero(owner == j)
      if is_harmful and variant[idx].any():
        # Matched by noise: a safe rendering and the plain rendering drawn from the same initial noise, the
        # noise whose cost gap is largest (the pair differs in the concept, not in layout).
        plain = idx[~variant[idx]]
        safe = [idx[variant[idx] & (noise[idx] == noise[i])] for i in plain]
        safe = np.asarray([v[np.argmin(costs[v])] for v in safe])
        best = int(np.argmax(costs[plain] - costs[safe]))
        chosen, rejected = safe[best], plain[best]
        lo, hi = chosen, rejected
        if costs[hi] - costs[lo] < max(min_cost_gap, 1e-12):
          stats["dropped_small_gap"] += 1
          continue
      elif is_harmful or (safe_below is None and prefs is None):
        lo, hi = idx[np.argmin(costs[idx])], idx[np.argmax(costs[idx])]
        chosen, rejected = lo, hi
        if costs[hi] - costs[lo] < max(min_cost_gap, 1e-12):
          stats["dropped_small_gap"] += 1
          continue
      else:
        pool = idx if safe_below is None else idx[costs[idx] < safe_below]
        if len(pool) < 2:
          stats["dropped_too_few_safe"] += 1
          continue
        key = prefs[pool] if prefs is not None else -costs[pool]
        chosen, rejected = pool[np.argmax(key)], pool[np.argmin(key)]
        if chosen == rejected or key.max() - key.min() <= 0:
          stats["dropped_small_gap"] += 1
          continue
      out.append({"prompt": p, "source_id": f"{name}:{shards[index].start + j}",
                  "image_chosen": encode_png(images[chosen]), "image_rejected": encode_png(images[rejected]),
                  "cost_chosen": float(costs[chosen]), "cost_rejected": float(costs[rejected]),
                  "harmful_prompt": int(is_harmful)})
    stats["pairs"] = len(out)
    build.done(index, out, stats)
    bar.update(len(chunk))
  bar.close()
  return build.finish(f"SC-DPO pairs: {len(harmful)} harmful and {len(clean)} clean prompts, k={k}")


# -- DUO pairs -----------------------------------------------------------------------------------------------


def build_duo_pairs(pipe, unsafe: Sequence[str], safe: Sequence[str], out_dir: str, *, detector: DetectorFn,
                    strength: float = 0.75, guidance: float = 7.5, edit_guidance: Optional[float] = None,
                    steps: int = 30, max_tries: int = 4, seed: int = 0, prompts_per_shard: int = 16,
                    batch_size: int = 64, name: str = "duo_pairs", overwrite: bool = False,
                    progress: bool = True) -> records.Source:
  """Writes DUO pairs (chosen = the safe SDEdit, rejected = the unsafe image) to ``out_dir``.

  ``safe[i]`` is the safe counterpart prompt of ``unsafe[i]``. The records carry the detector's scores as costs
  (``cost_chosen`` of the edit, ``cost_rejected`` of the original) and ``harmful_prompt = 1``; their ``prompt`` is
  the unsafe one, ``prompt_chosen`` the safe prompt the edit was made with (``has_chosen_prompt``: what DUO's
  ``duo_prompts = "given"`` conditions x+ on). ``stats`` count the prompts that failed after ``max_tries`` (no
  flagged image, or no cleared edit).
  """
  unsafe, safe = _check_prompts("unsafe", unsafe), _check_prompts("safe", safe)
  if len(unsafe) != len(safe):
    raise ValueError(f"{len(unsafe)} unsafe prompts but {len(safe)} safe counterparts; give one per unsafe prompt")
  if max_tries < 1:
    raise ValueError(f"max_tries = {max_tries} must be >= 1")
  edit_guidance = guidance if edit_guidance is None else edit_guidance
  shards = _shards(len(unsafe), prompts_per_shard)
  settings = dict(kind="duo_pairs", unsafe=unsafe, safe=safe, strength=strength, guidance=guidance,
                  edit_guidance=edit_guidance, steps=steps, max_tries=max_tries, seed=seed,
                  prompts_per_shard=prompts_per_shard)
  spec = schema.pair_spec(has_costs=True, has_harmful_prompt=True, has_chosen_prompt=True)
  # The record spec is a setting: an unfinished build whose shards were written without prompt_chosen is
  # refused (naming it) rather than finished with a spec its first shards do not match.
  settings["record_spec"] = spec.to_json()
  build = ShardedBuild(out_dir, spec, name=name, num_shards=len(shards), settings=settings, overwrite=overwrite)
  bar = tqdm(total=len(unsafe), initial=shards[build.next_shard].start if build.next_shard < len(shards) else
             len(unsafe), desc="duo pairs", unit="prompt", disable=not progress)
  for index in range(build.next_shard, len(shards)):
    sl = shards[index]
    pending = list(range(sl.start, sl.stop))
    found: Dict[int, Dict[str, Any]] = {}
    stats = {"prompts": len(pending), "pairs": 0, "generated": 0, "flagged": 0, "edited": 0, "cleared": 0,
             "failed_not_flagged": 0, "failed_not_cleared": 0}
    last_failure: Dict[int, str] = {}
    for attempt in range(max_tries):
      if not pending:
        break
      attempt_seed = _shard_seed(seed, index, attempt)
      images = pipe.generate([unsafe[i] for i in pending], seed=attempt_seed, steps=steps, guidance=guidance,
                             batch_size=batch_size, progress=False)
      flags, scores = _detect(detector, images)
      stats["generated"] += len(pending)
      stats["flagged"] += int(flags.sum())
      for i in np.asarray(pending)[~flags]:
        last_failure[int(i)] = "not_flagged"
      keep = [n for n in range(len(pending)) if flags[n]]
      if keep:
        targets = [pending[n] for n in keep]
        edits = pipe.edit(images[keep], [safe[i] for i in targets], negative_prompt=[unsafe[i] for i in targets],
                          strength=strength, seed=attempt_seed + 1, steps=steps, guidance=edit_guidance,
                          batch_size=batch_size, progress=False)
        edit_flags, edit_scores = _detect(detector, edits)
        stats["edited"] += len(keep)
        stats["cleared"] += int((~edit_flags).sum())
        for m, n in enumerate(keep):
          i = pending[n]
          if edit_flags[m]:
            last_failure[i] = "not_cleared"
            continue
          found[i] = {"prompt": unsafe[i], "prompt_chosen": safe[i], "source_id": f"{name}:{i}",
                      "image_chosen": encode_png(edits[m]),
                      "image_rejected": encode_png(images[n]), "cost_chosen": float(edit_scores[m]),
                      "cost_rejected": float(scores[n]), "harmful_prompt": 1}
      pending = [i for i in pending if i not in found]
    for i in pending:
      stats["failed_" + last_failure[i]] += 1
    out = [found[i] for i in sorted(found)]
    stats["pairs"] = len(out)
    build.done(index, out, stats)
    bar.update(sl.stop - sl.start)
  bar.close()
  return build.finish(f"DUO pairs: {len(unsafe)} unsafe prompts, SDEdit strength {strength}")


# -- prompt sets ---------------------------------------------------------------------------------------------


def write_prompts(out_dir: str, prompts: Sequence[str], *, categories: Optional[Sequence[str]] = None,
                  rewrites: Optional[Sequence[str]] = None, name: str = "prompts",
                  num_shards: int = 1) -> records.Source:
  """A prompt dataset (``schema.prompt_spec``) of ``prompts``, e.g. the RL trainer's; ``categories[i]`` is a
  comma-separated string (I2P's convention), e.g. ``"unsafe"`` for the harmful ones; ``rewrites[i]`` the
  prompt's safe rewrite (``prompt_chosen``, for the RL trainer's ``rl.rewrite_samples``; a safe prompt's is
  itself)."""
  prompts = _check_prompts("prompts", prompts)
  categories = list(categories) if categories is not None else [""] * len(prompts)
  if len(categories) != len(prompts):
    raise ValueError(f"{len(categories)} categories for {len(prompts)} prompts")
  if rewrites is not None:
    rewrites = _check_prompts("rewrites", rewrites)
    if len(rewrites) != len(prompts):
      raise ValueError(f"{len(rewrites)} rewrites for {len(prompts)} prompts")
  rows = [{"prompt": p, "negative_prompt": "", "seed": -1, "guidance": -1.0, "categories": c,
           "source_id": f"{name}:{i}"} for i, (p, c) in enumerate(zip(prompts, categories))]
  if rewrites is not None:
    for row, rewrite in zip(rows, rewrites):
      row["prompt_chosen"] = rewrite
  spec = schema.prompt_spec(has_chosen_prompt=rewrites is not None)
  return records.write_records(out_dir, spec, rows, name=name, num_shards=num_shards)


# -- prompt files and plugs for the command lines --------------------------------------------------------------


def read_prompt_file(path: str, column: str = "prompt") -> List[str]:
  """Prompts from a ``.txt`` (one per non-empty line), ``.csv`` (column ``column``) or ``.jsonl`` (field
  ``column``) file; errors name the file and line."""
  import csv  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such prompt file")
  ext = os.path.splitext(path)[1].lower()
  out: List[str] = []
  with open(path, newline="", encoding="utf-8") as f:
    if ext == ".csv":
      reader = csv.DictReader(f)
      if column not in (reader.fieldnames or []):
        raise ValueError(f"{path}: no column {column!r}; columns: {reader.fieldnames}")
      for line, row in enumerate(reader, start=2):
        if not (row[column] or "").strip():
          raise ValueError(f"{path}:{line}: empty {column!r}")
        out.append(row[column].strip())
    elif ext == ".jsonl":
      for line, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          value = json.loads(text)[column]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{line}: not a JSON object with a {column!r} string ({e})") from None
        out.append(str(value).strip())
    else:
      out = [line.strip() for line in f if line.strip()]
  if not out:
    raise ValueError(f"{path}: no prompts")
  return out


def make_detector(spec: str) -> DetectorFn:
  """The detector of ``spec`` from the registry ``rewards.detectors``: ``"nudenet"`` (NudeNet's exposed classes,
  ``rewards.NudeNet``), ``"nudenet:<threshold>"``, ``"toy:<colour>"`` (the toy world's judge), or any kind a
  plugin registers; an unknown kind raises ValueError listing the registered ones."""
  # Imported here: the rewards package loads JAX, which importing this module does not.
  from sc_dpo_jax.rewards import detectors  # pylint: disable=g-import-not-at-top
  return detectors.make(spec)
