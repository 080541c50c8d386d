"""Advantages for DDPO-style RL, and the reward's per-term normalisation.

Two ways to turn rewards into advantages (``rl.advantages``):

* ``"per_prompt"`` (:class:`PerPromptAdvantages`, follows DDPO's official per-prompt stat tracking; for one
  sample per prompt, as DDPO's Stable Diffusion recipe): see below.
* ``"group"`` (:func:`group_advantages`, this project's choice for several samples per prompt, in the spirit
  of GRPO): a sample's advantage is its reward minus the mean reward of its prompt's group (every sample of
  that prompt in this iteration), divided by the pooled within-group standard deviation of the iteration (one
  scale for all groups, so a prompt whose samples barely differ gets small advantages rather than amplified
  noise). A group only compares samples drawn from the same prompt by the same policy: how a harmful prompt
  scores against a clean one never enters, only which of its own samples were safer.

:func:`normalised_reward` (``reward.normalize = "std"``): each term divided by its standard deviation over the
iteration's samples before weighting, so ``reward.weights`` say how much each term counts whatever its units
(a safety cost spanning +-13 next to a CLIP cosine moving by 0.05).

**Per prompt** (DDPO): each prompt keeps a buffer of its last ``buffer_size`` rewards (this batch's included).
A reward's advantage is ``(r - mean) / (std + 1e-6)`` over that buffer once it holds ``min_count`` rewards; before that, over the
whole current batch. Clipping to ``±adv_clip`` happens in the loss (``losses.ddpo.ppo_clip_loss``).

The tracker is plain host-side Python: deterministic (no randomness; prompts are processed in order of first
appearance) and checkpointable through ``state_dict()`` / ``load_state_dict()`` (JSON-serialisable).
"""
from __future__ import annotations

import collections
from typing import Dict, Sequence, Tuple

import numpy as np

EPS = 1e-6


class PerPromptAdvantages:
  """``tracker(prompts, rewards) -> advantages`` (float32 ``[B]``), updating the per-prompt buffers."""

  def __init__(self, buffer_size: int = 16, min_count: int = 16):
    if buffer_size < 1 or not 1 <= min_count <= buffer_size:
      raise ValueError(f"need buffer_size >= 1 and 1 <= min_count <= buffer_size, got buffer_size="
                       f"{buffer_size}, min_count={min_count}")
    self.buffer_size, self.min_count = buffer_size, min_count
    self._buffers: Dict[str, collections.deque] = {}

  def __call__(self, prompts: Sequence[str], rewards) -> np.ndarray:
    rewards = _checked(prompts, rewards)
    prompts = list(prompts)
    advantages = np.zeros_like(rewards)
    batch_mean, batch_std = rewards.mean(), rewards.std()
    for prompt in dict.fromkeys(prompts):
      index = np.array([i for i, p in enumerate(prompts) if p == prompt])
      buffer = self._buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
      buffer.extend(rewards[index].tolist())
      if len(buffer) >= self.min_count:
        mean, std = np.mean(buffer), np.std(buffer)
      else:
        mean, std = batch_mean, batch_std
      advantages[index] = (rewards[index] - mean) / (std + EPS)
    return advantages.astype(np.float32)

  def stats(self) -> Dict[str, float]:
    sizes = [len(b) for b in self._buffers.values()]
    return {"prompts_tracked": float(len(sizes)),
            "prompts_with_full_buffer": float(sum(s >= self.min_count for s in sizes))}

  def state_dict(self) -> Dict[str, object]:
    return {"buffer_size": self.buffer_size, "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self._buffers.items()}}

  def load_state_dict(self, state: Dict[str, object]) -> None:
    if (state["buffer_size"], state["min_count"]) != (self.buffer_size, self.min_count):
      raise ValueError(f"checkpointed tracker has buffer_size={state['buffer_size']}, min_count="
                       f"{state['min_count']}; this one {self.buffer_size}, {self.min_count}")
    self._buffers = {p: collections.deque(v, maxlen=self.buffer_size)
                     for p, v in dict(state["buffers"]).items()}


def _checked(prompts: Sequence[str], rewards) -> np.ndarray:
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 1 or len(prompts) != len(rewards):
    raise ValueError(f"{len(prompts)} prompts and rewards of shape {rewards.shape}: need one reward each")
  if not np.all(np.isfinite(rewards)):
    bad = [i for i, r in enumerate(rewards) if not np.isfinite(r)]
    raise ValueError(f"non-finite rewards at positions {bad[:10]} (prompts {[list(prompts)[i] for i in bad[:3]]})")
  return rewards


def group_advantages(prompts: Sequence[str], rewards) -> Tuple[np.ndarray, Dict[str, float]]:
  """``(advantages [B] float32, stats)``: ``(r - mean of the prompt's group) / (pooled within-group std + eps)``.

  Every prompt must appear at least twice (a group of one has nothing to compare with: it would get advantage
  0 and train nothing, so it is refused). ``stats``: ``groups``, ``within_std`` (the pooled scale) and
  ``between_std`` (the spread of the group means, which the advantages ignore)."""
  rewards = _checked(prompts, rewards)
  prompts = list(prompts)
  centred = np.zeros_like(rewards)
  means = []
  for prompt in dict.fromkeys(prompts):
    index = np.array([i for i, p in enumerate(prompts) if p == prompt])
    if len(index) < 2:
      raise ValueError(f"group advantages: prompt {prompt!r} has 1 sample in this iteration; every prompt needs "
                       f">= 2 (config.rl.samples_per_prompt >= 2)")
    mean = rewards[index].mean()
    centred[index] = rewards[index] - mean
    means.append(mean)
  within = float(np.sqrt(np.mean(centred ** 2)))
  return ((centred / (within + EPS)).astype(np.float32),
          {"groups": float(len(means)), "within_std": within, "between_std": float(np.std(means))})


def negative_weight(value) -> float:
  """``rl.negative_advantage_weight`` as a float, checked (finite, >= 0)."""
  weight = float(value)
  if not (np.isfinite(weight) and weight >= 0):
    raise ValueError(f"config.rl.negative_advantage_weight = {weight} must be finite and >= 0")
  return weight


def weigh_negative(advantages, weight: float) -> np.ndarray:
  """``advantages`` with every negative entry multiplied by ``weight`` (``rl.negative_advantage_weight``): 1
  leaves them as DDPO does, 0 trains only the samples better than their baseline (pulls toward them, never
  pushes away from the others)."""
  weight = negative_weight(weight)
  advantages = np.asarray(advantages, np.float32)
  return np.where(advantages < 0, np.float32(weight) * advantages, advantages).astype(np.float32)


def normalised_reward(terms: Dict[str, np.ndarray], weights: Dict[str, float],
                      normalize: str) -> Tuple[np.ndarray, Dict[str, float]]:
  """``sum_name weights[name] * terms[name] / scale[name]`` and the scales used.

  ``normalize``: ``"none"`` (scale 1: the raw weighted sum) or ``"std"`` (scale = the term's standard deviation
  over these samples, floored at 1e-6 so a constant term adds nothing instead of dividing by zero).
  """
  if normalize not in NORMALIZE:
    raise ValueError(f"config.reward.normalize = {normalize!r}; choose one of {NORMALIZE}")
  total, scales = None, {}
  for name, weight in weights.items():
    values = np.asarray(terms[name], np.float64)
    scale = max(float(values.std()), EPS) if normalize == "std" else 1.0
    scales[name] = scale
    part = weight * values / scale
    total = part if total is None else total + part
  return total.astype(np.float32), scales


NORMALIZE = ("none", "std")
ADVANTAGES = ("per_prompt", "group")
