"""The safety cost model's trainer (job ``cost_model``): ``C(x) = g(normalize(CLIP_image(x)))`` on a pair dataset.

    python -m sc_dpo_jax.main --config=configs/cost_model.py:tiny --workdir=workdir/cost_model
    python -m sc_dpo_jax.main --config=configs/cost_model.py:sd15 --workdir=workdir/cost_model_sd15 \\
        --config.model.clip_folder=/models/clip-vit-large-patch14 --config.data.train=data/scp_pairs

THIS PROJECT'S FORMULATION (METHODS.md, "SC-DPO", safety cost model): CLIP is frozen and ``g`` a small MLP
(``rewards.cost_model``), trained on ``L_cost = L_rank + alpha * L_anchor`` (``losses.cost_model``).

What :func:`train_cost_model` does, in order:

1. **CLIP**: the vision tower with projection in ``model.clip_folder``; for ``model.tiny`` without a folder a
   random tiny tower (``models.tiny_vision_config``) is made once and written to ``<workdir>/clip``, so the
   export can be loaded like any other (``load_cost_model(export, <workdir>/clip)``).
2. **Data**: the pair dataset ``data.train`` (or, tiny, ``data.synthetic.write_synthetic_pairs`` into
   ``<workdir>/data``), read once by ``data.pipeline.DataIterator`` (images resized and centre-cropped to
   ``data.resolution``, 0 = CLIP's input size), and **embedded once**: CLIP is frozen, so the normalised
   embeddings of both images of every pair are computed in one pass and cached in
   ``<workdir>/embeddings/<split>.npz`` (reused on resume while the data, CLIP and resolution are the same).
   Each step then costs an MLP on ``[batch, D]`` embeddings instead of a ViT-L forward of every image, the
   reason this trainer does not stream images as the DPO trainer does. Memory: ``2 * pairs * D * 4`` bytes
   (100k pairs with ViT-L's ``D = 768``: 0.6 GB).
3. **Held-out set**: ``data.eval`` (a second pair dataset) or, without one, ``data.eval_fraction`` of the pairs
   chosen by a seeded permutation (whole pairs, so no image of a held-out pair is trained on).
4. **Labels** (:func:`ranking_pairs`, :func:`anchor_labels`; the rule is in ``labels.*`` and in
   ``summary.json``):

   * ranking pairs (more harmful, less harmful), ``labels.rank_by``:
     ``"cost"``: ordered by the stored costs, the higher-cost image is the more harmful one; pairs whose costs
     differ by less than ``labels.min_cost_gap`` (and ties) give no ranking pair. ``"preference"``: the
     rejected image is the more harmful one, for the pairs under harmful prompts when the records carry the
     ``harmful_prompt`` flag (under clean prompts the rejected image is worse, not more harmful), for every
     pair when they do not. ``"auto"`` (default): ``"cost"`` when the records carry costs, else
     ``"preference"``.
   * anchor labels (+1 harmful, -1 safe, or none), ``labels.anchor_by``:
     ``"cost"``: harmful when ``cost > labels.harmful_above``, safe when ``cost < labels.safe_below``, no label
     in between. ``"preference"``: under a harmful prompt the rejected image is harmful and the chosen one
     safe; under a clean prompt both are safe (METHODS.md: clean-prompt pairs are quality pairs of safe
     images); without the ``harmful_prompt`` flag every rejected image is harmful and every chosen one safe.
     ``"auto"``: ``"cost"`` when the records carry costs, else ``"preference"``.
5. **Steps**: each step takes ``data.batch_size`` ranking pairs and ``data.labelled_batch_size`` labelled images
   (half harmful, half safe with ``data.balance_labels``), each stream walking seeded permutations epoch after
   epoch. A batch is a pure function of ``(seed, step)``, so the data position of a checkpoint is its step.
   ``rewards.cost_model.cost_train_step`` (AdamW from ``optim.*``, ``loss.alpha``) inside the NaN guard
   (``train.guard``).
6. **Loop**: progress bar; every ``train.log_every`` steps the mean train-batch metrics (loss, rank_loss,
   anchor_loss, ranking_accuracy, anchor_accuracy, mean costs, grad_norm) to ``metrics.jsonl`` and TensorBoard;
   every ``train.eval_every`` steps (and at the end) the held-out metrics ``eval/*``; an Orbax checkpoint
   (state, rng, config) every ``train.checkpoint_every`` steps; SIGTERM/SIGINT finish the step, save and
   return; a restart resumes from the latest checkpoint (a changed data or labelling key is refused, naming it).
7. **Export** (``train.export``): ``rewards.cost_model.save_cost_model`` to ``<workdir>/export``, which
   ``load_cost_model(export, clip_folder)`` and ``CostReward`` read.

Returns a summary dict (also ``<workdir>/summary.json``) with the final held-out accuracies.

**Several processes** (a pod launch runs the same command on every host): every process trains the same
adapter on the same data, its state host-local on the process's first device (the adapter is a few hundred
thousand parameters on precomputed embeddings: there is nothing to shard). Everything written is written
once, by process 0, while the others wait at a barrier (``train.loop.barrier``): the tiny CLIP folder and the
synthetic pairs (then read by all), the embeddings cache (process 0 computes or reuses it; the others read the
very same file, so every process trains on identical embeddings), the checkpoints (the state is saved as host
numpy arrays, which Orbax writes from its primary host; a resumed run puts the restored arrays back on its
device), the metrics, ``summary.json`` and the export. So the workdir must be one that every process sees: a
bucket (``gs://``) or a shared filesystem, as the checkpoints of any multi-process run need. At each
checkpoint the processes compare a digest of their state and log a warning if one differs from process 0's
(the checkpoint and export hold process 0's). Workdir files go through ``etils.epath``
(``sc_dpo_jax.paths``), so ``--workdir=gs://bucket/run`` works, given ``data.train``: a tiny run's synthetic
pairs are written with local files only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict
from tqdm import tqdm

from sc_dpo_jax.data import pipeline as data_pipeline
from sc_dpo_jax.data import records, schema, synthetic
from sc_dpo_jax.models import CLIPVisionModel, load_clip_vision, save_clip_vision, tiny_vision_config
from sc_dpo_jax.models.random_init import host_random_params
from sc_dpo_jax.rewards import cost_model as cost_lib
from sc_dpo_jax import paths
from sc_dpo_jax.train import guard, harness, optim
from sc_dpo_jax.train.loop import barrier
from sc_dpo_jax.train.preemption import StopSignal

VARIANTS = ("tiny", "sd15")
RULES = ("auto", "cost", "preference")
EMBEDDINGS_VERSION = 1
# Keys that define which pairs, labels and batches a run sees: a resumed run must have the saved values.
ORDER_KEYS = ("seed", "model.clip_folder", "data.train", "data.split", "data.eval", "data.eval_split",
              "data.eval_fraction", "data.synthetic_pairs", "data.resolution", "data.batch_size",
              "data.labelled_batch_size", "data.balance_labels", "labels.rank_by", "labels.anchor_by",
              "labels.min_cost_gap", "labels.harmful_above", "labels.safe_below")


# -- config -------------------------------------------------------------------------------------------------------


def cost_model_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The whole config of a ``job = "cost_model"`` run; ``main`` locks it, so a misspelt override fails naming
  the key. ``tiny``: a random tiny CLIP and synthetic pairs in the workdir (seconds on a CPU). ``sd15``: the CLIP
  ViT-L/14 vision tower of Stable Diffusion 1.x's family (``model.clip_folder``) and a pair dataset
  (``data.train``), both required."""
  variant = variant or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS} (configs/cost_model.py:<variant>)")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.job = "cost_model"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      clip_folder=config_dict.placeholder(str),   # transformers CLIPVisionModelWithProjection / CLIPModel folder
      clip_name=config_dict.placeholder(str),   # recorded in the export (default: the CLIP folder's path)
      tiny=tiny,                  # without clip_folder: a random tiny tower written to <workdir>/clip
      dtype="float32",            # CLIP's compute dtype for the embedding pass (CostReward loads float32)
      attention="reference" if tiny else "xla",   # models.ATTENTION_IMPLEMENTATIONS
      hidden_sizes=(64,) if tiny else (512,),      # the adapter g: hidden widths (() = a linear cost)
      activation="gelu",
  ))

  c.data = ml_collections.ConfigDict(dict(
      train=config_dict.placeholder(str),   # a pair dataset folder (ours or TFDS-prepared); tiny: synthetic
      split="train",
      eval=config_dict.placeholder(str),    # a held-out pair dataset; without it eval_fraction of train
      eval_split="train",
      eval_fraction=0.25 if tiny else 0.05,  # held-out share of the pairs when data.eval is unset (0: none)
      batch_size=8 if tiny else 64,          # ranking pairs per step
      labelled_batch_size=16 if tiny else 128,   # anchor-labelled images per step
      balance_labels=True,                   # half harmful, half safe labelled images per step
      resolution=0 if tiny else 512,         # input-pipeline resize/crop; 0: CLIP's image size. 512: SD1.5
                                             # samples' size, so CLIP's own resize is the one CostReward applies
      embed_batch_size=32 if tiny else 64,   # pairs per CLIP call of the embedding pass
      skip_bad_records=False,
      synthetic_pairs=96,                    # tiny without data.train: pairs written to <workdir>/data
  ))

  c.labels = ml_collections.ConfigDict(dict(
      rank_by="auto",        # RULES: "cost" (stored costs), "preference" (rejected = more harmful), "auto"
      anchor_by="auto",      # RULES: "cost" (thresholds below), "preference" (harmful_prompt flag), "auto"
      min_cost_gap=0.1,      # rank_by=cost: pairs whose costs differ by less give no ranking pair
      harmful_above=0.5,     # anchor_by=cost: cost > harmful_above is harmful
      safe_below=0.5,        # anchor_by=cost: cost < safe_below is safe
  ))
  c.loss = ml_collections.ConfigDict(dict(alpha=1.0))   # L_cost = L_rank + alpha * L_anchor

  c.optim = optim.default_config()
  c.optim.learning_rate = 2e-2 if tiny else 1e-3

  c.train = ml_collections.ConfigDict(dict(
      steps=200 if tiny else 3000,
      log_every=25 if tiny else 50,
      eval_every=50 if tiny else 250,        # held-out metrics (and always at the end)
      checkpoint_every=100 if tiny else 500,
      keep_checkpoints=3,
      async_checkpoints=True,
      allow_config_change=False,   # resume a checkpoint saved with another method/model/LoRA
      max_nonfinite_in_a_row=5,
      export=True,                           # <workdir>/export: save_cost_model
      progress=True,
  ))
  return c


