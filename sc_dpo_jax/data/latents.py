"""Latents from stored VAE moments, on the device (the pipeline's ``latents="moments"`` mode).

    z = sample_latents(batch["moments_chosen"], rng, scaling_factor=spec.latent_scaling_factor)

Imports no TensorFlow: this runs inside the jitted step.
"""
from __future__ import annotations

from typing import Optional

import jax

from sc_dpo_jax.models.vae import DiagonalGaussian


def sample_latents(moments: jax.Array, rng: Optional[jax.Array], *, scaling_factor: float,
                   shift_factor: Optional[float] = None) -> jax.Array:
  """``[..., 2c]`` moments (mean, logvar) -> the diffusion model's latents ``(z - shift) * scale`` with
  ``z = mean + std * eps`` (``rng=None``: the mean), logvar clipped to [-30, 20] as diffusers does."""
  posterior = DiagonalGaussian.from_moments(moments)
  z = posterior.mode() if rng is None else posterior.sample(rng)
  return (z - (shift_factor or 0.0)) * scaling_factor
