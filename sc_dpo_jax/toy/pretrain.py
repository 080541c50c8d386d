"""Pretrains the toy world's base model on a CPU: a tiny VAE, a tiny CLIP and a tiny text-to-image UNet.

    python -m sc_dpo_jax.toy.pretrain --out=workdir/toy_base            # the full run: about 10 min on 2 idle cores
    python -m sc_dpo_jax.toy.pretrain --out=/tmp/toy_quick --quick      # a few steps of each stage (plumbing)

    folder = pretrain.pretrained_folder()                 # the shipped result: pipeline/, clip/, report
    pipe = models.load_pipeline(os.path.join(folder, "pipeline"))
    images = pipe.generate(["a large ruby circle"], steps=20, guidance=4.0)

Every step draws fresh (scene, caption) pairs from ``world.sample`` and renders them (``world.render_batch``);
the captions use every colour word, held-out synonyms included, and every object, so the base model knows all
the ways to the unsafe colour, as a real base model does. Stages, each in JAX with its own jitted step:

a. **VAE** (``AutoencoderKL``, 16 px -> 8x8x4 latents): reconstruction MSE plus a small KL to N(0, 1), AdamW.
   ``scaling_factor`` = 1 / std of the posterior samples of a fresh batch, as Stable Diffusion's was chosen.
b. **CLIP** (text tower on the word tokenizer, 16 tokens; vision tower on 16 px with 4 px patches;
   projections; a learnable temperature): InfoNCE where every caption that describes an image is a positive
   (captions name a subset of colour, shape, size and position, and synonyms name the same colour, so one
   caption fits several images of a batch; targets spread over them). Images are lightly blurred and noised
   so that the vision tower also reads a diffusion model's softer images. Three quarters of each batch are
   groups of four scenes that differ only in position, captioned with their positions
   (``draw_position_groups``): without these hard negatives CLIP ignores position words, and so does a UNet
   conditioned on its text states (measured: positions followed 0.20 of the time, chance).
c. **UNet** (``UNet2DConditionModel`` on 8x8x4 latents) conditioned on the frozen CLIP text tower's last
   hidden states: epsilon prediction on SD's scaled-linear schedule (1000 steps), the loss weighted by
   min(SNR, 5) / SNR (min-SNR weighting), 10% empty prompts for classifier-free guidance, AdamW with warm-up and
   cosine decay.

Then it writes ``OUT/pipeline`` (a diffusers ``StableDiffusionPipeline`` folder with a DDIM scheduler and the word
tokenizer), ``OUT/clip`` (a transformers ``CLIPModel`` folder with the tokenizer and an image-processor config:
the toy CLIP for ``rewards.ClipScore`` and ``rewards.load_cost_model``) and ``OUT/pretrain_report.json``: the
architecture, steps and seconds of each stage, the VAE's reconstruction error and colour fidelity, CLIP's
retrieval accuracies and synonym cosines, and the base model judged on ``world.prompt_sets()`` (unsafe rate of
each unsafe set, retention of the safe set) by ``toy.judge``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import shutil
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import traverse_util
from tqdm import tqdm

from sc_dpo_jax import diffusion
from sc_dpo_jax.models import weights
from sc_dpo_jax.models.clip import CLIPTextModel, CLIPVisionModel
from sc_dpo_jax.models.clip_config import CLIPTextConfig, CLIPVisionConfig
from sc_dpo_jax.models.clip_io import CLIP_CONTAINERS
from sc_dpo_jax.models.pipeline import StableDiffusion, save_pipeline
from sc_dpo_jax.models.tokenizer import Tokenizer
from sc_dpo_jax.models.unet import UNet2DConditionModel
from sc_dpo_jax.models.unet_config import UNetConfig, tiny_config
from sc_dpo_jax.models.vae import AutoencoderKL
from sc_dpo_jax.models.vae_config import VAEConfig, tiny_vae_config
from sc_dpo_jax.rewards.clip_preprocess import CLIP_MEAN, CLIP_STD, preprocess
from sc_dpo_jax.toy import judge as judge_lib
from sc_dpo_jax.toy import tokenizer as tokenizer_lib
from sc_dpo_jax.toy import world as world_lib

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "base")
REPORT_NAME = "pretrain_report.json"
PRETRAIN_COMMAND = "python -m sc_dpo_jax.toy.pretrain --out=DIR"

TEXT_LENGTH = 16
TEXT_DIM = 64          # CLIP text width = the UNet's cross_attention_dim
EMBED_DIM = 64         # CLIP's projection_dim (the cost model's input)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
                    "set_alpha_to_one": False, "steps_offset": 1}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one pretraining run does (``FULL`` or ``QUICK``; flags override single fields).

  On a 2-core CPU these tiny networks are bound by per-operation overheads, not arithmetic, so small batches
  and many steps learn the most per second (measured: the VAE reaches a lower error with 1600 steps of 8 images
  than with 400 steps of 32 in the same time; the UNet learns shapes far better at a learning rate of 2e-3 or 3e-3
  with Adam's b2 = 0.99 than at 1e-3 and 0.999, and an EMA of its weights did not help, so there is none).
  """
  vae_steps: int = 1600
  vae_batch: int = 8
  vae_lr: float = 3e-3
  kl_weight: float = 1e-3           # times the mean KL per latent element, next to the per-pixel MSE
  clip_steps: int = 2000
  clip_batch: int = 64
  clip_lr: float = 2e-3
  clip_position_groups: float = 0.75  # share of each CLIP batch drawn as groups of scenes that differ only in position
  clip_group: int = 4                 # scenes per such group (distinct positions, captions that name them)
  unet_steps: int = 6000
  unet_batch: int = 32
  unet_lr: float = 3e-3
  unet_warmup: int = 200
  unet_b2: float = 0.99
  unet_channels: Tuple[int, ...] = (32, 64)
  min_snr_gamma: float = 5.0        # loss weight min(SNR, gamma) / SNR (Hang et al. 2023); 0: plain MSE
  prompt_dropout: float = 0.1       # share of empty prompts (classifier-free guidance)
  heldout: int = 512                # fresh draws for the VAE and CLIP measurements
  eval_images: int = 96             # images per unsafe set in the final evaluation (safe sets: twice as many)
  sample_steps: int = 20
  guidance: float = 4.0
  fast_compile: bool = False        # XLA without its expensive optimisations: compiles in half the time, runs slower


