"""The one attention entry point of the project.

Every model (UNet, CLIP) calls :func:`dot_product_attention`; which kernel runs is a config choice:

``"reference"``
    Plain einsum with the softmax in float32. Slow and memory-hungry (it materialises the full
    ``[batch, heads, q, k]`` logits) but obviously correct: the tests and the CPU use it.
``"xla"``
    ``jax.nn.dot_product_attention(implementation="xla")``: XLA's fused attention on any backend.
``"cudnn"``
    ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention on NVIDIA GPUs
    (float16/bfloat16 inputs only; cuDNN accumulates and takes the softmax in float32 itself).
``"auto"``
    ``"cudnn"`` where it can run (:func:`cudnn_refusal`: an NVIDIA GPU of compute capability 8.0 or later,
    float16/bfloat16 compute, every head at most 256 wide on Hopper and later, 128 before, and a multiple of 8),
    ``"xla"`` everywhere else (CPU, TPU, float32 compute, the SD VAE's 512-wide head).

The loaders (``load_unet``, ``load_clip_text``/``load_clip_vision``, ``load_vae``, ``load_pipeline``) call
:func:`resolve` once with the model's head widths and compute dtype: ``"auto"`` becomes a concrete kernel (logged as
``unet attention: auto -> xla (platform cpu)``), and ``"cudnn"`` where it cannot run is a ``ValueError`` at load
time that says to use ``"auto"`` or ``"xla"``. A module built directly with ``"auto"`` decides per call instead,
from the call's head width and dtype.

Layout is ``[batch, length, heads, head_dim]`` for queries, keys and values (JAX's ``BTNH``).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
from absl import logging

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "auto")
KERNELS = ("reference", "xla", "cudnn")   # what "auto" resolves to (it picks xla or cudnn)
# cuDNN's fused flash attention: Ampere (8.0) and later; heads up to 256 wide from Hopper (9.0), 128 before.
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class Platform:
  """What decides which attention kernels can run: jax's backend (``cpu``, ``gpu``, ``tpu``) and, for a GPU,
  whether it is NVIDIA's (CUDA, whose jax plugin brings cuDNN) and its compute capability."""
  backend: str
  cuda: bool = False
  compute_capability: Optional[Tuple[int, int]] = None
  device_kind: str = ""
  has_cudnn: bool = True

  def __str__(self) -> str:
    if self.backend != "gpu":
      return f"platform {self.backend}"
    kind = f"{self.device_kind}, " if self.device_kind else ""
    if not self.cuda:
      return f"platform gpu ({kind}not CUDA)"
    cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "unknown"
    return f"platform gpu ({kind}compute capability {cc})"


def current_platform() -> Platform:
  """The :class:`Platform` of ``jax.devices()[0]`` (this initialises jax's backend)."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return Platform(backend=device.platform, device_kind=device.device_kind)
  version = str(getattr(device.client, "platform_version", "")).lower()
  cuda = "cuda" in version
  cc = None
  if cuda and getattr(device, "compute_capability", None):
    cc = tuple(int(x) for x in str(device.compute_capability).split(".")[:2])
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    has_cudnn = cuda_versions is not None
  except ImportError:  # a jax without that module: let cuDNN itself say
    has_cudnn = True
  return Platform(backend="gpu", cuda=cuda, compute_capability=cc, device_kind=device.device_kind,
                  has_cudnn=has_cudnn)


def cudnn_max_head_dim(compute_capability: Tuple[int, int]) -> int:
  """The widest head cuDNN's flash attention takes: 256 on Hopper (9.0) and later, 128 before."""
  return 256 if tuple(compute_capability) >= (9, 0) else 128


def cudnn_refusal(head_dims: Iterable[int], dtype, platform: Platform) -> Optional[str]:
  """Why cuDNN flash attention cannot run heads ``head_dims`` wide computed in ``dtype`` on ``platform``, or
  None when it can (the checks of ``jax.nn.dot_product_attention(implementation="cudnn")``, made up front)."""
  if platform.backend != "gpu" or not platform.cuda:
    return f"cuDNN flash attention runs on NVIDIA GPUs only, and this is {platform}"
  if not platform.has_cudnn:
    return f"jax's CUDA plugin reports no cuDNN ({platform})"
  cc = platform.compute_capability
  if cc is None or tuple(cc) < CUDNN_MIN_COMPUTE_CAPABILITY:
    return (f"cuDNN flash attention needs compute capability {'.'.join(map(str, CUDNN_MIN_COMPUTE_CAPABILITY))} "
            f"or later ({platform})")
  if dtype is None or jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return (f"cuDNN takes float16/bfloat16 inputs and the model computes in {jnp.dtype(dtype).name if dtype else None} "
            "(set the compute dtype to bfloat16)")
  limit = cudnn_max_head_dim(cc)
  bad = sorted({int(d) for d in head_dims if d > limit or d % 8})
  if bad:
    return f"heads {bad} wide are beyond cuDNN on {platform}, which takes heads at most {limit} wide, multiples of 8"
  return None


