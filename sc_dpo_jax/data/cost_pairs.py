"""The safety cost model's training data once embedded: the pair set, its labels, the held-out split and the
batches of each step, all host numpy (the trainer is ``train.cost_loop``; the embedding pass that makes a
:class:`PairSet` is ``train.cost_data``). Nothing here needs JAX, CLIP or a trainer.

Labels (:func:`label_splits`; the rule is in ``labels.*`` and in the run's ``summary.json``):

* ranking pairs (more harmful, less harmful), ``labels.rank_by`` (:func:`ranking_pairs`): ``"cost"``: ordered by
  the stored costs, the higher-cost image is the more harmful one; pairs whose costs differ by less than
  ``labels.min_cost_gap`` (and ties) give no ranking pair. ``"preference"``: the rejected image is the more
  harmful one, for the pairs under harmful prompts when the records carry the ``harmful_prompt`` flag (under
  clean prompts the rejected image is worse, not more harmful), for every pair when they do not. ``"auto"``
  (default): ``"cost"`` when the records carry costs, else ``"preference"``.
* anchor labels (+1 harmful, -1 safe, or none), ``labels.anchor_by`` (:func:`anchor_labels`): ``"cost"``:
  harmful when ``cost > labels.harmful_above``, safe when ``cost < labels.safe_below``, no label in between.
  ``"preference"``: under a harmful prompt the rejected image is harmful and the chosen one safe; under a clean
  prompt both are safe (METHODS.md: clean-prompt pairs are quality pairs of safe images); without the
  ``harmful_prompt`` flag every rejected image is harmful and every chosen one safe. ``"auto"``: ``"cost"`` when
  the records carry costs, else ``"preference"``.

Held-out set without a second dataset (:func:`split_held_out`): ``data.eval_fraction`` of the pairs, chosen by a
seeded permutation (whole pairs, so no image of a held-out pair is trained on). Batches (:class:`Batches`): each
step takes ``data.batch_size`` ranking pairs and ``data.labelled_batch_size`` labelled images (half harmful,
half safe with ``data.balance_labels``), each stream walking seeded permutations epoch after epoch
(:class:`EpochSampler`): a batch is a pure function of ``(seed, step)``, so the data position of a checkpoint is
its step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import numpy as np
from absl import logging

RULES = ("auto", "cost", "preference")


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


# -- labels -------------------------------------------------------------------------------------------------------


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


def label_splits(train: PairSet, held_out: Optional[PairSet], labels_config, *, has_costs: bool, where: str,
                 held_out_costs: Optional[bool] = None, held_out_where: Any = None
                 ) -> Tuple[Labelled, Optional[Labelled], str, str]:
  """``(train, held-out or None, rank_by, anchor_by)``: both splits labelled by the rules of ``labels_config``
  resolved for the training records (``has_costs``; ``where`` names them). ``held_out_costs``: whether a
  separate held-out dataset (``held_out_where``, data.eval) carries costs; None for a split of the training
  pairs. Refuses a training split without ranking pairs or anchor labels; warns when its anchors are one class."""
  rank_by = resolve_rule(labels_config.rank_by, has_costs, "labels.rank_by", where)
  anchor_by = resolve_rule(labels_config.anchor_by, has_costs, "labels.anchor_by", where)
  if held_out_costs is not None and "cost" in (rank_by, anchor_by) and not held_out_costs:
    raise ValueError(f"{held_out_where} (data.eval) carries no costs, but the labels are made from costs "
                     f"(labels.rank_by = {rank_by!r}, labels.anchor_by = {anchor_by!r})")
  train_data = label_pairs(train, labels_config, rank_by, anchor_by)
  eval_data = label_pairs(held_out, labels_config, rank_by, anchor_by) if held_out is not None else None
  counts = train_data.counts()
  logging.info("labels: ranking by %s, anchoring by %s; train %s; held-out %s", rank_by, anchor_by, counts,
               eval_data.counts() if eval_data is not None else None)
  if not counts["ranking_pairs"]:
    raise ValueError(f"no ranking pairs in the training pairs of {where} under labels.rank_by = {rank_by!r} "
                     f"(labels.min_cost_gap = {labels_config.min_cost_gap}): check the costs or the rule")
  if not counts["harmful"] + counts["safe"]:
    raise ValueError(f"no anchor-labelled images in the training pairs of {where} under labels.anchor_by = "
                     f"{anchor_by!r} (labels.harmful_above = {labels_config.harmful_above}, labels.safe_below = "
                     f"{labels_config.safe_below})")
  if not counts["harmful"] or not counts["safe"]:
    logging.warning("the training images are all %s under labels.anchor_by = %r: the anchor term sees one class",
                    "harmful" if counts["harmful"] else "safe", anchor_by)
  return train_data, eval_data, rank_by, anchor_by


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
  """``batches(step)``: the step's batch of embeddings for ``train.cost_steps.cost_train_step`` (see
  :class:`EpochSampler`)."""

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
