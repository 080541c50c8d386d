"""Stable Diffusion's conditional UNet (diffusers' ``UNet2DConditionModel``, SD1.x/2.x) as a linen module.

Used only through ``apply``::

    unet = UNet2DConditionModel(config)                  # config: models.UNetConfig
    eps = unet.apply({"params": params}, latents, timesteps, text_states)

* ``latents`` are NHWC ``[B, H, W, C]`` (diffusers is NCHW: the converters in ``io.py`` transpose weights, and
  callers pass NHWC arrays); the output has the same layout.
* ``timesteps``: a scalar or ``[B]``, integer or float.
* ``text_states``: ``[B, L, cross_attention_dim]``.

Parameter names mirror diffusers' module tree (``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q``
for ``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q``), which keeps the checkpoint converter a
mechanical renaming. Runtime options: ``dtype`` (compute), ``param_dtype`` (storage), ``attention`` (see
``attention.py``) and ``remat_policy`` (a ``jax.checkpoint_policies`` name; each resnet and transformer block
is then rematerialised under it; None keeps every activation).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sc_dpo_jax.models.attention import IMPLEMENTATIONS, dot_product_attention
from sc_dpo_jax.models.layers import GroupNorm, LayerNorm, conv, dense, remat_policy
from sc_dpo_jax.models.unet_config import UNetConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Options:
  """How the network computes; shared by every block (not part of the architecture)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "reference"
  remat_policy: Optional[str] = None

  def maybe_remat(self, module_cls):
    policy = remat_policy(self.remat_policy)   # None: no remat ("none" too)
    return module_cls if policy is None else nn.remat(module_cls, policy=policy)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep features exactly as diffusers' ``get_timestep_embedding`` (float32)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  features: int
  opts: Options

  @nn.compact
  def __call__(self, t_emb):
    o = self.opts
    h = dense(self.features, ("embed", "mlp"), dtype=o.dtype, param_dtype=o.param_dtype,
              name="linear_1")(t_emb)
    return dense(self.features, ("mlp", "time_embed"), dtype=o.dtype, param_dtype=o.param_dtype,
                 name="linear_2")(nn.silu(h))