def resolve(name: str, *, head_dims: Iterable[int], dtype, platform: Optional[Platform] = None,
            what: str = "model") -> str:
  """The concrete kernel (one of :data:`KERNELS`) for attention ``name`` in a model (``what``, for messages)
  whose heads are ``head_dims`` wide and that computes in ``dtype``, on ``platform`` (default: this machine's).

  ``"reference"`` and ``"xla"`` are returned as they are (the platform is not queried). ``"auto"`` is ``"cudnn"``
  when :func:`cudnn_refusal` finds nothing against it, else ``"xla"``; the choice is logged. ``"cudnn"`` where
  it cannot run raises ``ValueError`` saying why and to use ``"auto"`` or ``"xla"``.
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{what}: unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}")
  if name in ("reference", "xla"):
    return name
  head_dims = tuple(int(d) for d in head_dims)
  platform = current_platform() if platform is None else platform
  reason = cudnn_refusal(head_dims, dtype, platform)
  if name == "cudnn":
    if reason:
      raise ValueError(f"{what} attention 'cudnn' cannot run here: {reason}. Use attention 'auto' (cuDNN where it "
                       "can run, XLA elsewhere) or 'xla' instead (in a trainer config: --config.model.attention=auto)")
    return "cudnn"
  choice = "xla" if reason else "cudnn"
  detail = str(platform) if not reason or platform.backend != "gpu" else f"{platform}: {reason}"
  logging.info("%s attention: auto -> %s (%s)", what, choice, detail)
  return choice


def unet_head_dims(config) -> Tuple[int, ...]:
  """The head widths of a ``UNetConfig``'s attention blocks (``channels // heads`` of each block with
  cross-attention, and of the mid block)."""
  dims = set()
  for i, (ch, heads) in enumerate(zip(config.block_out_channels, config.attention_head_dim)):
    if "CrossAttn" in config.down_block_types[i] or "CrossAttn" in config.up_block_types[-1 - i]:
      dims.add(ch // heads)
  if "CrossAttn" in config.mid_block_type:
    dims.add(config.block_out_channels[-1] // config.attention_head_dim[-1])
  return tuple(sorted(dims))


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          implementation: str = "reference", scale: Optional[float] = None,
                          is_causal: bool = False, upcast: bool = False) -> jax.Array:
  """Scaled dot-product attention, ``softmax(q k^T * scale) v``.

  Args:
    query: ``[B, Lq, H, D]``.
    key, value: ``[B, Lk, H, D]``.
    implementation: one of :data:`IMPLEMENTATIONS` (``"auto"`` picks per call, see :func:`resolve`).
    scale: multiplies the logits; ``D ** -0.5`` when None.
    is_causal: mask keys after the query position (CLIP's text transformer).
    upcast: compute the ``q k^T`` product in float32 as well (diffusers' ``upcast_attention``, needed
      by SD2.x in half precision). The softmax is float32 in every implementation regardless.

  Returns:
    ``[B, Lq, H, D]`` in the dtype of ``query``.
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f"attention expects [batch, length, heads, head_dim] inputs, got shapes "
                     f"{query.shape}, {key.shape}, {value.shape}")
  if scale is None:
    scale = query.shape[-1] ** -0.5
  out_dtype = query.dtype
  if implementation == "auto":
    refused = cudnn_refusal((query.shape[-1],), query.dtype, current_platform())
    implementation = "xla" if refused else "cudnn"
  if implementation == "reference":
    return _reference(query, key, value, scale=scale, is_causal=is_causal, upcast=upcast)
  if implementation == "xla":
    if upcast:
      query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
    out = jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=is_causal,
                                       implementation="xla")
    return out.astype(out_dtype)
  if implementation == "cudnn":
    if query.dtype not in (jnp.float16, jnp.bfloat16):
      raise ValueError(f"attention implementation 'cudnn' takes float16/bfloat16 inputs, got {query.dtype}; "
                       "compute in bfloat16 (dtype=jnp.bfloat16) or use 'xla'")
    return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=is_causal,
                                        implementation="cudnn")
  raise ValueError(f"unknown attention implementation {implementation!r}; "
                   f"choose one of {IMPLEMENTATIONS}")


def _reference(query, key, value, *, scale, is_causal, upcast):
  out_dtype = query.dtype
  if upcast:
    query, key = query.astype(jnp.float32), key.astype(jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32) * scale
  if is_causal:
    q_len, k_len = logits.shape[-2:]
    mask = jnp.tril(jnp.ones((q_len, k_len), dtype=bool))  # top-left aligned, as torch and jax.nn
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value).astype(out_dtype)
