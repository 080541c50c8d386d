"""The RL trainer's reward as named terms: ``r = sum_name reward.weights[name] * term[name](image, prompt)``.

    reward = make_reward(config, pipe)          # a rewards.WeightedSum of the terms with non-zero weight
    rewards, info = reward(images_uint8, prompts)

:data:`REWARD_TERMS` maps each name of ``config.reward.weights`` to a builder ``(config, pipe, cache) ->
reward function``; a term with weight 0 is not loaded. Terms: ``clip_score`` (``rewards.ClipScore``, the
quality term), ``safety_cost`` (``rewards.CostReward``: higher is more harmful, so it takes a negative weight)
and ``nudity`` (``rewards.NudityReward``: NudeNet's score, negative weight too). A new detector is one more
builder here and one more name in the RL config's ``reward.weights``.

A ``tiny`` run (``model.tiny``) without CLIP or cost-model folders uses a random tiny CLIP pair and a random
cost adapter on its vision tower: PLUMBING ONLY, those rewards mean nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import ml_collections
import numpy as np
from absl import logging

from sc_dpo_jax import models
from sc_dpo_jax.models.clip import CLIPTextModel, CLIPVisionModel
from sc_dpo_jax.models.clip_config import tiny_text_config, tiny_vision_config
from sc_dpo_jax.models.random_init import host_random_params
from sc_dpo_jax.rewards.base import RewardFn, WeightedSum
from sc_dpo_jax.rewards.clip_score import ClipScore
from sc_dpo_jax.rewards.cost_model import CostAdapter, CostReward, SafetyCostModel, load_cost_model
from sc_dpo_jax.rewards.nudenet import NudityReward


def tiny_clip(seed: int, tokenizer) -> Dict[str, Any]:
  """A random tiny CLIP pair (projected text and vision towers) that reads the tiny pipeline's tokens: the
  tiny run's stand-in for a real CLIP. Its scores are meaningless; it only exercises the reward's plumbing."""
  text = CLIPTextModel(tiny_text_config(vocab_size=len(tokenizer.hf), max_position_embeddings=tokenizer.max_length,
                                        eos_token_id=1, bos_token_id=0, pad_token_id=1), with_projection=True)
  vision = CLIPVisionModel(tiny_vision_config(), with_projection=True)
  return {"text_model": text, "text_params": host_random_params(text, seed + 11), "vision_model": vision,
          "vision_params": host_random_params(vision, seed + 12), "tokenizer": tokenizer, "name": "tiny-random-clip"}


def _clip(config: ml_collections.ConfigDict, pipe, cache: Dict[str, Any]) -> Dict[str, Any]:
  """The CLIP of the reward (loaded once and shared by the terms that need it)."""
  if "clip" in cache:
    return cache["clip"]
  folder = config.reward.clip_folder
  if folder:
    text, text_params = models.load_clip_text(folder)
    vision, vision_params = models.load_clip_vision(folder)
    cache["clip"] = {"text_model": text, "text_params": text_params, "vision_model": vision,
                     "vision_params": vision_params, "tokenizer": models.load_tokenizer(folder), "name": folder}
  elif config.model.tiny:
    cache["clip"] = tiny_clip(int(config.seed), pipe.tokenizer)
  else:
    raise ValueError("config.reward.clip_folder is empty: set it to a CLIPModel folder (both towers with "
                     "projections and the tokenizer files, e.g. openai/clip-vit-large-patch14), or set the "
                     "weights of the terms that need it (reward.weights.clip_score) to 0")
  return cache["clip"]


def clip_score_term(config: ml_collections.ConfigDict, pipe, cache: Dict[str, Any]) -> RewardFn:
  """``clip_score``: cosine of the CLIP image and prompt embeddings (the quality term)."""
  m = _clip(config, pipe, cache)
  return ClipScore(m["text_model"], m["text_params"], m["vision_model"], m["vision_params"], m["tokenizer"])


def safety_cost_term(config: ml_collections.ConfigDict, pipe, cache: Dict[str, Any]) -> RewardFn:
  """``safety_cost``: the safety cost model's cost (higher = more harmful; weight it negatively)."""
  r = config.reward
  if r.cost_model_folder:
    clip_folder = r.cost_clip_folder or r.clip_folder
    if not clip_folder:
      raise ValueError(f"config.reward.cost_model_folder = {r.cost_model_folder} needs the CLIP vision tower it "
                       f"was trained on: set config.reward.cost_clip_folder (or reward.clip_folder)")
    model, params = load_cost_model(r.cost_model_folder, clip_folder)
  elif config.model.tiny:
    m = _clip(config, pipe, cache)
    model = SafetyCostModel(m["vision_model"], CostAdapter(hidden_sizes=(16,)), clip_name=m["name"])
    params = {"clip": m["vision_params"], "adapter": model.init_adapter(jax.random.PRNGKey(int(config.seed) + 13))}
  else:
    raise ValueError("config.reward.cost_model_folder is empty: set it to a safety cost model folder "
                     "(python -m sc_dpo_jax.main --config=configs/cost_model.py trains one), or set "
                     "reward.weights.safety_cost to 0")
  return CostReward(model, params)


def nudity_term(config: ml_collections.ConfigDict, pipe, cache: Dict[str, Any]) -> RewardFn:
  """``nudity``: NudeNet's nudity score in [0, 1], the highest score among ``reward.nudenet_classes`` (0 when
  none is detected). Higher means MORE nudity, so give it a negative weight (``reward.weights.nudity=-1``), as
  ``safety_cost``: the total reward is then higher for safer images. ``reward.nudenet_threshold`` only sets the
  logged ``nudity/flag`` (the share of images at or above it); the reward is the continuous score."""
  del pipe, cache
  r = config.reward
  return NudityReward(classes=tuple(r.nudenet_classes), threshold=float(r.nudenet_threshold),
                      model_path=r.nudenet_model_path or None)


# name -> builder(config, pipe, cache) -> reward function.
REWARD_TERMS: Dict[str, Callable[..., RewardFn]] = {
    "clip_score": clip_score_term,
    "safety_cost": safety_cost_term,
    "nudity": nudity_term,
}


def reward_weights(config: ml_collections.ConfigDict) -> Dict[str, float]:
  """The terms of ``reward.weights`` with a non-zero weight, checked (errors name the key)."""
  out = {}
  for name, weight in config.reward.weights.items():
    if name not in REWARD_TERMS:
      raise ValueError(f"config.reward.weights.{name}: no reward term of that name; known: {sorted(REWARD_TERMS)}")
    weight = float(weight)
    if not np.isfinite(weight):
      raise ValueError(f"config.reward.weights.{name} = {weight} is not finite")
    if weight != 0.0:
      out[name] = weight
  if not out:
    raise ValueError("every config.reward.weights is 0: the reward would be constant")
  return out


def make_reward(config: ml_collections.ConfigDict, pipe) -> WeightedSum:
  """``reward.weights`` as a ``rewards.WeightedSum`` of the named terms (weight 0: the term is not loaded)."""
  cache: Dict[str, Any] = {}
  parts = {name: (weight, REWARD_TERMS[name](config, pipe, cache)) for name, weight in reward_weights(config).items()}
  logging.info("reward: %s", " + ".join(f"{w:g} * {n}" for n, (w, _) in parts.items()))
  return WeightedSum(parts)
