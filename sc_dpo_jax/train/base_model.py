"""The pipeline a diffusion trainer starts from: the diffusers folder ``config.model.path``, or (``model.tiny``)
a random tiny pipeline made in memory and written to ``<workdir>/base_model`` so that the run's base can be
loaded and compared later. Compute dtype ``model.dtype``, UNet rematerialisation ``model.remat_policy`` and
attention kernel ``model.attention`` (``auto``: the fastest the platform runs, logged).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sc_dpo_jax import models, paths


def load_models(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> models.StableDiffusion:
  """The run's base pipeline (see the module docstring); a tiny variant with a model path is refused."""
  dtype = jnp.dtype(config.model.dtype)
  if config.model.tiny and config.model.path:
    raise ValueError(f"config.model.tiny = True (a :tiny variant: a random tiny model) and config.model.path = "
                     f"{config.model.path!r} are both set, and a tiny run would ignore the path. To train that "
                     f"model use a full-size variant (e.g. configs/diffusion_dpo.py:sd15) with --config.model.path, "
                     f"or keep the tiny variant's other settings and add --config.model.tiny=False")
  if config.model.tiny:
    from sc_dpo_jax.models import tiny  # pylint: disable=g-import-not-at-top
    pipe = tiny.tiny_pipeline(config.seed, dtype=dtype)
    folder = paths.resolve(workdir) / "base_model"
    if jax.process_index() == 0 and not (folder / "model_index.json").exists():
      models.save_pipeline(folder, pipe)
  else:
    if not config.model.path:
      raise ValueError("config.model.path is empty: set --config.model.path to a diffusers Stable Diffusion "
                       "folder (or use the :tiny variant)")
    pipe = models.load_pipeline(config.model.path, dtype=dtype, attention=config.model.attention)
  if config.model.remat_policy:
    pipe.unet = pipe.unet.clone(remat_policy=config.model.remat_policy)
  if config.model.tiny:  # load_pipeline resolved and checked a loaded model's attention (models.attention.resolve)
    pipe.unet = models.unet_with_attention(pipe.unet, config.model.attention)
  return pipe
