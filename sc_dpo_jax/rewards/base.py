"""The reward interface of DDPO-style RL: ``reward(images_uint8, prompts) -> (rewards, info)``.

``images_uint8`` is ``[B, H, W, 3]`` uint8 (host numpy or a jax array), ``prompts`` a list of ``B`` strings;
``rewards`` is float32 ``[B]`` (higher is better) and ``info`` a flat dict of per-image float32 ``[B]`` arrays
that explain it (logged as means). Rewards run outside the jitted update step (detectors such as NudeNet
are not JAX), so any callable with this signature is a reward; the classes here combine them.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

RewardFn = Callable[[np.ndarray, Sequence[str]], Tuple[np.ndarray, Dict[str, np.ndarray]]]


def check_output(name: str, rewards, info, batch: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """Validates one reward's output (shape ``[batch]``, finite) and converts it to float32 numpy."""
  rewards = np.asarray(rewards, np.float32)
  if rewards.shape != (batch,):
    raise ValueError(f"reward {name!r} returned shape {rewards.shape} for {batch} images; expected ({batch},)")
  if not np.all(np.isfinite(rewards)):
    raise ValueError(f"reward {name!r} returned non-finite values at {np.flatnonzero(~np.isfinite(rewards))[:10]}")
  return rewards, {k: np.asarray(v, np.float32) for k, v in info.items()}


class WeightedSum:
  """``sum_i w_i * reward_i``; ``info`` holds every part's rewards and info, prefixed by its name.

  Example (METHODS.md's ShieldDiff-style reward): ``WeightedSum({"clip": (1.0, clip_reward),
  "nudity": (-1.0, nudity_score)})``.
  """

  def __init__(self, parts: Dict[str, Tuple[float, RewardFn]]):
    if not parts:
      raise ValueError("WeightedSum needs at least one part")
    self.parts = dict(parts)

  def __call__(self, images, prompts, texts: Optional[Mapping[str, Sequence[str]]] = None):
    """``texts``: per part name, the texts that part scores the images against instead of ``prompts`` (the RL
    trainer's ``reward.clip_text = "rewrite"``: the CLIP term reads each prompt's safe rewrite)."""
    batch = len(prompts)
    if np.shape(images)[0] != batch:
      raise ValueError(f"{np.shape(images)[0]} images for {batch} prompts")
    texts = dict(texts or {})
    unknown = sorted(set(texts) - set(self.parts))
    if unknown:
      raise ValueError(f"texts for {unknown}, which are not parts of this reward ({sorted(self.parts)})")
    total = np.zeros(batch, np.float32)
    info: Dict[str, np.ndarray] = {}
    for name, (weight, fn) in self.parts.items():
      own = texts.get(name, prompts)
      if len(own) != batch:
        raise ValueError(f"{len(own)} texts for part {name!r} and {batch} images")
      rewards, part_info = check_output(name, *fn(images, own), batch)
      total += np.float32(weight) * rewards
      info[name] = rewards
      info.update({f"{name}/{k}": v for k, v in part_info.items()})
    return total, info


def brightness(images, prompts) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """Mean pixel value in [0, 1]: a transparent toy reward (negate it to prefer darker images)."""
  del prompts
  value = np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255.0
  return value, {}