class ResnetBlock2D(nn.Module):
  """diffusers' ``ResnetBlock2D`` (pre-norm, ``time_embedding_norm="default"``).

  ``temb=None`` is the block without a time embedding (``temb_channels=None``, as in the VAE): it then has
  no ``time_emb_proj`` parameters.
  """
  out_channels: int
  groups: int
  eps: float
  opts: Options
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, temb=None):
    o = self.opts
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
    if temb is not None:
      t = dense(self.out_channels, ("time_embed", "embed"), name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
    out = x.astype(jnp.float32) + h   # the residual stream is float32 (layers.py: dtype policy)
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Attention(nn.Module):
  heads: int
  head_dim: int
  upcast: bool
  opts: Options

  @nn.compact
  def __call__(self, x, context=None):
    o = self.opts
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    inner = self.heads * self.head_dim
    source_axis = "embed" if context is None else "cross_embed"
    context = x if context is None else context
    q = dense(inner, ("embed", "heads"), use_bias=False, name="to_q", **kw)(x)
    k = dense(inner, (source_axis, "heads"), use_bias=False, name="to_k", **kw)(context)
    v = dense(inner, (source_axis, "heads"), use_bias=False, name="to_v", **kw)(context)
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))
    out = dot_product_attention(split(q), split(k), split(v), implementation=o.attention,
                                upcast=self.upcast)
    out = out.reshape(out.shape[:2] + (inner,))
    return dense(x.shape[-1], ("heads", "embed"), name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
  features: int
  opts: Options

  @nn.compact
  def __call__(self, x):
    o = self.opts
    h = dense(2 * self.features, ("embed", "mlp"), dtype=o.dtype, param_dtype=o.param_dtype,
              name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  opts: Options
  mult: int = 4

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, self.opts, name="net_0")(x)
    return dense(dim, ("mlp", "embed"), dtype=self.opts.dtype, param_dtype=self.opts.param_dtype,
                 name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  heads: int
  head_dim: int
  upcast: bool
  opts: Options

  @nn.compact
  def __call__(self, x, context):
    o = self.opts
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    attn = lambda name: Attention(self.heads, self.head_dim, self.upcast, o, name=name)
    x = x.astype(jnp.float32)   # the residual stream is float32 (layers.py: dtype policy)
    x = x + attn("attn1")(LayerNorm(name="norm1", **kw)(x))
    x = x + attn("attn2")(LayerNorm(name="norm2", **kw)(x), context)
    return x + FeedForward(o, name="ff")(LayerNorm(name="norm3", **kw)(x))


class Transformer2DModel(nn.Module):
  heads: int
  depth: int
  groups: int
  use_linear_projection: bool
  upcast: bool
  opts: Options

  @nn.compact
  def __call__(self, x, context):
    o = self.opts
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    b, hgt, wid, ch = x.shape
    head_dim = ch // self.heads
    inner = self.heads * head_dim
    h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      h = dense(inner, ("embed", "mlp"), name="proj_in", **kw)(h.reshape(b, hgt * wid, ch))
    else:
      h = conv(inner, 1, padding=0, name="proj_in", **kw)(h).reshape(b, hgt * wid, inner)
    for i in range(self.depth):
      h = BasicTransformerBlock(self.heads, head_dim, self.upcast, o,
                                name=f"transformer_blocks_{i}")(h, context)
    if self.use_linear_projection:
      h = dense(ch, ("mlp", "embed"), name="proj_out", **kw)(h).reshape(b, hgt, wid, ch)
    else:
      h = conv(ch, 1, padding=0, name="proj_out", **kw)(h.reshape(b, hgt, wid, inner))
    return h + x.astype(jnp.float32)


class Downsample2D(nn.Module):
  padding: int
  opts: Options

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.opts.dtype, param_dtype=self.opts.param_dtype)
    if self.padding == 0:  # diffusers pads right and bottom by one, then convolves without padding
      return conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), name="conv", **kw)(x)
    return conv(x.shape[-1], 3, stride=2, padding=self.padding, name="conv", **kw)(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  # PyTorch's 'nearest': src = min(floor(dst * (in / out)), in - 1), the scale in float32.
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


class Upsample2D(nn.Module):
  opts: Options

  @nn.compact
  def __call__(self, x, size: Tuple[int, int]):
    b, h, w, c = x.shape
    if size == (2 * h, 2 * w):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:  # diffusers forwards the skip's size when the input is not a multiple of the total stride
      x = x[:, _nearest_indices(h, size[0])][:, :, _nearest_indices(w, size[1])]
    return conv(c, 3, padding=1, dtype=self.opts.dtype, param_dtype=self.opts.param_dtype,
                name="conv")(x)


class DownBlock(nn.Module):
  """``CrossAttnDownBlock2D`` (with ``attention``) or ``DownBlock2D``."""
  out_channels: int
  num_layers: int
  attention: bool
  heads: int
  depth: int
  add_downsample: bool
  cfg: UNetConfig
  opts: Options

  @nn.compact
  def __call__(self, x, temb, context):
    cfg, o = self.cfg, self.opts
    skips = []
    for i in range(self.num_layers):
      x = o.maybe_remat(ResnetBlock2D)(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, o,
                                       name=f"resnets_{i}")(x, temb)
      if self.attention:
        x = o.maybe_remat(Transformer2DModel)(
            self.heads, self.depth, cfg.norm_num_groups, cfg.use_linear_projection,
            cfg.upcast_attention, o, name=f"attentions_{i}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(cfg.downsample_padding, o, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""
  cfg: UNetConfig
  opts: Options

  @nn.compact
  def __call__(self, x, temb, context):
    cfg, o = self.cfg, self.opts
    ch = x.shape[-1]
    resnet = lambda name: o.maybe_remat(ResnetBlock2D)(
        ch, cfg.norm_num_groups, cfg.norm_eps, o, output_scale_factor=cfg.mid_block_scale_factor,
        name=name)
    x = resnet("resnets_0")(x, temb)
    x = o.maybe_remat(Transformer2DModel)(
        cfg.attention_head_dim[-1], cfg.transformer_layers_per_block[-1], cfg.norm_num_groups,
        cfg.use_linear_projection, cfg.upcast_attention, o, name="attentions_0")(x, context)
    return resnet("resnets_1")(x, temb)


class UpBlock(nn.Module):
  """``CrossAttnUpBlock2D`` (with ``attention``) or ``UpBlock2D``."""
  out_channels: int
  num_layers: int
  attention: bool
  heads: int
  depth: int
  add_upsample: bool
  cfg: UNetConfig
  opts: Options

  @nn.compact
  def __call__(self, x, skips: Sequence[jax.Array], temb, context, upsample_size):
    cfg, o = self.cfg, self.opts
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = o.maybe_remat(ResnetBlock2D)(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, o,
                                       name=f"resnets_{i}")(x, temb)
      if self.attention:
        x = o.maybe_remat(Transformer2DModel)(
            self.heads, self.depth, cfg.norm_num_groups, cfg.use_linear_projection,
            cfg.upcast_attention, o, name=f"attentions_{i}")(x, context)
    if self.add_upsample:
      x = Upsample2D(o, name="upsamplers_0")(x, upsample_size)
    return x


class UNet2DConditionModel(nn.Module):
  """The SD1.x/2.x conditional UNet; see the module docstring."""
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "reference"
  remat_policy: Optional[str] = None

  @property
  def options(self) -> Options:
    return Options(self.dtype, self.param_dtype, self.attention, self.remat_policy)

  def dummy_inputs(self, batch: int = 1, size: Optional[int] = None, text_length: int = 77):
    """Zeros of the right shapes (NHWC latents, timesteps, text states), for ``init``/``eval_shape``."""
    cfg = self.config
    size = size or cfg.sample_size or 8
    return (jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, text_length, cfg.cross_attention_dim), jnp.float32))

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array):
    cfg, o = self.config, self.options
    if o.attention not in IMPLEMENTATIONS:
      raise ValueError(f"UNet attention={o.attention!r}; choose one of {IMPLEMENTATIONS}")
    _check_inputs(cfg, sample, encoder_hidden_states)
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    batch = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    context = encoder_hidden_states.astype(o.dtype)

    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0],
                               flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, o, name="time_embedding")(t_emb.astype(o.dtype))

    x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
             name="conv_in", **kw)(sample.astype(o.dtype))
    skips = [x]
    n = len(cfg.block_out_channels)
    for i, block_type in enumerate(cfg.down_block_types):
      x, block_skips = DownBlock(
          cfg.block_out_channels[i], cfg.layers_per_block[i], block_type == "CrossAttnDownBlock2D",
          cfg.attention_head_dim[i], cfg.transformer_layers_per_block[i], i < n - 1, cfg, o,
          name=f"down_blocks_{i}")(x, temb, context)
      skips.extend(block_skips)

    x = MidBlock(cfg, o, name="mid_block")(x, temb, context)

    rev = lambda values: tuple(reversed(values))
    for i, block_type in enumerate(cfg.up_block_types):
      num_layers = rev(cfg.layers_per_block)[i] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      is_final = i == n - 1
      upsample_size = None if is_final else tuple(skips[-1].shape[1:3])
      x = UpBlock(rev(cfg.block_out_channels)[i], num_layers, block_type == "CrossAttnUpBlock2D",
                  rev(cfg.attention_head_dim)[i], rev(cfg.transformer_layers_per_block)[i],
                  not is_final, cfg, o, name=f"up_blocks_{i}")(x, block_skips, temb, context,
                                                               upsample_size)

    x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=jnp.float32,
                          param_dtype=o.param_dtype, name="conv_norm_out")(x))
    # The last convolution is tiny (C -> 4): it runs in float32 so the prediction keeps full precision.
    return conv(cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2,
                dtype=jnp.float32, param_dtype=o.param_dtype, name="conv_out")(x)


def _check_inputs(cfg: UNetConfig, sample, text_states):
  if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
    hint = (" (it looks NCHW: our models take NHWC)"
            if sample.ndim == 4 and sample.shape[1] == cfg.in_channels else "")
    raise ValueError(f"UNet sample must be NHWC [B, H, W, {cfg.in_channels}], got {sample.shape}{hint}")
  if text_states.ndim != 3 or text_states.shape[-1] != cfg.cross_attention_dim:
    raise ValueError(f"UNet encoder_hidden_states must be [B, L, {cfg.cross_attention_dim}], "
                     f"got {text_states.shape}")
  if text_states.shape[0] != sample.shape[0]:
    raise ValueError(f"UNet batch mismatch: sample has {sample.shape[0]}, encoder_hidden_states "
                     f"{text_states.shape[0]}")
