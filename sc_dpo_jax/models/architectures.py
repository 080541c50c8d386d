"""The model shapes a config's ``model.architecture`` names ("tiny", "sd15", "sd21"), as modules to fill with
random weights: for the benchmark (``python -m sc_dpo_jax.bench``) and the memory estimate (``memory.py``)."""
from __future__ import annotations

from sc_dpo_jax import models
from sc_dpo_jax.models import tiny, vae_config
from sc_dpo_jax.models.vae import AutoencoderKL

ARCHITECTURES = ("tiny", "sd15", "sd21")


def models_for(architecture: str, dtype, attention: str, remat_policy=None):
  """(UNet module, latent shape [h, w, c], text shape [L, D]) of an architecture."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f"config.model.architecture = {architecture!r}; choose one of {ARCHITECTURES}")
  if architecture == "tiny":
    config, text = models.tiny_config(cross_attention_dim=tiny.TEXT_DIM), (tiny.TEXT_LENGTH, tiny.TEXT_DIM)
  elif architecture == "sd15":
    config, text = models.sd15_config(), (77, 768)
  else:
    config, text = models.sd21_config(), (77, 1024)
  kwargs = dict(dtype=dtype, attention=attention)
  if remat_policy:
    kwargs["remat_policy"] = remat_policy
  unet = models.UNet2DConditionModel(config, **kwargs)
  size = int(config.sample_size)
  return unet, (size, size, int(config.in_channels)), text


def vae_for(architecture: str, dtype, attention: str):
  """The VAE module of an architecture (SD1.x/2.x: 8x downsampling; tiny: 2x)."""
  if architecture == "tiny":
    config = vae_config.tiny_vae_config()
  else:
    config = vae_config.sd_vae_config(768 if architecture == "sd21" else 512)
  return AutoencoderKL(config, dtype=dtype, attention=attention)
