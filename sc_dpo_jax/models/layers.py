"""Building blocks shared by our models: layers that carry logical axis names, and the dtype policy.

Every kernel, bias and norm scale is created through ``nn.with_logical_partitioning``, so
``nn.get_partition_spec(jax.eval_shape(model.init, ...))`` gives each parameter's logical axes and the
mesh rules in ``sc_dpo_jax/parallel`` turn them into shardings. The logical names used:

=============== =====================================================================
``conv_height``  ``conv_width``: a conv kernel's spatial extent
``conv_in``     ``conv_out``: a conv kernel's input and output channels
``embed``       the width of a residual stream (UNet channels, transformer width)
``heads``       the flattened ``heads * head_dim`` of attention projections
``mlp``         the hidden width of a feed-forward layer
``cross_embed`` the width of the conditioning states (text encoder output)
``norm``        the scale and bias of a normalisation layer
=============== =====================================================================

Dtype policy: ``param_dtype`` is what parameters are stored in, ``dtype`` what matmuls and convolutions
compute in; normalisations always compute in float32 and hand back ``dtype``; the UNet's residual sums (resnet
and transformer blocks) are float32, so the stream between blocks keeps float32 precision while every conv and
matmul reads it in ``dtype``. Measured on SD1.5's UNet with random weights (one 64x64 image, CPU), bf16 compute
against float32 compute, relative L2 error: 1.12e-2 -> 0.93e-2 and 1.71e-2 -> 1.46e-2 for two weight draws
(issue 9 asks <= 1e-2; docs/performance.md), for ~0.06 GB more saved activations per image.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def dense(features: int, axes: Tuple[str, str], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None,
          kernel_init: Callable = DEFAULT_KERNEL_INIT) -> nn.Dense:
  """``nn.Dense`` whose kernel is named ``axes`` = (input axis, output axis) and bias (output axis,)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def conv(features: int, kernel_size: int, *, stride: int = 1, padding: int | Sequence = "SAME",
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
  """NHWC ``nn.Conv`` with an HWIO kernel named (conv_height, conv_width, conv_in, conv_out).

  ``padding`` as an int pads that many pixels on every side (PyTorch's ``Conv2d(padding=p)``).
  """
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     DEFAULT_KERNEL_INIT, ("conv_height", "conv_width", "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


class GroupNorm(nn.Module):
  """PyTorch's ``GroupNorm`` over the channel (last) axis of ``[B, ..., C]``, computed in float32.

  Groups are contiguous runs of channels, as in PyTorch; the variance is the two-pass biased one.
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups")
    scale, bias = _norm_params(self, channels)
    g = x.astype(jnp.float32).reshape(x.shape[0], -1, self.num_groups, channels // self.num_groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
  """PyTorch's ``LayerNorm`` over the last axis, computed in float32."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale, bias = _norm_params(self, x.shape[-1])
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


def _norm_params(module: nn.Module, channels: int):
  scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (channels,), module.param_dtype)
  bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                      (channels,), module.param_dtype)
  return scale.astype(jnp.float32), bias.astype(jnp.float32)


def convs_and_dots_saveable(prim, *_, **__) -> bool:
  """Remat policy: keep the outputs of convolutions and matmuls, recompute everything else in the backward.

  ``jax.checkpoint_policies.dots_saveable`` knows only ``dot_general``: in a UNet it would recompute every
  convolution. With this policy a block's backward recomputes its norms, activations, residual sums and
  attention (one more attention forward) from the saved conv/matmul outputs: the activations that stay are
  those the backward of a conv or matmul needs anyway.
  """
  return prim.name in ("dot_general", "conv_general_dilated")


# Policies of our own, beside the names of ``jax.checkpoint_policies``.
REMAT_POLICIES = {"convs_and_dots_saveable": convs_and_dots_saveable}


def remat_policy(name: str | None):
  """Resolves a checkpoint policy name: ours (:data:`REMAT_POLICIES`) or ``jax.checkpoint_policies``'s.

  None or "none" (what a command-line flag can say) mean no rematerialisation: None is returned.
  """
  if name is None or name.lower() == "none":
    return None
  policy = REMAT_POLICIES.get(name) or getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy):
    choices = sorted(set(REMAT_POLICIES) | {n for n in dir(jax.checkpoint_policies) if n.endswith("saveable")})
    raise ValueError(f"unknown remat policy {name!r}; choose one of {choices}")
  return policy