FULL = Settings()
QUICK = Settings(vae_steps=3, vae_batch=4, clip_steps=3, clip_batch=8, unet_steps=3, unet_batch=4, unet_warmup=1,
                 heldout=16, eval_images=8, sample_steps=4, fast_compile=True)
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------------------------------------- architecture
def vae_config(scaling_factor: float = 1.0) -> VAEConfig:
  """16-pixel images <-> 8x8x4 latents (two levels, one downsampling)."""
  return tiny_vae_config(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16,
                         latent_channels=4, scaling_factor=float(scaling_factor))


def clip_text_config(vocab_size: int) -> CLIPTextConfig:
  """Three layers, 64 wide, 16 tokens; ids as ``toy.tokenizer`` assigns them (BOS 0, EOS and padding 1)."""
  return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
                        projection_dim=EMBED_DIM, num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=TEXT_LENGTH, hidden_act="quick_gelu", eos_token_id=1,
                        bos_token_id=0, pad_token_id=1)


def clip_vision_config() -> CLIPVisionConfig:
  """Three layers, 64 wide, on 16-pixel images in 4-pixel patches (16 patches and a class token)."""
  return CLIPVisionConfig(hidden_size=64, intermediate_size=256, projection_dim=EMBED_DIM, num_hidden_layers=3,
                          num_attention_heads=4, num_channels=3, image_size=world_lib.RESOLUTION, patch_size=4,
                          hidden_act="quick_gelu")


def unet_config(channels: Sequence[int] = FULL.unet_channels) -> UNetConfig:
  """SD1-style UNet on 8x8x4 latents: cross-attention at 8x8 and in the 4x4 middle block."""
  channels = tuple(int(c) for c in channels)
  return tiny_config(block_out_channels=channels, attention_head_dim=(4, 4), norm_num_groups=8,
                     cross_attention_dim=TEXT_DIM, layers_per_block=(1, 1))


def count_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def init_params(module: nn.Module, inputs: Sequence, seed: int) -> Dict:
  """Fresh parameters drawn with numpy (``jit(init)`` of a UNet compiles for many seconds on a CPU): kernels
  LeCun-normal (variance 1 / fan-in), biases 0, norm scales 1, embeddings N(0, 0.02^2) as CLIP's."""
  abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"])
  rng = np.random.RandomState(seed)
  flat = {}
  for path, leaf in sorted(traverse_util.flatten_dict(abstract).items()):
    if path[-1] == "kernel":
      value = rng.randn(*leaf.shape) / np.sqrt(max(int(np.prod(leaf.shape[:-1])), 1))
    elif path[-1] == "scale":
      value = np.ones(leaf.shape)
    elif path[-1] == "bias":
      value = np.zeros(leaf.shape)
    else:   # token/position embeddings, the class embedding
      value = 0.02 * rng.randn(*leaf.shape)
    flat[path] = jnp.asarray(value.astype(leaf.dtype))
  return traverse_util.unflatten_dict(flat)


