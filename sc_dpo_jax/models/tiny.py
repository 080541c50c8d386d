"""A tiny Stable Diffusion pipeline with random weights, made without downloads or PyTorch.

    pipe = tiny_pipeline(seed=0)                       # 16-pixel images, 8x8x4 latents, 16-token prompts
    models.save_pipeline("workdir/tiny_sd", pipe)      # a diffusers folder like any other

For the tiny configs of the trainer (every method runs end to end on a CPU in seconds), for benchmarks of
the plumbing, and as the starting point the toy world pretrains. The tokenizer is a CLIP BPE tokenizer whose
vocabulary is single characters (no merges), so any lowercase prompt tokenizes without a vocabulary file.
"""
from __future__ import annotations

import string

import numpy as np

from sc_dpo_jax import diffusion
from sc_dpo_jax.models.clip import CLIPTextModel
from sc_dpo_jax.models.clip_config import tiny_text_config
from sc_dpo_jax.models.pipeline import StableDiffusion
from sc_dpo_jax.models.random_init import host_random_params
from sc_dpo_jax.models.tokenizer import Tokenizer
from sc_dpo_jax.models.unet import UNet2DConditionModel
from sc_dpo_jax.models.unet_config import tiny_config
from sc_dpo_jax.models.vae import AutoencoderKL
from sc_dpo_jax.models.vae_config import tiny_vae_config

TEXT_LENGTH = 16
TEXT_DIM = 32
CHARACTERS = string.ascii_lowercase + string.digits + ",.!'-"


def char_tokenizer(max_length: int = TEXT_LENGTH) -> Tokenizer:
  """A CLIP tokenizer that spells every word out character by character (ids: BOS 0, EOS/pad 1)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  for ch in CHARACTERS:
    vocab.setdefault(ch, len(vocab))
    vocab.setdefault(ch + "</w>", len(vocab))
  return Tokenizer(CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length), source="char_tokenizer")


def tiny_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", dtype=None) -> StableDiffusion:
  """Random tiny models: UNet (SD1-style, 8x8x4 latents), CLIP text encoder (2 layers, 32 wide, 16 tokens),
  VAE (2 levels, one downsampling: 16-pixel images), and SD's scaled-linear schedule with DDIM settings."""
  tokenizer = char_tokenizer()
  vocab_size = len(tokenizer.hf)
  text = CLIPTextModel(tiny_text_config(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, projection_dim=TEXT_DIM,
                                        max_position_embeddings=TEXT_LENGTH, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
  unet = UNet2DConditionModel(tiny_config(cross_attention_dim=TEXT_DIM))
  vae = AutoencoderKL(tiny_vae_config())
  kwargs = {} if dtype is None else {"dtype": dtype}
  if kwargs:
    text, unet, vae = (m.clone(**kwargs) for m in (text, unet, vae))
  params = {"unet": host_random_params(unet, seed), "text_encoder": host_random_params(text, seed + 1),
            "vae": host_random_params(vae, seed + 2)}
  # A small decoder output keeps decoded images in range; the encoder's logvar stays moderate.
  params["vae"] = _scale_leaf(params["vae"], ("decoder", "conv_out"), 0.2)
  schedule = diffusion.NoiseSchedule.from_config(
      {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
       "prediction_type": prediction_type, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
      source="tiny_pipeline")
  return StableDiffusion(unet=unet, text_encoder=text, vae=vae, tokenizer=tokenizer, schedule=schedule,
                         params=params, scheduler_class="DDIMScheduler")


def _scale_leaf(params, path, factor):
  node = params
  for key in path:
    node = node[key]
  node["kernel"] = node["kernel"] * np.float32(factor)
  return params
