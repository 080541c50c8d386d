"""CLIP score as a reward: ``cos(CLIP_image(x), CLIP_text(c))`` (the quality term of ShieldDiff-style RL).

Both towers come from one CLIP checkpoint (``models.load_clip_text`` / ``models.load_clip_vision`` with
projections, e.g. from a full ``CLIPModel`` folder); images are preprocessed in JAX (``clip_preprocess``). The
reward is the plain cosine in [-1, 1] (the "CLIP score" of the literature is 100 x max(cos, 0)).
"""
from __future__ import annotations

import functools
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sc_dpo_jax.models.clip import CLIPTextModel, CLIPVisionModel
from sc_dpo_jax.models.tokenizer import Tokenizer
from sc_dpo_jax.rewards.clip_preprocess import preprocess


def l2_normalize(x):
  """``x`` in float32 divided by its L2 norm over the last axis (embeddings to unit length)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def clip_cosine(text_model: CLIPTextModel, vision_model: CLIPVisionModel, image_size: int, text_params,
                vision_params, images, input_ids) -> jax.Array:
  """``[B]`` cosine between each image (uint8 or [0, 1] NHWC, any size) and its tokenised prompt."""
  text = text_model.apply({"params": text_params}, input_ids).text_embeds
  pixels = preprocess(images, image_size)
  image = vision_model.apply({"params": vision_params}, pixels).image_embeds
  return jnp.sum(l2_normalize(text) * l2_normalize(image), axis=-1)


class ClipScore:
  """``reward(images_uint8, prompts) -> (cosines [B], {})`` with a projected CLIP text and vision tower."""

  def __init__(self, text_model: CLIPTextModel, text_params, vision_model: CLIPVisionModel, vision_params,
               tokenizer: Tokenizer):
    if not (text_model.with_projection and vision_model.with_projection):
      raise ValueError("ClipScore needs both CLIP towers with their projections (CLIPTextModelWithProjection, "
                       "CLIPVisionModelWithProjection or a full CLIPModel folder)")
    if text_model.config.projection_dim != vision_model.config.projection_dim:
      raise ValueError(f"text projection_dim {text_model.config.projection_dim} != vision projection_dim "
                       f"{vision_model.config.projection_dim}: the towers come from different CLIPs")
    self.text_model, self.text_params = text_model, text_params
    self.vision_model, self.vision_params = vision_model, vision_params
    self.tokenizer = tokenizer

  def __call__(self, images, prompts: Sequence[str]) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    if np.shape(images)[0] != len(prompts):
      raise ValueError(f"{np.shape(images)[0]} images for {len(prompts)} prompts")
    cos = clip_cosine(self.text_model, self.vision_model, int(self.vision_model.config.image_size),
                      self.text_params, self.vision_params, jnp.asarray(images), self.tokenizer(list(prompts)))
    return np.asarray(cos, np.float32), {}