# -- labels -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PairSet:
  """One split's pairs as embeddings ``[N, D]`` plus what the records carry (costs, harmful flag) or None."""
  emb_chosen: np.ndarray
  emb_rejected: np.ndarray
  cost_chosen: Optional[np.ndarray] = None
  cost_rejected: Optional[np.ndarray] = None
  harmful_prompt: Optional[np.ndarray] = None

  def __len__(self):
    return int(self.emb_chosen.shape[0])

  def arrays(self) -> Dict[str, np.ndarray]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

  def take(self, index: np.ndarray) -> "PairSet":
    return PairSet(**{k: v[index] for k, v in self.arrays().items()})


def resolve_rule(rule: str, has_costs: bool, key: str, where: str) -> str:
  """``"auto"`` -> ``"cost"`` when the records carry costs, else ``"preference"``; ``"cost"`` without costs
  is an error naming the config key and the dataset."""
  if rule not in RULES:
    raise ValueError(f"config {key} = {rule!r}; choose one of {RULES}")
  if rule == "auto":
    return "cost" if has_costs else "preference"
  if rule == "cost" and not has_costs:
    raise ValueError(f"config {key} = 'cost' but the records of {where} carry no cost_chosen/cost_rejected; "
                     f"use 'preference' or 'auto'")
  return rule


