"""Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) as a linen module.

Used only through ``apply``::

    vae = AutoencoderKL(config)                                     # config: models.VAEConfig
    posterior = vae.apply({"params": p}, images, method="encode")   # a DiagonalGaussian
    images = vae.apply({"params": p}, latents, method="decode")

    # or, with the latent scaling of the diffusion model applied:
    z = encode_to_latents(vae, p, images, rng)                      # sample(rng) * scaling_factor
    images = decode_latents(vae, p, z)                              # decode(z / scaling_factor)

* ``images`` are NHWC ``[B, H, W, in_channels]`` in ``[-1, 1]``; ``decode`` returns NHWC images on the same
  scale (not clipped: clip yourself).
* ``encode``/``decode`` work on *unscaled* latents, exactly as diffusers' ``AutoencoderKL.encode/decode``: the
  caller multiplies by ``config.scaling_factor`` before the UNet and divides by it before decoding (or uses
  :func:`encode_to_latents` / :func:`decode_latents`, which do that).
* The encoder downsamples ``2 ** (len(block_out_channels) - 1)`` times per axis (8 for SD). Each downsampling
  pads right and bottom by one and convolves with stride 2 and no padding, as diffusers; any size works, but
  only multiples of the factor decode back to the input size.

Parameter names mirror diffusers' module tree (``encoder/down_blocks_0/resnets_1/conv1`` for
``encoder.down_blocks.0.resnets.1.conv1``; ``encoder/mid_block/attentions_0/to_q``; ``quant_conv``;
``decoder/up_blocks_0/upsamplers_0/conv``), so ``vae_io`` converts checkpoints by renaming. The resnet,
downsampling and upsampling blocks are the UNet's (``models.unet``).

Dtype policy as the UNet: ``dtype`` is the compute dtype of convolutions and matmuls, ``param_dtype`` the
storage dtype; group norms and the attention softmax compute in float32. The layers that produce the
posterior moments (encoder ``conv_out``, ``quant_conv``) and the image (``post_quant_conv``, decoder
``conv_out``) compute in float32, so ``encode`` and ``decode`` return float32 whatever ``dtype`` is.

The mid-block attention is single-headed with ``head_dim = channels`` (512 for SD). cuDNN's fused attention
takes heads of at most 256 (128 before Hopper), so ``attention="cudnn"`` is refused with a ValueError for
wider heads (the SD VAE): use ``"xla"``, which works everywhere, or ``"auto"`` (``models.attention``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from sc_dpo_jax.models.attention import IMPLEMENTATIONS, dot_product_attention
from sc_dpo_jax.models.layers import GroupNorm, conv, dense
from sc_dpo_jax.models.unet import Downsample2D, Options, ResnetBlock2D, Upsample2D
from sc_dpo_jax.models.vae_config import VAEConfig

Dtype = Any

# diffusers builds every norm of the VAE (resnets, attention, conv_norm_out) with eps=1e-6.
NORM_EPS = 1e-6
# The widest head jax's cuDNN fused attention takes (on Hopper; 128 before).
CUDNN_MAX_HEAD_DIM = 256
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian(struct.PyTreeNode):
  """The posterior ``N(mean, exp(logvar))`` of the encoder, NHWC ``[B, h, w, latent_channels]`` each.

  Build it with :meth:`from_moments`, which clips ``logvar`` to ``[-30, 20]`` as diffusers'
  ``DiagonalGaussianDistribution`` does. A pytree, so it can leave ``jit`` and ``apply``.
  """
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits ``[..., 2 * latent_channels]`` moments (mean first, then logvar) and clips the logvar."""
    if moments.shape[-1] % 2:
      raise ValueError(f"moments must have an even number of channels (mean, logvar), got {moments.shape}")
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def moments(self) -> jax.Array:
    """``[..., 2 * latent_channels]``: mean and (clipped) logvar, e.g. to store precomputed latents."""
    return jnp.concatenate([self.mean, self.logvar], axis=-1)

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``rng`` (unscaled latents)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    """The mean (unscaled latents)."""
    return self.mean

  def kl(self) -> jax.Array:
    """``KL(self || N(0, 1))`` summed over each example's latent, ``[B]`` (diffusers' ``kl()``)."""
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)