def schedule() -> diffusion.NoiseSchedule:
  return diffusion.NoiseSchedule.from_config(SCHEDULER_CONFIG, source="toy.pretrain")


# ------------------------------------------------------------------------------------------------------ data
def draw(world: world_lib.World, rng: np.random.Generator, n: int):
  """``n`` fresh pretraining draws: (scenes, captions, uint8 images [n, 16, 16, 3])."""
  scenes, captions = world.sample(rng, n)
  return scenes, captions, world_lib.render_batch(scenes)


def draw_position_groups(world: world_lib.World, rng: np.random.Generator, n: int, group: int):
  """``n`` draws made of groups of ``group`` scenes that differ only in position (and jitter and background),
  each captioned by a template that names its position: hard negatives for CLIP. In a batch of plain draws two
  scenes that differ only in position are rare, so a contrastive model learns colour, shape and size and
  ignores position (the first shipped CLIP did: its text embeddings of "on the left" and "on the right" had a
  cosine of 0.999). Returns ``(scenes, captions, images)`` as ``draw``."""
  placed = [t for t in world_lib.TEMPLATES if "{position}" in t]
  scenes, captions = [], []
  while len(scenes) < n:
    base = world.random_scene(rng)
    words = world.color_words(base.color)
    for position in rng.permutation(list(world_lib.POSITIONS))[:group]:
      scene = dataclasses.replace(world.random_scene(rng, color=base.color, shape=base.shape), size=base.size,
                                  position=str(position))
      scenes.append(scene)
      captions.append(world.caption_with(scene, placed[rng.integers(len(placed))], words[rng.integers(len(words))]))
  scenes, captions = scenes[:n], captions[:n]
  return scenes, captions, world_lib.render_batch(scenes)


class CachedIds:
  """``tokenizer(captions)`` with each distinct caption tokenised once (captions repeat: a few thousand
  exist), for the training loops."""

  def __init__(self, tok: Tokenizer):
    self.tok, self.cache = tok, {}

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    missing = sorted(set(captions) - set(self.cache))
    if missing:
      self.cache.update(zip(missing, self.tok(missing)))
    return np.stack([self.cache[c] for c in captions])


def prefetched(make, steps: int):
  """``make()`` called ``steps`` times in a background thread, one call ahead of the consumer (rendering and
  tokenising overlap the jitted step, which releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(make)
    for i in range(steps):
      batch = future.result()
      if i + 1 < steps:
        future = pool.submit(make)
      yield batch


def to_signed(images: jax.Array) -> jax.Array:
  """uint8 images -> float32 in [-1, 1] (the VAE's input scale)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


_ATTRIBUTES = ("color", "shape", "size", "position")
_OBJECTS = {obj: (color, shape) for color, objects in world_lib.OBJECTS.items() for obj, shape in objects.items()}


@functools.lru_cache(maxsize=None)
def caption_attributes(caption: str, world: world_lib.World = world_lib.DEFAULT) -> Dict[str, str]:
  """What a world caption states: ``color``, ``shape`` and, when named, ``size`` and ``position``."""
  text = caption.lower()
  out = {}
  for obj, (color, shape) in _OBJECTS.items():
    if re.search(rf"\b{obj}\b", text):
      out.update(color=color, shape=shape)
  for word in text.split():
    for color in world_lib.COLORS:
      if word in world.color_words(color):
        out["color"] = color
    if word in world_lib.SHAPES:
      out["shape"] = word
    if word in world_lib.SIZES:
      out["size"] = word
    if word in world_lib.POSITIONS:
      out["position"] = word
  if "color" not in out or "shape" not in out:
    raise ValueError(f"caption {caption!r} names no colour and shape of the world")
  return out


def fit_matrix(captions: Sequence[str], scenes: Sequence[world_lib.Scene]) -> np.ndarray:
  """float32 ``[len(captions), len(scenes)]``: 1 where the caption describes the scene (every attribute it
  states holds)."""
  out = np.ones((len(captions), len(scenes)), bool)
  attrs = [caption_attributes(c) for c in captions]
  for key in _ATTRIBUTES:
    stated = np.array([a.get(key, "") for a in attrs])
    actual = np.array([getattr(s, key) for s in scenes])
    out &= (stated[:, None] == "") | (stated[:, None] == actual[None, :])
  return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------- training
def _optimizer(lr: float, steps: int, warmup: int, weight_decay: float = 1e-2, b2: float = 0.999):
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=b2, weight_decay=weight_decay))


def _jit(fn, s: Settings, **kwargs):
  """``jax.jit`` with ``FAST_COMPILE_OPTIONS`` when ``s.fast_compile``."""
  return jax.jit(fn, compiler_options=FAST_COMPILE_OPTIONS if s.fast_compile else None, **kwargs)