def ranking_pairs(n: int, rule: str, *, cost_chosen=None, cost_rejected=None, harmful_prompt=None,
                  min_cost_gap: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
  """``(more, less)``: indices of the more and of the less harmful image of each ranking pair, into the pool
  ``[chosen_0 .. chosen_{n-1}, rejected_0 .. rejected_{n-1}]`` (the module docstring gives the rule)."""
  chosen, rejected = np.arange(n), n + np.arange(n)
  if rule == "cost":
    gap = np.asarray(cost_rejected, np.float64) - np.asarray(cost_chosen, np.float64)
    keep = (np.abs(gap) >= float(min_cost_gap)) & (gap != 0)
    rejected_more = gap > 0
    more = np.where(rejected_more, rejected, chosen)[keep]
    less = np.where(rejected_more, chosen, rejected)[keep]
    return more, less
  if rule == "preference":
    keep = np.ones(n, bool) if harmful_prompt is None else np.asarray(harmful_prompt) > 0
    return rejected[keep], chosen[keep]
  raise ValueError(f"ranking rule {rule!r}; choose 'cost' or 'preference'")


def anchor_labels(n: int, rule: str, *, cost_chosen=None, cost_rejected=None, harmful_prompt=None,
                  harmful_above: float = 0.5, safe_below: float = 0.5) -> np.ndarray:
  """``[2n]`` int32 labels of the pool ``[chosen..., rejected...]``: +1 harmful, -1 safe, 0 unlabelled."""
  if rule == "cost":
    if safe_below > harmful_above:
      raise ValueError(f"labels.safe_below = {safe_below} > labels.harmful_above = {harmful_above}: an image "
                       f"could be both harmful and safe")
    costs = np.concatenate([np.asarray(cost_chosen, np.float64), np.asarray(cost_rejected, np.float64)])
    return np.where(costs > harmful_above, 1, np.where(costs < safe_below, -1, 0)).astype(np.int32)
  if rule == "preference":
    harmful = np.ones(n, bool) if harmful_prompt is None else np.asarray(harmful_prompt) > 0
    return np.concatenate([np.full(n, -1), np.where(harmful, 1, -1)]).astype(np.int32)
  raise ValueError(f"anchor rule {rule!r}; choose 'cost' or 'preference'")


@dataclasses.dataclass
class Labelled:
  """A split ready for training or evaluation: the image pool ``[2N, D]`` (chosen then rejected), ranking pairs
  as pool indices, and per-image labels (+1 / -1 / 0)."""
  pool: np.ndarray
  more: np.ndarray
  less: np.ndarray
  labels: np.ndarray
  n_pairs: int

  @property
  def labelled(self) -> np.ndarray:
    return np.flatnonzero(self.labels != 0)

  def counts(self) -> Dict[str, int]:
    return {"pairs": self.n_pairs, "ranking_pairs": int(self.more.size), "harmful": int(np.sum(self.labels > 0)),
            "safe": int(np.sum(self.labels < 0)), "unlabelled": int(np.sum(self.labels == 0))}


def label_pairs(pairs: PairSet, labels_config, rank_by: str, anchor_by: str) -> Labelled:
  n = len(pairs)
  extra = dict(cost_chosen=pairs.cost_chosen, cost_rejected=pairs.cost_rejected,
               harmful_prompt=pairs.harmful_prompt)
  more, less = ranking_pairs(n, rank_by, min_cost_gap=float(labels_config.min_cost_gap), **extra)
  labels = anchor_labels(n, anchor_by, harmful_above=float(labels_config.harmful_above),
                         safe_below=float(labels_config.safe_below), **extra)
  return Labelled(pool=np.concatenate([pairs.emb_chosen, pairs.emb_rejected]).astype(np.float32),
                  more=more, less=less, labels=labels, n_pairs=n)


# -- batches ------------------------------------------------------------------------------------------------------


class EpochSampler:
  """``per_step`` indices of ``range(n)`` for each step: positions ``[k * per_step, (k + 1) * per_step)`` of the
  endless sequence ``perm_0 ++ perm_1 ++ ...``, ``perm_e`` a permutation seeded by ``(seed, stream, e)``. Every
  item is seen once per epoch, and a step's indices depend on nothing but the step (exact resume)."""

  def __init__(self, n: int, per_step: int, seed: int, stream: int):
    if n < 1 or per_step < 1:
      raise ValueError(f"EpochSampler needs n >= 1 and per_step >= 1, got n={n}, per_step={per_step}")
    self.n, self.per_step, self.seed, self.stream = int(n), int(per_step), int(seed), int(stream)
    self._perms: Dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    pos = int(step) * self.per_step + np.arange(self.per_step)
    epochs, offsets = pos // self.n, pos % self.n
    out = np.empty(self.per_step, np.int64)
    for e in np.unique(epochs):
      mask = epochs == e
      out[mask] = self._perm(int(e))[offsets[mask]]
    return out


class Batches:
  """``batches(step)``: the step's batch of embeddings for ``cost_train_step`` (see :class:`EpochSampler`)."""

  def __init__(self, data: Labelled, *, pairs_per_step: int, labelled_per_step: int, balance: bool, seed: int):
    self.data = data
    self.pairs = EpochSampler(data.more.size, pairs_per_step, seed, stream=1)
    labelled = data.labelled
    harmful, safe = labelled[data.labels[labelled] > 0], labelled[data.labels[labelled] < 0]
    self.balanced = bool(balance) and harmful.size > 0 and safe.size > 0
    if self.balanced:
      n_harmful = labelled_per_step // 2
      self.streams = [(harmful, EpochSampler(harmful.size, n_harmful, seed, stream=2)),
                      (safe, EpochSampler(safe.size, labelled_per_step - n_harmful, seed, stream=3))]
    else:
      self.streams = [(labelled, EpochSampler(labelled.size, labelled_per_step, seed, stream=4))]

  def __call__(self, step: int) -> Dict[str, np.ndarray]:
    d = self.data
    k = self.pairs.indices(step)
    images = np.concatenate([items[sampler.indices(step)] for items, sampler in self.streams])
    return {"emb_more": d.pool[d.more[k]], "emb_less": d.pool[d.less[k]], "emb_labelled": d.pool[images],
            "labels": d.labels[images]}


# -- evaluation ---------------------------------------------------------------------------------------------------


def pool_costs(cost_fn, adapter_params, pool: np.ndarray, chunk: int = 4096) -> np.ndarray:
  """Costs of every pool embedding, in chunks of one padded shape (one compiled program)."""
  chunk = min(chunk, pool.shape[0])
  out = []
  for start in range(0, pool.shape[0], chunk):
    part = pool[start:start + chunk]
    n = part.shape[0]
    if n < chunk:
      part = np.concatenate([part, np.zeros((chunk - n, pool.shape[1]), pool.dtype)])
    out.append(np.asarray(cost_fn(adapter_params, part))[:n])
  return np.concatenate(out)


def _log_sigmoid_loss(x: np.ndarray) -> float:
  return float(np.mean(np.logaddexp(0.0, -x)))


def evaluate(cost_fn, adapter_params, data: Labelled, alpha: float, prefix: str = "eval/") -> Dict[str, float]:
  """Held-out metrics over the whole split: the losses and accuracies of ``losses.cost_model`` (ranking over
  every ranking pair, anchoring over every labelled image) and the mean costs of chosen and rejected images."""
  costs = pool_costs(cost_fn, adapter_params, data.pool)
  n = data.n_pairs
  out = {"cost_chosen": float(costs[:n].mean()), "cost_rejected": float(costs[n:].mean())}
  if data.more.size:
    diff = costs[data.more] - costs[data.less]
    out.update(rank_loss=_log_sigmoid_loss(diff), ranking_accuracy=float(np.mean(diff > 0)))
  labelled = data.labelled
  if labelled.size:
    signed = data.labels[labelled] * costs[labelled]
    out.update(anchor_loss=_log_sigmoid_loss(signed), anchor_accuracy=float(np.mean(signed > 0)))
    harmful, safe = labelled[data.labels[labelled] > 0], labelled[data.labels[labelled] < 0]
    if harmful.size:
      out["cost_harmful"] = float(costs[harmful].mean())
    if safe.size:
      out["cost_safe"] = float(costs[safe].mean())
  if "rank_loss" in out and "anchor_loss" in out:
    out["loss"] = out["rank_loss"] + alpha * out["anchor_loss"]
  return {prefix + k: v for k, v in out.items()}


# -- CLIP and data ------------------------------------------------------------------------------------------------


def load_clip(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> Tuple[CLIPVisionModel, Any, str]:
  """``(clip, clip_params, clip_folder)``: ``model.clip_folder``, or for a tiny run without one a random tiny
  tower written once to ``<workdir>/clip`` by process 0 (so the export loads with ``load_cost_model(export, that
  folder)``), which every process then loads. ``clip_folder`` is absolute (or a URI)."""
  m = config.model
  if m.clip_folder:
    folder = paths.resolve(m.clip_folder)
  elif m.tiny:
    folder = paths.resolve(workdir) / "clip"
    # save_clip_vision writes config.json after the weights: a folder without it is an interrupted first
    # run's, written again over (the tower is a function of the seed, so the same bytes).
    if jax.process_index() == 0 and not (folder / "config.json").exists():
      clip = CLIPVisionModel(tiny_vision_config(), with_projection=True)
      save_clip_vision(str(folder), clip, host_random_params(clip, seed=int(config.seed)))
    barrier("cost model: tiny CLIP")
  else:
    raise ValueError("config.model.clip_folder is empty: set --config.model.clip_folder to a CLIP vision folder "
                     "with projection (transformers CLIPVisionModelWithProjection or CLIPModel, e.g. "
                     "openai/clip-vit-large-patch14), or use the :tiny variant")
  clip, params = load_clip_vision(str(folder), dtype=jnp.dtype(m.dtype), attention=m.attention)
  if not clip.with_projection:
    raise ValueError(f"{folder} (config.model.clip_folder) holds a CLIP vision tower without visual_projection; "
                     f"the cost model needs projected image embeddings: use a CLIPVisionModelWithProjection or "
                     f"CLIPModel folder")
  return clip, params, str(folder)


def open_sources(config: ml_collections.ConfigDict, workdir: paths.PathLike, resolution: int):
  """``(train source, eval source or None)``; a tiny run without ``data.train`` has process 0 write the
  synthetic pairs to ``<workdir>/data/synthetic_pairs`` (local workdirs only), which every process then reads."""
  d = config.data
  if d.train:
    train = records.open_source(d.train, split=d.split)
    where = d.train
  elif config.model.tiny:
    root = paths.resolve(workdir)
    if paths.is_uri(root):
      raise ValueError(f"config.data.train is empty and the workdir is {root}: a tiny run writes its synthetic "
                       f"pairs with local files only. Set --config.data.train to a local pair dataset folder, or "
                       f"use a local workdir")
    folder = str(root / "data" / "synthetic_pairs")
    if jax.process_index() == 0:
      synthetic.write_synthetic_pairs(folder, num_pairs=int(d.synthetic_pairs), resolution=resolution,
                                      seed=int(config.seed))
    barrier("cost model: synthetic pairs")
    train = records.open_source(folder)
    where = folder
  else:
    raise ValueError("config.data.train is empty: set --config.data.train to a pair dataset folder "
                     "(python -m sc_dpo_jax.data.prepare / data.precompute make them)")
  out = [(train, where, "data.train")]
  if d.eval:
    out.append((records.open_source(d.eval, split=d.eval_split), d.eval, "data.eval"))
  for source, path, key in out:
    if source.spec.kind != schema.PAIR:
      raise ValueError(f"{path} ({key}): a {source.spec.kind} dataset; the cost model trains on pairs")
    if source.spec.image_format != schema.IMAGE:
      raise ValueError(f"{path} ({key}): a dataset of VAE latents; the cost model needs the images (CLIP sees "
                       f"pixels): use the image dataset the latents were made from")
  return train, (out[1][0] if d.eval else None)


def embed_pairs(model: cost_lib.SafetyCostModel, clip_params, source: records.Source, *, resolution: int,
                batch_size: int, seed: int, skip_bad_records: bool, desc: str, progress: bool) -> Tuple[PairSet, int]:
  """Every pair of ``source`` (in file order) as normalised CLIP embeddings, plus its costs and harmful flag;
  returns ``(pairs, bad_records)``. One compiled program: the last batch is padded."""
  it = data_pipeline.DataIterator(source, batch_size=batch_size, seed=seed, resolution=resolution, shuffle=False,
                                  num_epochs=1, drop_remainder=False, skip_bad_records=skip_bad_records,
                                  process_index=0, process_count=1)
  embed = jax.jit(model.embed)
  parts: Dict[str, list] = {k: [] for k in ("emb_chosen", "emb_rejected", "cost_chosen", "cost_rejected",
                                            "harmful_prompt")}
  bar = tqdm(total=source.total, desc=desc, unit="pair", disable=not progress)
  for batch in it:
    n = len(batch["image_chosen"])
    images = np.concatenate([batch["image_chosen"], batch["image_rejected"]])
    if n < batch_size:
      pad = np.zeros((2 * (batch_size - n),) + images.shape[1:], images.dtype)
      images = np.concatenate([batch["image_chosen"], pad[:batch_size - n], batch["image_rejected"],
                               pad[batch_size - n:]])
    emb = np.asarray(embed(clip_params, images))
    parts["emb_chosen"].append(emb[:n])
    parts["emb_rejected"].append(emb[batch_size:batch_size + n])
    for key in ("cost_chosen", "cost_rejected", "harmful_prompt"):
      if key in batch:
        parts[key].append(np.asarray(batch[key]))
    bar.update(n)
  bar.close()
  if not parts["emb_chosen"]:
    raise ValueError(f"dataset {source.name!r} ({os.path.dirname(source.files[0])}) yielded no pairs")
  pairs = PairSet(**{k: np.concatenate(v) for k, v in parts.items() if v})
  pairs.emb_chosen, pairs.emb_rejected = pairs.emb_chosen.astype(np.float32), pairs.emb_rejected.astype(np.float32)
  if pairs.harmful_prompt is not None:
    pairs.harmful_prompt = pairs.harmful_prompt.astype(np.int32)
  return pairs, it.bad_records


def read_embeddings(path: paths.PathLike, fingerprint: Mapping[str, Any]) -> Optional[Tuple[PairSet, int]]:
  """``(pairs, bad_records)`` of the cache file ``path`` (local or a URI) when it exists and was made with
  ``fingerprint``, else None."""
  path = paths.resolve(path)
  if not path.exists():
    return None
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
    if str(z["fingerprint"]) != json.dumps(dict(fingerprint), sort_keys=True):
      logging.info("%s was made from other data or another CLIP", path)
      return None
    return PairSet(**{k: z[k] for k in z.files if k not in ("fingerprint", "bad_records")}), int(z["bad_records"])


def cached_embeddings(path: paths.PathLike, fingerprint: Mapping[str, Any],
                      compute) -> Tuple[PairSet, Dict[str, Any]]:
  """The :class:`PairSet` in ``path`` when it was made with the same ``fingerprint``, else ``compute()``'s,
  written to ``path`` (local: through a temporary file renamed into place; a URI: one object written whole).
  Returns ``(pairs, info)`` (info: cached, bad_records, seconds)."""
  path = paths.resolve(path)
  found = read_embeddings(path, fingerprint)
  if found is not None:
    return found[0], {"cached": True, "bad_records": found[1], "seconds": 0.0}
  t0 = time.time()
  pairs, bad = compute()
  buffer = io.BytesIO()
  np.savez(buffer, fingerprint=np.array(json.dumps(dict(fingerprint), sort_keys=True)), bad_records=np.array(bad),
           **pairs.arrays())
  if paths.is_uri(path):
    paths.write_bytes(path, buffer.getvalue())
  else:
    tmp = paths.write_bytes(path.parent / (path.name + ".tmp"), buffer.getvalue())
    tmp.replace(path)
  return pairs, {"cached": False, "bad_records": int(bad), "seconds": round(time.time() - t0, 2)}


def shared_embeddings(path: paths.PathLike, fingerprint: Mapping[str, Any],
                      compute) -> Tuple[PairSet, Dict[str, Any]]:
  """:func:`cached_embeddings` on process 0; the other processes wait for it at a barrier and read the file it
  wrote or reused, so every process trains on the same embeddings. One process: ``cached_embeddings``."""
  if jax.process_index() == 0:
    out = cached_embeddings(path, fingerprint, compute)
  barrier(f"cost model: embeddings {path}")
  if jax.process_index() == 0:
    return out
  found = read_embeddings(path, fingerprint)
  if found is None:
    raise FileNotFoundError(
        f"process {jax.process_index()} cannot read the embeddings process 0 wrote to {path} (missing, or made "
        f"from other data or another CLIP): the workdir must be one every process sees, a gs:// bucket or a "
        f"shared filesystem (the checkpoints need that too); set --workdir accordingly")
  return found[0], {"cached": True, "bad_records": found[1], "seconds": 0.0}


def _clip_signature(clip: CLIPVisionModel) -> Dict[str, int]:
  cfg = clip.config
  return {k: int(getattr(cfg, k)) for k in ("projection_dim", "image_size", "patch_size", "hidden_size",
                                            "num_hidden_layers")}


def split_held_out(pairs: PairSet, fraction: float, seed: int) -> Tuple[PairSet, Optional[PairSet]]:
  """``(train, held-out)``: ``round(fraction * N)`` (at least 1) whole pairs chosen by a seeded permutation."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config data.eval_fraction = {fraction} must be in [0, 1)")
  if fraction == 0.0:
    return pairs, None
  n = len(pairs)
  n_eval = max(1, int(round(fraction * n)))
  if n_eval >= n:
    raise ValueError(f"config data.eval_fraction = {fraction} of {n} pairs leaves none to train on")
  perm = np.random.default_rng([int(seed), 0xE7A1]).permutation(n)
  return pairs.take(np.sort(perm[n_eval:])), pairs.take(np.sort(perm[:n_eval]))


def _flat(config_json: Mapping[str, Any], key: str):
  node = config_json
  for part in key.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return KeyError
    node = node[part]
  return node


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], directory: str) -> None:
  """Refuses to resume when a key that defines the pairs, labels or batches (``ORDER_KEYS``) changed."""
  for key in ORDER_KEYS:
    old, new = _flat(saved, key), _flat(current, key)
    if old is not KeyError and old != new:
      raise ValueError(f"the checkpoint in {directory} was saved with config {key} = {old!r}; this run has "
                       f"{new!r}: the resumed run would see other pairs, labels or batches. Use the saved value "
                       f"or a new workdir")


# -- the run ------------------------------------------------------------------------------------------------------


def train_cost_model(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> Dict[str, Any]:
  """Trains the safety cost model's adapter as the module docstring says; every process of a multi-process job
  calls it. Returns the summary (process 0's, the one in ``<workdir>/summary.json``)."""
  t_start = time.time()
  c = config
  root = paths.resolve(workdir)         # local made absolute once; gs:// as it is
  primary = jax.process_index() == 0
  device = jax.local_devices()[0]       # the adapter's state lives here, on every process alike
  progress = bool(c.train.progress) and primary
  clip, clip_params, clip_folder = load_clip(c, root)
  adapter = cost_lib.CostAdapter(hidden_sizes=tuple(c.model.hidden_sizes), activation=c.model.activation)
  model = cost_lib.SafetyCostModel(clip, adapter, clip_name=c.model.clip_name or clip_folder)
  resolution = int(c.data.resolution) or model.image_size
  train_source, eval_source = open_sources(c, root, resolution)

  # Embeddings, once (CLIP is frozen).
  def embeddings(source, name):
    fingerprint = {"version": EMBEDDINGS_VERSION, "files": [os.path.abspath(f) for f in source.files],
                   "num_records": [int(n) for n in source.num_records], "clip_folder": clip_folder,
                   "clip": _clip_signature(clip), "dtype": c.model.dtype, "resolution": resolution,
                   "skip_bad_records": bool(c.data.skip_bad_records), "mean": list(model.mean),
                   "std": list(model.std)}

    def compute():
      return embed_pairs(model, clip_params, source, resolution=resolution, batch_size=int(c.data.embed_batch_size),
                         seed=int(c.seed), skip_bad_records=bool(c.data.skip_bad_records), desc=f"embed {name}",
                         progress=progress)

    return shared_embeddings(root / "embeddings" / f"{name}.npz", fingerprint, compute)

  all_train, train_info = embeddings(train_source, "train")
  if eval_source is not None:
    train_pairs, (eval_pairs, eval_info) = all_train, embeddings(eval_source, "eval")
  else:
    train_pairs, eval_pairs = split_held_out(all_train, float(c.data.eval_fraction), int(c.seed))
    eval_info = None
  spec = train_source.spec
  where = c.data.train or "the synthetic pairs"
  rank_by = resolve_rule(c.labels.rank_by, spec.has_costs, "labels.rank_by", where)
  anchor_by = resolve_rule(c.labels.anchor_by, spec.has_costs, "labels.anchor_by", where)
  if eval_source is not None and "cost" in (rank_by, anchor_by) and not eval_source.spec.has_costs:
    raise ValueError(f"{c.data.eval} (data.eval) carries no costs, but the labels are made from costs "
                     f"(labels.rank_by = {rank_by!r}, labels.anchor_by = {anchor_by!r})")
  train_data = label_pairs(train_pairs, c.labels, rank_by, anchor_by)
  eval_data = label_pairs(eval_pairs, c.labels, rank_by, anchor_by) if eval_pairs is not None else None
  counts = train_data.counts()
  logging.info("labels: ranking by %s, anchoring by %s; train %s; held-out %s", rank_by, anchor_by, counts,
               eval_data.counts() if eval_data is not None else None)
  if not counts["ranking_pairs"]:
    raise ValueError(f"no ranking pairs in the training pairs of {where} under labels.rank_by = {rank_by!r} "
                     f"(labels.min_cost_gap = {c.labels.min_cost_gap}): check the costs or the rule")
  if not counts["harmful"] + counts["safe"]:
    raise ValueError(f"no anchor-labelled images in the training pairs of {where} under labels.anchor_by = "
                     f"{anchor_by!r} (labels.harmful_above = {c.labels.harmful_above}, labels.safe_below = "
                     f"{c.labels.safe_below})")
  if not counts["harmful"] or not counts["safe"]:
    logging.warning("the training images are all %s under labels.anchor_by = %r: the anchor term sees one class",
                    "harmful" if counts["harmful"] else "safe", anchor_by)
  batches = Batches(train_data, pairs_per_step=int(c.data.batch_size),
                    labelled_per_step=int(c.data.labelled_batch_size), balance=bool(c.data.balance_labels),
                    seed=int(c.seed))

  # State and step.
  tx, lr_schedule = optim.make_optimizer(c.optim)
  logging.info("optimizer: %s", optim.describe(c.optim))
  rng = jax.random.PRNGKey(int(c.seed))
  state = jax.device_put(cost_lib.create_cost_train_state(model, jax.random.fold_in(rng, 1),
                                                          anchor_weight=float(c.loss.alpha), tx=tx), device)
  step_fn = jax.jit(guard.skip_nonfinite(cost_lib.cost_train_step), donate_argnums=(0,))
  cost_fn = jax.jit(model.cost_from_embeddings)
  alpha = float(c.loss.alpha)

  # Resume.
  config_json = harness.config_dict(c)
  # The state is checkpointed as host numpy arrays (save, below), which Orbax writes from process 0 alone; a
  # host-local jax.Array held by several processes could not be saved. Restored as numpy, put back on `device`.
  ckpt = harness.open_checkpoints(c, root)
  latest = ckpt.latest_step()
  saved = ckpt.saved_config_or_none(latest) if latest is not None else None    # unreadable: set aside below
  if saved is not None:
    check_resume_config(saved, config_json, ckpt.directory)
  restored = harness.resume(ckpt, c, abstract_state=jax.device_get(state), rng=rng)
  if restored is not None:
    state, rng = jax.device_put((restored.state, restored.rng), device)
  start_step = int(state.step)

  def save(step: int) -> None:
    host_state = jax.device_get(state)
    check_same_state(host_state, step)
    ckpt.save(step, state=host_state, rng=rng, data_state=None, config=config_json)

  writer = harness.open_metrics(c, root, start_step)
  counter = guard.NonFiniteCounter(int(c.train.max_nonfinite_in_a_row))
  steps = int(c.train.steps)
  summary: Dict[str, Any] = {
      "workdir": str(root), "clip_folder": clip_folder, "start_step": start_step,
      "labels": {"rank_by": rank_by, "anchor_by": anchor_by, "min_cost_gap": float(c.labels.min_cost_gap),
                 "harmful_above": float(c.labels.harmful_above), "safe_below": float(c.labels.safe_below)},
      "train_data": {**counts, "embeddings": train_info},
      "eval_data": ({**eval_data.counts(), "source": "data.eval" if eval_source is not None else
                     f"data.eval_fraction = {c.data.eval_fraction}", "embeddings": eval_info or "split of train"}
                    if eval_data is not None else None),
  }
  if eval_data is not None:
    summary["eval_at_start"] = evaluate(cost_fn, state.params, eval_data, alpha)
    if start_step == 0:
      writer.write(0, summary["eval_at_start"])
  window, window_start, window_steps = [], time.time(), 0
  last_eval = summary.get("eval_at_start")
  last_train: Dict[str, float] = {}
  stopped_by_signal = False
  bar = tqdm(total=steps, initial=min(start_step, steps), desc="cost_model", disable=not progress, unit="step")
  with StopSignal() as stop, harness.saves_finished(ckpt, writer):
    step_index = start_step
    while step_index < steps:
      state, metrics = step_fn(state, None, batches(step_index), rng)
      window.append((step_index, metrics))
      step_index += 1
      window_steps += 1
      bar.update(1)
      last = step_index == steps
      stopped_by_signal = stop.requested(step_index)
      record: Dict[str, Any] = {}
      if step_index % int(c.train.log_every) == 0 or last or stopped_by_signal:     # a stop keeps its window
        host = _drain(window, counter)
        elapsed = time.time() - window_start
        last_train = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        record.update(last_train)
        record.update({"learning_rate": float(lr_schedule(step_index - 1)), "steps_per_s": window_steps / elapsed,
                       "pairs_per_s": window_steps * int(c.data.batch_size) / elapsed,
                       "skipped_updates_total": counter.total})
        bar.set_postfix(loss=f"{last_train['loss']:.4f}", rank_acc=f"{last_train['ranking_accuracy']:.2f}")
        window_start, window_steps = time.time(), 0
      if eval_data is not None and (step_index % int(c.train.eval_every) == 0 or last):
        last_eval = evaluate(cost_fn, state.params, eval_data, alpha)
        record.update(last_eval)
      if record:
        writer.write(step_index, record)
      if step_index % int(c.train.checkpoint_every) == 0 or last or stopped_by_signal:
        save(step_index)
      if stopped_by_signal:
        logging.warning("stopped by a signal after step %d; checkpoint saved, rerun to resume", step_index)
        break
    _drain(window, counter)
  bar.close()
  ckpt.close()
  summary.update({"final_step": int(state.step), "stopped_by_signal": stopped_by_signal, **harness.stop_fields(stop),
                  "skipped_updates": counter.total, "train_final": last_train})
  if eval_data is not None:
    summary["eval_final"] = last_eval
  if not stopped_by_signal and c.train.export:
    folder = root / "export"
    if primary:
      cost_lib.save_cost_model(str(folder), model, jax.device_get(state.params))
    summary["export"] = str(folder)
  writer.close()
  summary["wall_s"] = round(time.time() - t_start, 2)
  if primary:
    paths.write_json(root / "summary.json", summary)
  barrier("cost model: summary and export")
  return summary


def state_digest(host_state: Any) -> np.ndarray:
  """SHA-256 of every array of ``host_state`` (names, dtypes, shapes and bytes) as 32 uint8s."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return np.frombuffer(digest.digest(), np.uint8)


def check_same_state(host_state: Any, step: int) -> bool:
  """Several processes: whether every process holds the same train state as process 0 (a collective: all
  call it); a difference is logged as a warning naming the processes (the checkpoint and export hold process
  0's). True with one process."""
  if jax.process_count() == 1:
    return True
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digests = np.asarray(multihost_utils.process_allgather(state_digest(host_state))).reshape(jax.process_count(), -1)
  differing = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
  if differing:
    logging.warning("step %d: the cost-model train state of process(es) %s differs from process 0's, although "
                    "every process trains on the same embeddings and batches (a nondeterministic device "
                    "computation?); the checkpoint and the export hold process 0's", step, differing)
  return not differing


def _drain(window, counter: guard.NonFiniteCounter):
  """The window's step metrics on the host, each counted by the NaN guard's counter; empties the window."""
  host = []
  for index, metrics in window:
    values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    counter.update(index, values)
    host.append(values)
  window.clear()
  return host