class MidBlockAttention(nn.Module):
  """The attention of diffusers' ``UNetMidBlock2D`` (the former ``AttentionBlock``): group norm, one head as
  wide as the channels, biased projections, residual connection, ``rescale_output_factor`` 1."""
  groups: int
  opts: Options

  @nn.compact
  def __call__(self, x):
    o = self.opts
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    b, hgt, wid, ch = x.shape
    if o.attention == "cudnn" and ch > CUDNN_MAX_HEAD_DIM:
      raise ValueError(f"VAE attention='cudnn' cannot run the mid-block attention: its single head is {ch} "
                       f"wide and cuDNN takes at most {CUDNN_MAX_HEAD_DIM}; use attention='xla' or 'auto'")
    h = GroupNorm(self.groups, NORM_EPS, name="group_norm", **kw)(x).reshape(b, hgt * wid, ch)
    q = dense(ch, ("embed", "heads"), name="to_q", **kw)(h)
    k = dense(ch, ("embed", "heads"), name="to_k", **kw)(h)
    v = dense(ch, ("embed", "heads"), name="to_v", **kw)(h)
    one_head = lambda a: a[:, :, None, :]
    out = dot_product_attention(one_head(q), one_head(k), one_head(v), implementation=o.attention)
    out = dense(ch, ("heads", "embed"), name="to_out_0", **kw)(out.reshape(b, hgt * wid, ch))
    return out.reshape(b, hgt, wid, ch) + x