def _bar(steps: int, desc: str, progress: bool):
  return tqdm(range(steps), desc=desc, unit="step", disable=not progress, dynamic_ncols=True)


def _postfix(bar, metrics: Mapping[str, Any]):
  bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()}, refresh=False)


def train_vae(world: world_lib.World, s: Settings, seed: int, progress: bool):
  """Stage a: ``(vae, params, report)``; ``vae.config.scaling_factor`` is set from the trained latents."""
  vae = AutoencoderKL(vae_config())
  params = init_params(vae, vae.dummy_inputs(size=world_lib.RESOLUTION), seed)
  tx = _optimizer(s.vae_lr, s.vae_steps, warmup=min(100, s.vae_steps // 10))
  opt = tx.init(params)

  @functools.partial(_jit, s=s)
  def step(params, opt, images, rng):
    x = to_signed(images)

    def loss_fn(p):
      post = vae.apply({"params": p}, x, method="encode")
      recon = vae.apply({"params": p}, post.sample(rng), method="decode")
      mse = jnp.mean(jnp.square(recon - x))
      kl = jnp.mean(post.kl()) / np.prod(post.mean.shape[1:])
      return mse + s.kl_weight * kl, {"mse": mse, "kl": kl}

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, metrics

  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  start = time.time()
  bar = _bar(s.vae_steps, "vae", progress)
  batches = prefetched(lambda: draw(world, rng, s.vae_batch)[2], s.vae_steps)
  for i, images in zip(bar, batches):
    params, opt, metrics = step(params, opt, images, jax.random.fold_in(key, i))
    if i % 20 == 0 or i == s.vae_steps - 1:
      _postfix(bar, metrics)
  seconds = time.time() - start

  # Held-out draws: the scaling factor, the reconstruction error, and whether colours and shapes survive.
  scenes, _, images = draw(world, np.random.default_rng(seed + 10_000), s.heldout)

  def encode_decode(p, x, r):
    z = vae.apply({"params": p}, to_signed(x), method="encode").sample(r)
    return z, vae.apply({"params": p}, z, method="decode")

  latents, recon = (np.asarray(a) for a in _jit(encode_decode, s)(params, images, jax.random.PRNGKey(seed + 1)))
  scaling_factor = float(1.0 / np.std(latents))
  recon_u8 = np.round(np.clip(recon / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
  target = images.astype(np.float32) / 127.5 - 1
  mse = float(np.mean(np.square(recon - target)))
  vae = AutoencoderKL(vae_config(scaling_factor))
  readings = judge_lib.read(recon_u8)
  red = np.array([sc.color == world.unsafe for sc in scenes])
  flags_, _ = judge_lib.Detector(world.unsafe)(recon_u8)
  report = {"steps": s.vae_steps, "batch": s.vae_batch, "seconds": round(seconds, 1), "parameters":
            count_params(params), "scaling_factor": scaling_factor, "latent_mean": float(np.mean(latents)),
            "heldout_images": len(scenes), "recon_mse": mse, "recon_rmse_grey_levels": float(np.sqrt(mse) * 127.5),
            "recon_color_accuracy": float(np.mean([r.color == sc.color for r, sc in zip(readings, scenes)])),
            "recon_shape_accuracy": float(np.mean([r.shape == sc.shape for r, sc in zip(readings, scenes)])),
            "recon_unsafe_detection": float(np.mean(flags_ == red))}
  return vae, params, report


def clip_images(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Training augmentation of the CLIP images (uint8 -> [0, 1] float): a random blur of up to a 3x3 box and
  Gaussian noise of up to 6 grey levels, so that soft generated images read as rendered ones do."""
  x = images.astype(jnp.float32) / 255.0
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  blurred = sum(padded[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9.0
  amount = jax.random.uniform(k1, (x.shape[0], 1, 1, 1)) * (jax.random.uniform(k2, (x.shape[0], 1, 1, 1)) < 0.5)
  x = x + amount * (blurred - x)
  x = x + jax.random.uniform(k3, (x.shape[0], 1, 1, 1), maxval=6 / 255) * jax.random.normal(k4, x.shape)
  return jnp.clip(x, 0.0, 1.0)


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def train_clip(world: world_lib.World, tok: Tokenizer, s: Settings, seed: int, progress: bool):
  """Stage b: ``(text, vision, params, report)``; ``params = {"text", "vision", "logit_scale"}``."""
  text = CLIPTextModel(clip_text_config(len(tok.hf)), with_projection=True)
  vision = CLIPVisionModel(clip_vision_config(), with_projection=True)
  params = {"text": init_params(text, text.dummy_inputs(), seed),
            "vision": init_params(vision, vision.dummy_inputs(), seed + 1),
            "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
  tx = _optimizer(s.clip_lr, s.clip_steps, warmup=min(100, s.clip_steps // 10))
  opt = tx.init(params)
  size = world_lib.RESOLUTION

  def embed(p, ids, pixels):
    t = _unit(text.apply({"params": p["text"]}, ids).text_embeds)
    v = _unit(vision.apply({"params": p["vision"]}, pixels).image_embeds)
    return t, v

  @functools.partial(_jit, s=s)
  def step(params, opt, ids, images, fit, rng):
    pixels = preprocess(clip_images(images, rng), size)

    def loss_fn(p):
      t, v = embed(p, ids, pixels)
      logits = jnp.exp(jnp.minimum(p["logit_scale"], np.log(100.0))) * t @ v.T     # [text, image]
      t2i = -jnp.sum(fit / fit.sum(1, keepdims=True) * jax.nn.log_softmax(logits, axis=1), axis=1)
      i2t = -jnp.sum(fit / fit.sum(0, keepdims=True) * jax.nn.log_softmax(logits, axis=0), axis=0)
      return (jnp.mean(t2i) + jnp.mean(i2t)) / 2, {"temperature": 1 / jnp.exp(p["logit_scale"])}

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, dict(metrics, loss=loss)

  rng = np.random.default_rng(seed + 1)
  key = jax.random.PRNGKey(seed + 1)
  start = time.time()
  bar = _bar(s.clip_steps, "clip", progress)
  ids = CachedIds(tok)

  grouped = int(round(s.clip_batch * s.clip_position_groups))

  def make():
    scenes, captions, images = draw(world, rng, s.clip_batch - grouped)
    if grouped:
      more = draw_position_groups(world, rng, grouped, s.clip_group)
      scenes, captions = list(scenes) + list(more[0]), list(captions) + list(more[1])
      images = np.concatenate([images, more[2]])
    return ids(captions), images, fit_matrix(captions, scenes)

  for i, batch in zip(bar, prefetched(make, s.clip_steps)):
    params, opt, metrics = step(params, opt, *batch, jax.random.fold_in(key, i))
    if i % 20 == 0 or i == s.clip_steps - 1:
      _postfix(bar, metrics)
  seconds = time.time() - start

  # Held-out retrieval: the retrieved caption (image) must describe the query image (fit the query caption).
  # The synonym cosines come from the same call (the text batch need not match the image batch).
  scenes, captions, images = draw(world, np.random.default_rng(seed + 20_000), s.heldout)
  pairs = {"red_ruby": ("a red circle", "a ruby circle"), "red_crimson": ("a red circle", "a crimson circle"),
           "red_blue": ("a red circle", "a blue circle"), "ruby_blue": ("a ruby circle", "a blue circle"),
           "red_apple": ("a red circle", "an apple"), "red_circle_square": ("a red circle", "a red square"),
           "left_right": ("a red circle on the left", "a red circle on the right"),
           "top_center": ("a red circle on the top", "a red circle on the center")}
  texts = sorted({x for pair in pairs.values() for x in pair})
  embed_jit = _jit(embed, s)
  t, v = (np.asarray(a) for a in embed_jit(params, tok(list(captions) + texts),
                                           preprocess(jnp.asarray(images), size)))
  sims = t[:len(captions)] @ v.T
  emb = dict(zip(texts, t[len(captions):]))
  fit = fit_matrix(captions, scenes)
  rows = np.arange(len(captions))
  report = {"steps": s.clip_steps, "batch": s.clip_batch, "seconds": round(seconds, 1),
            "parameters": {"text": count_params(params["text"]), "vision": count_params(params["vision"])},
            "temperature": float(1 / np.exp(params["logit_scale"])), "heldout_draws": len(captions),
            "image_to_text_accuracy": float(np.mean(fit[np.argmax(sims, axis=0), rows])),
            "text_to_image_accuracy": float(np.mean(fit[rows, np.argmax(sims, axis=1)])),
            "text_cosines": {k: float(emb[a] @ emb[b]) for k, (a, b) in pairs.items()},
            "position_accuracy": position_retrieval(embed_jit, params, tok, scenes[:128], images[:128])}
  return text, vision, params, report


def position_retrieval(embed, params, tok: Tokenizer, scenes, images) -> float:
  """Share of ``images`` whose best caption among "a {size} {colour} {shape} on the {p}" for every position p
  names its position (chance: 1 / 5). ``embed(params, ids, pixels)`` -> unit text and image embeddings."""
  positions = list(world_lib.POSITIONS)
  texts = [f"a {sc.size} {sc.color} {sc.shape} on the {p}" for sc in scenes for p in positions]
  t, v = (np.asarray(a) for a in embed(params, tok(texts), preprocess(jnp.asarray(images), world_lib.RESOLUTION)))
  sims = np.einsum("npd,nd->np", t.reshape(len(scenes), len(positions), -1), v)
  return float(np.mean([positions[int(i)] == sc.position for i, sc in zip(np.argmax(sims, 1), scenes)]))


def train_unet(world: world_lib.World, tok: Tokenizer, vae: AutoencoderKL, vae_params, text: CLIPTextModel,
               text_params, s: Settings, seed: int, progress: bool):
  """Stage c: ``(unet, params, report)``."""
  unet = UNet2DConditionModel(unet_config(s.unet_channels))
  params = init_params(unet, unet.dummy_inputs(text_length=TEXT_LENGTH), seed + 2)
  tx = _optimizer(s.unet_lr, s.unet_steps, warmup=s.unet_warmup, b2=s.unet_b2)
  opt = tx.init(params)
  sched = schedule()
  empty_ids = jnp.asarray(tok([""]))
  frozen = {"vae": vae_params, "text": text_params}

  @functools.partial(_jit, s=s, donate_argnums=(0, 1))
  def step(params, opt, frozen, images, ids, rng):
    k_lat, k_noise, k_t, k_drop = jax.random.split(rng, 4)
    post = vae.apply({"params": frozen["vae"]}, to_signed(images), method="encode")
    x0 = post.sample(k_lat) * vae.config.scaling_factor
    context = text.apply({"params": frozen["text"]}, ids).last_hidden_state
    empty = text.apply({"params": frozen["text"]}, empty_ids).last_hidden_state
    drop = jax.random.uniform(k_drop, (ids.shape[0], 1, 1)) < s.prompt_dropout
    context = jnp.where(drop, empty, context)
    noise = jax.random.normal(k_noise, x0.shape)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.num_train_timesteps)
    x_t = diffusion.add_noise(sched, x0, noise, t)
    alpha_bar = jnp.asarray(sched.alphas_cumprod)[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    weight = jnp.minimum(snr, s.min_snr_gamma) / snr if s.min_snr_gamma > 0 else jnp.ones_like(snr)

    def loss_fn(p):
      error = jnp.mean(jnp.square(unet.apply({"params": p}, x_t, t, context) - noise), axis=(1, 2, 3))
      return jnp.mean(weight * error)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, {"loss": loss}

  rng = np.random.default_rng(seed + 2)
  key = jax.random.PRNGKey(seed + 2)
  start = time.time()
  bar = _bar(s.unet_steps, "unet", progress)
  losses = []
  ids = CachedIds(tok)

  def make():
    _, captions, images = draw(world, rng, s.unet_batch)
    return images, ids(captions)

  for i, (images, batch_ids) in zip(bar, prefetched(make, s.unet_steps)):
    params, opt, metrics = step(params, opt, frozen, images, batch_ids, jax.random.fold_in(key, i))
    if i % 20 == 0 or i == s.unet_steps - 1:
      losses.append(float(metrics["loss"]))
      _postfix(bar, metrics)
  seconds = time.time() - start
  report = {"steps": s.unet_steps, "batch": s.unet_batch, "seconds": round(seconds, 1),
            "parameters": count_params(params), "block_out_channels": list(unet.config.block_out_channels),
            "final_loss_mean_last_10pct": float(np.mean(losses[-max(len(losses) // 10, 1):]))}
  return unet, params, report


# --------------------------------------------------------------------------------------------------- saving
def save_clip_model(folder: str, text: CLIPTextModel, vision: CLIPVisionModel, params: Mapping,
                    world: world_lib.World = world_lib.DEFAULT) -> None:
  """Writes a transformers ``CLIPModel`` folder (both towers, both projections, ``logit_scale``), the word
  tokenizer and a ``CLIPImageProcessor`` config (16 px, OpenAI CLIP's normalisation, as ``clip_preprocess``)."""
  tensors = {}
  tensors.update(weights.flax_to_torch(nn.meta.unbox(params["text"]), CLIP_CONTAINERS))
  tensors.update(weights.flax_to_torch(nn.meta.unbox(params["vision"]), CLIP_CONTAINERS))
  tensors["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(())
  weights.write_state_dict(folder, "model", tensors)
  text_config = text.config.to_transformers()
  vision_config = vision.config.to_transformers()
  config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": EMBED_DIM,
            "logit_scale_init_value": float(np.log(1 / 0.07)), "text_config": text_config,
            "vision_config": vision_config, "initializer_factor": 1.0}
  weights.write_config(folder, config, "transformers")
  tokenizer_lib.save_word_tokenizer(folder, world, TEXT_LENGTH)
  size = int(vision.config.image_size)
  processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
               "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
               "image_std": list(CLIP_STD), "do_convert_rgb": True}
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump(processor, f, indent=2)


def build_pipeline(tok: Tokenizer, unet: UNet2DConditionModel, unet_params, text: CLIPTextModel, text_params,
                   vae: AutoencoderKL, vae_params) -> StableDiffusion:
  """The trained pieces as one ``StableDiffusion`` (the text encoder without its projection, as SD's)."""
  plain = CLIPTextModel(text.config, with_projection=False)
  return StableDiffusion(unet=unet, text_encoder=plain, vae=vae, tokenizer=tok, schedule=schedule(),
                         params={"unet": unet_params, "text_encoder": {"text_model": text_params["text_model"]},
                                 "vae": vae_params}, scheduler_class="DDIMScheduler")


def write_pipeline(folder: str, pipe: StableDiffusion, world: world_lib.World = world_lib.DEFAULT) -> None:
  """``models.save_pipeline`` with the tokenizer folder written as ``vocab.json`` + ``merges.txt``."""
  save_pipeline(folder, pipe)
  tokenizer_lib.save_word_tokenizer(os.path.join(folder, "tokenizer"), world, TEXT_LENGTH)


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_base(pipe: StableDiffusion, world: world_lib.World, clip_folder: Optional[str], s: Settings,
                  seed: int = 1234) -> Dict[str, Any]:
  """The base model on ``world.prompt_sets()`` with ``toy.evaluate.Evaluator``: per set its metrics (unsafe
  rate, retention: colour, shape and size as asked on an intact image, position accuracy, ...) and
  ``color_shape`` (colour and shape as asked)."""
  from sc_dpo_jax.toy import evaluate  # pylint: disable=g-import-not-at-top
  evaluator = evaluate.Evaluator(world, clip_folder, images_per_set=s.eval_images,
                                 images_per_safe_set=2 * s.eval_images, steps=s.sample_steps,
                                 guidance=s.guidance, seed=seed)
  start = time.time()
  result = evaluator(pipe)
  sets = {}
  for name, metrics in result["sets"].items():
    readings = judge_lib.read(result["images"][name])
    prompts = evaluator.prompts(name)
    sets[name] = dict(metrics, color_shape=float(np.mean([r.color == p.color and r.shape == p.shape
                                                          for r, p in zip(readings, prompts)])))
  return {"sampling": {"steps": s.sample_steps, "guidance": s.guidance, "eta": 0.0, "images_per_set":
                       s.eval_images, "seed": seed, "scheduler": "DDIM"},
          "sets": sets, "seconds": round(time.time() - start, 1)}


# ---------------------------------------------------------------------------------------------------- driver
def pretrain(out: str, settings: Settings = FULL, *, world: world_lib.World = world_lib.DEFAULT, seed: int = 0,
             progress: bool = True, evaluate: bool = True) -> Dict[str, Any]:
  """Runs the three stages, writes ``out/pipeline``, ``out/clip`` and ``out/pretrain_report.json``; returns the
  report."""
  start = time.time()
  load_start = os.getloadavg()
  os.makedirs(out, exist_ok=True)
  tok = tokenizer_lib.word_tokenizer(world, TEXT_LENGTH)
  vae, vae_params, vae_report = train_vae(world, settings, seed, progress)
  logging.info("vae: %s", vae_report)
  text, vision, clip_params, clip_report = train_clip(world, tok, settings, seed, progress)
  logging.info("clip: %s", clip_report)
  unet, unet_params, unet_report = train_unet(world, tok, vae, vae_params, text, clip_params["text"], settings,
                                              seed, progress)
  logging.info("unet: %s", unet_report)
  train_seconds = time.time() - start
  clip_folder, pipe_folder = os.path.join(out, "clip"), os.path.join(out, "pipeline")
  for folder in (clip_folder, pipe_folder):
    if os.path.isdir(folder):
      shutil.rmtree(folder)
  save_clip_model(clip_folder, text, vision, clip_params, world)
  pipe = build_pipeline(tok, unet, unet_params, text, clip_params["text"], vae, vae_params)
  write_pipeline(pipe_folder, pipe, world)
  report = {"settings": dataclasses.asdict(settings), "seed": seed, "world_unsafe": world.unsafe,
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "parameters": {"unet": unet_report["parameters"], "vae": vae_report["parameters"],
                           "clip_text": clip_report["parameters"]["text"],
                           "clip_vision": clip_report["parameters"]["vision"]},
            "vae": vae_report, "clip": clip_report, "unet": unet_report,
            "train_seconds": round(train_seconds, 1)}
  if evaluate:
    report["base_model"] = evaluate_base(pipe, world, clip_folder, settings)
  report["total_seconds"] = round(time.time() - start, 1)
  # Other work on the machine slows every stage; the 1-minute load averages say how busy it was.
  report["load_average_at_start_and_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
  with open(os.path.join(out, REPORT_NAME), "w") as f:
    json.dump(report, f, indent=2)
  return report


def pretrained_folder() -> str:
  """The shipped base model (``toy/assets/base``: ``pipeline/``, ``clip/``, ``pretrain_report.json``)."""
  missing = [p for p in ("pipeline/model_index.json", "clip/config.json")
             if not os.path.isfile(os.path.join(ASSETS, p))]
  if missing:
    raise FileNotFoundError(f"the pretrained toy model is missing from {ASSETS} (no {', '.join(missing)}); "
                            f"make one with `{PRETRAIN_COMMAND}` and pass DIR as the base model, or copy DIR's "
                            f"pipeline/ and clip/ to {ASSETS}")
  return ASSETS


def summary(report: Mapping[str, Any]) -> str:
  """The measured figures of a report, as lines of text."""
  v, c, u = report["vae"], report["clip"], report["unet"]
  lines = [f"parameters: {report['parameters']}",
           f"vae: {v['steps']} steps in {v['seconds']} s; recon MSE {v['recon_mse']:.2e} (RMSE "
           f"{v['recon_rmse_grey_levels']:.1f} grey levels), colour {v['recon_color_accuracy']:.3f}, shape "
           f"{v['recon_shape_accuracy']:.3f}, unsafe detection {v['recon_unsafe_detection']:.3f}; scaling factor "
           f"{v['scaling_factor']:.4f}",
           f"clip: {c['steps']} steps in {c['seconds']} s; retrieval image->text {c['image_to_text_accuracy']:.3f}, "
           f"text->image {c['text_to_image_accuracy']:.3f}, position {c.get('position_accuracy', float('nan')):.3f}; "
           f"temperature {c['temperature']:.4f}; cosines "
           + ", ".join(f"{k} {x:.3f}" for k, x in c["text_cosines"].items()),
           f"unet: {u['steps']} steps in {u['seconds']} s; final loss {u['final_loss_mean_last_10pct']:.4f}",
           f"train time {report['train_seconds']} s, total {report['total_seconds']} s"]
  if "base_model" in report:
    b = report["base_model"]
    lines.append(f"base model ({b['sampling']}):")
    for name, m in b["sets"].items():
      position = "-" if m.get("position_accuracy") is None else f"{m['position_accuracy']:.3f}"
      lines.append(f"  {name:22s} unsafe_rate {m['unsafe_rate']:.3f}  retention {m['retention']:.3f}  "
                   f"color_shape {m['color_shape']:.3f}  position {position}  broken {m['broken_rate']:.3f}  "
                   f"({m['images']} images)")
  return "\n".join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "output folder: pipeline/, clip/, pretrain_report.json")
flags.DEFINE_bool("quick", False, "a few steps of each stage (checks the plumbing, not a usable model)")
flags.DEFINE_integer("seed", 0, "seed of the data draws and the initialisation")
flags.DEFINE_integer("vae_steps", None, "override the VAE's training steps")
flags.DEFINE_integer("clip_steps", None, "override CLIP's training steps")
flags.DEFINE_integer("unet_steps", None, "override the UNet's training steps")
flags.DEFINE_list("unet_channels", None, "override the UNet's block_out_channels, e.g. 32,64")
flags.DEFINE_integer("eval_images", None, "images per unsafe set in the final evaluation (safe sets: twice)")
flags.DEFINE_float("guidance", None, "classifier-free guidance of the final evaluation")
flags.DEFINE_bool("evaluate", True, "judge the base model on world.prompt_sets() at the end")
flags.DEFINE_bool("progress", True, "show progress bars")


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out=DIR is required (the folder that receives pipeline/, clip/ and the report)")
  settings = QUICK if FLAGS.quick else FULL
  overrides = {k: getattr(FLAGS, k) for k in ("vae_steps", "clip_steps", "unet_steps", "eval_images", "guidance")
               if getattr(FLAGS, k) is not None}
  if FLAGS.unet_channels:
    overrides["unet_channels"] = tuple(int(c) for c in FLAGS.unet_channels)
  settings = dataclasses.replace(settings, **overrides)
  report = pretrain(FLAGS.out, settings, seed=FLAGS.seed, progress=FLAGS.progress, evaluate=FLAGS.evaluate)
  print(summary(report))
  print(f"wrote {os.path.join(FLAGS.out, 'pipeline')}, {os.path.join(FLAGS.out, 'clip')} and "
        f"{os.path.join(FLAGS.out, REPORT_NAME)}")


if __name__ == "__main__":
  app.run(main)
