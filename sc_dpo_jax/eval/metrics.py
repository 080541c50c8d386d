"""Per-image metrics of the evaluation: PSNR and SSIM between two images, and CLIP scores.

    psnr(a, b), ssim(a, b)                 # uint8 [N, H, W, 3] pairs -> float64 [N]
    clip = Clip("path/to/clip")            # a transformers CLIPModel folder (both towers, projections, tokenizer)
    clip.score(images, prompts)            # float32 [N]: cosine of image and prompt embeddings
    clip.image_cosine(a, b)                # float32 [N]: cosine of the two images' embeddings

**PSNR** ``10 log10(255^2 / MSE)`` over all pixels and channels of each pair, in float64; ``inf`` when the
images are identical.

**SSIM** is Wang et al. (2004) with the usual constants: a Gaussian window of sigma 1.5 truncated at 3.5 sigma
(11 taps, normalised), ``K1 = 0.01``, ``K2 = 0.03``, data range 255, population (not sample) covariances; the
SSIM map is averaged over the pixels whose whole window lies inside the image (a border of 5 pixels is left
out) and then over the three channels. That is exactly what ``skimage.metrics.structural_similarity(a, b,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=255)`` computes
(it filters with reflected borders and then crops them, so the kept pixels never see a border). Images must be
at least 11 pixels on each side.

**CLIP** (``Clip``): both towers of one CLIP checkpoint through our Flax models
(``models.load_clip_text``/``load_clip_vision``), images preprocessed in JAX (``rewards.clip_preprocess``). The
CLIP score is the plain cosine in [-1, 1], as ``rewards.ClipScore`` (the literature's "CLIP score" is
``100 * max(cos, 0)``); the image cosine compares the image embeddings of two images (prior preservation).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5          # window radius = int(3.5 * 1.5 + 0.5) = 5: 11 taps, as scipy's gaussian_filter
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def _pairs(a, b, name: str):
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
    raise ValueError(f"{name}: expected two uint8 arrays [N, H, W, 3] of one shape, got {a.shape} and {b.shape}")
  if a.dtype != np.uint8 or b.dtype != np.uint8:
    raise ValueError(f"{name}: expected uint8 images, got {a.dtype} and {b.dtype}")
  return a.astype(np.float64), b.astype(np.float64)


def psnr(a, b) -> np.ndarray:
  """PSNR in dB of each pair of uint8 images ``[N, H, W, 3]``: float64 ``[N]``, ``inf`` for identical images."""
  a, b = _pairs(a, b, "psnr")
  mse = np.mean(np.square(a - b), axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return np.where(mse == 0, np.inf, 10.0 * np.log10(DATA_RANGE ** 2 / np.maximum(mse, 1e-300)))


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
  """The normalised 1-D Gaussian taps of SSIM's window (radius ``int(truncate * sigma + 0.5)``)."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * np.square(x / sigma))
  return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
  """Separable filtering of ``[N, H, W, C]`` over H and W, keeping only fully covered outputs."""
  k = len(taps)
  x = np.lib.stride_tricks.sliding_window_view(x, k, axis=1) @ taps        # [N, H-k+1, W, C]
  return np.lib.stride_tricks.sliding_window_view(x, k, axis=2) @ taps     # [N, H-k+1, W-k+1, C]


def ssim(a, b) -> np.ndarray:
  """Mean SSIM of each pair of uint8 images ``[N, H, W, 3]`` (module docstring): float64 ``[N]``, 1 when equal."""
  a, b = _pairs(a, b, "ssim")
  taps = gaussian_window()
  if min(a.shape[1], a.shape[2]) < len(taps):
    raise ValueError(f"ssim: images of {a.shape[1]}x{a.shape[2]} pixels are smaller than the {len(taps)}-pixel "
                     "Gaussian window")
  mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
  var_a = _filter_valid(a * a, taps) - mu_a * mu_a
  var_b = _filter_valid(b * b, taps) - mu_b * mu_b
  cov = _filter_valid(a * b, taps) - mu_a * mu_b
  c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))


@functools.lru_cache(maxsize=None)
def _image_cosine_fn():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from sc_dpo_jax.rewards.clip_preprocess import preprocess  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.rewards.clip_score import l2_normalize  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def fn(vision_model, image_size, params, a, b):
    pixels = preprocess(jnp.concatenate([a, b]), image_size)
    embeds = l2_normalize(vision_model.apply({"params": params}, pixels).image_embeds)
    n = a.shape[0]
    return jnp.sum(embeds[:n] * embeds[n:], axis=-1)

  return fn


class Clip:
  """One CLIP checkpoint (a transformers ``CLIPModel`` folder with its tokenizer files) for the CLIP score and
  the image-image cosine."""

  def __init__(self, folder: str, *, attention: str = "reference"):
    from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
    from sc_dpo_jax.rewards.clip_score import ClipScore  # pylint: disable=g-import-not-at-top
    self.folder = folder
    text, text_params = models.load_clip_text(folder, attention=attention)
    vision, vision_params = models.load_clip_vision(folder, attention=attention)
    self.vision, self.vision_params = vision, vision_params
    self._score = ClipScore(text, text_params, vision, vision_params, models.load_tokenizer(folder))  # checks both

  def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Cosine of each image's and its prompt's CLIP embeddings: float32 ``[N]``."""
    if len(images) == 0:
      return np.zeros(0, np.float32)
    return self._score(np.asarray(images), list(prompts))[0]

  def image_cosine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of the CLIP image embeddings of each pair ``a[i]``, ``b[i]``: float32 ``[N]``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
      raise ValueError(f"image_cosine: {a.shape} and {b.shape} images; expected one shape")
    if len(a) == 0:
      return np.zeros(0, np.float32)
    fn = _image_cosine_fn()
    return np.asarray(fn(self.vision, int(self.vision.config.image_size), self.vision_params, a, b), np.float32)


Z_95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z_95):
  """The Wilson score interval of ``k`` successes in ``n`` trials (95% by default): ``(lo, hi)``; (0, 1) for
  ``n = 0``. Unlike ``p +- z sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not empty at 0 or n successes."""
  if n <= 0:
    return 0.0, 1.0
  p = k / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  lo = 0.0 if k <= 0 else max(0.0, centre - half)      # exact ends: rounding leaves 3e-17 at k = 0
  hi = 1.0 if k >= n else min(1.0, centre + half)
  return lo, hi