class MidBlock(nn.Module):
  """diffusers' ``UNetMidBlock2D`` without time embedding: resnet, attention (optional), resnet."""
  groups: int
  add_attention: bool
  opts: Options

  @nn.compact
  def __call__(self, x):
    o = self.opts
    resnet = lambda name: o.maybe_remat(ResnetBlock2D)(x.shape[-1], self.groups, NORM_EPS, o, name=name)
    x = resnet("resnets_0")(x)
    if self.add_attention:
      x = o.maybe_remat(MidBlockAttention)(self.groups, o, name="attentions_0")(x)
    return resnet("resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_downsample: bool
  groups: int
  opts: Options

  @nn.compact
  def __call__(self, x):
    o = self.opts
    for i in range(self.num_layers):
      x = o.maybe_remat(ResnetBlock2D)(self.out_channels, self.groups, NORM_EPS, o, name=f"resnets_{i}")(x)
    if self.add_downsample:  # the encoder's downsamplers use padding=0: pad right/bottom by one
      x = Downsample2D(0, o, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_upsample: bool
  groups: int
  opts: Options

  @nn.compact
  def __call__(self, x):
    o = self.opts
    for i in range(self.num_layers):
      x = o.maybe_remat(ResnetBlock2D)(self.out_channels, self.groups, NORM_EPS, o, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(o, name="upsamplers_0")(x, (2 * x.shape[1], 2 * x.shape[2]))
    return x


class Encoder(nn.Module):
  """Images ``[B, H, W, in_channels]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]`` (float32)."""
  config: VAEConfig
  opts: Options

  @nn.compact
  def __call__(self, images):
    cfg, o = self.config, self.opts
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    channels = cfg.block_out_channels
    x = conv(channels[0], 3, padding=1, name="conv_in", **kw)(images)
    for i, ch in enumerate(channels):
      x = DownEncoderBlock2D(ch, cfg.layers_per_block, i < len(channels) - 1, cfg.norm_num_groups, o,
                             name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, o, name="mid_block")(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dtype=jnp.float32, param_dtype=o.param_dtype,
                          name="conv_norm_out")(x))
    return conv(2 * cfg.latent_channels, 3, padding=1, dtype=jnp.float32, param_dtype=o.param_dtype,
                name="conv_out")(x)


class Decoder(nn.Module):
  """Latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]`` (float32)."""
  config: VAEConfig
  opts: Options

  @nn.compact
  def __call__(self, latents):
    cfg, o = self.config, self.opts
    kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
    channels = tuple(reversed(cfg.block_out_channels))
    x = conv(channels[0], 3, padding=1, name="conv_in", **kw)(latents)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, o, name="mid_block")(x)
    for i, ch in enumerate(channels):
      x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, i < len(channels) - 1, cfg.norm_num_groups, o,
                           name=f"up_blocks_{i}")(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dtype=jnp.float32, param_dtype=o.param_dtype,
                          name="conv_norm_out")(x))
    return conv(cfg.out_channels, 3, padding=1, dtype=jnp.float32, param_dtype=o.param_dtype,
                name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """The SD VAE; see the module docstring. Methods: :meth:`encode`, :meth:`decode`, ``__call__`` (for init).

  Attributes:
    config: the architecture.
    dtype, param_dtype: compute and storage dtypes (``models.layers``).
    attention: the mid-block attention implementation (``models.attention.IMPLEMENTATIONS``).
    remat_policy: rematerialise each resnet and attention block under this ``jax.checkpoint_policies``
      name (for gradients through the decoder at high resolution); None keeps every activation.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "reference"
  remat_policy: Optional[str] = None

  @property
  def options(self) -> Options:
    return Options(self.dtype, self.param_dtype, self.attention, self.remat_policy)

  def setup(self):
    cfg, o = self.config, self.options
    if o.attention not in IMPLEMENTATIONS:
      raise ValueError(f"VAE attention={o.attention!r}; choose one of {IMPLEMENTATIONS}")
    f32 = dict(dtype=jnp.float32, param_dtype=o.param_dtype)
    self.encoder = Encoder(cfg, o)
    self.decoder = Decoder(cfg, o)
    self.quant_conv = conv(2 * cfg.latent_channels, 1, padding=0, **f32) if cfg.use_quant_conv else None
    self.post_quant_conv = (conv(cfg.latent_channels, 1, padding=0, **f32) if cfg.use_post_quant_conv
                            else None)

  def dummy_inputs(self, batch: int = 1, size: Optional[int] = None) -> Tuple[jax.Array]:
    """Zeros of the right shape (NHWC images), for ``init``/``eval_shape``."""
    size = size or self.config.downsample_factor
    return (jnp.zeros((batch, size, size, self.config.in_channels), jnp.float32),)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """NHWC images in ``[-1, 1]`` -> the posterior over *unscaled* latents (float32)."""
    _check_nhwc(images, self.config.in_channels, "images")
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, latents: jax.Array) -> jax.Array:
    """*Unscaled* NHWC latents (divide the UNet's latents by ``config.scaling_factor`` first) -> NHWC images
    in about ``[-1, 1]``, float32, not clipped."""
    _check_nhwc(latents, self.config.latent_channels, "latents")
    z = latents.astype(jnp.float32)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """Encode, sample the posterior with ``rng`` (its mode when None), decode: the reconstruction."""
    posterior = self.encode(images)
    return self.decode(posterior.mode() if rng is None else posterior.sample(rng))


def encode_to_latents(vae: AutoencoderKL, params, images: jax.Array,
                      rng: Optional[jax.Array] = None) -> jax.Array:
  """Images -> *scaled* latents for the diffusion model: a posterior sample (its mode when ``rng`` is None)
  times ``config.scaling_factor``."""
  posterior = vae.apply({"params": params}, images, method="encode")
  z = posterior.mode() if rng is None else posterior.sample(rng)
  return z * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
  """*Scaled* latents of the diffusion model -> images: ``decode(latents / config.scaling_factor)``."""
  return vae.apply({"params": params}, latents / vae.config.scaling_factor, method="decode")


def _check_nhwc(x, channels: int, what: str):
  if x.ndim != 4 or x.shape[-1] != channels:
    hint = " (it looks NCHW: our models take NHWC)" if x.ndim == 4 and x.shape[1] == channels else ""
    raise ValueError(f"VAE {what} must be NHWC [B, H, W, {channels}], got {x.shape}{hint}")
