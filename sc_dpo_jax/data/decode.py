"""Graph-side decoding of one record: parse, check, decode images or sample latents, resize, crop, flip.

:func:`make_decoder` returns a ``tf.function``-compatible map ``(raw, element_seed) -> dict`` for one
:class:`~sc_dpo_jax.data.schema.RecordSpec`. It never fails on a record that parses: a field with the wrong
number of values or bytes, or a non-finite number, sets ``_ok`` to False and fills the field with zeros, so
the pipeline can skip and count the record or stop with an explanation (``pipeline.explain_record``). What
can still raise inside the graph (a corrupt proto, a field of the wrong list type, an undecodable image) is
dropped by the pipeline's ``ignore_errors``, which notices the gap in the record ordinals.

Outputs (pairs): ``prompt``, ``source_id`` and, when the spec has it, ``prompt_chosen`` (strings); with
encoded images ``image_chosen`` and ``image_rejected`` as ``uint8 [R, R, 3]`` (shorter side resized to
``R = resolution`` with antialiased bilinear filtering, then centre-cropped; with ``random_flip`` both images of
a pair flipped together, as the official Diffusion-DPO code transforms the concatenated pair); from stored
moments ``moments_chosen`` and ``moments_rejected``, ``latents_chosen`` and ``latents_rejected`` as
``float32 [h, w, c]`` = ``(mean + std * eps - shift) * scale`` (the diffusion model's latents;
``latents="mean"`` uses the mean, ``latents="moments"`` passes ``moments_chosen`` and ``moments_rejected``
``[h, w, 2c]`` on for the device to sample), the logvar clipped to ``[-30, 20]`` as diffusers does;
``text_states`` (and ``text_states_chosen``) ``float32 [L, D]``; ``cost_chosen``, ``cost_rejected`` float32;
``harmful_prompt`` int32. Prompts: ``prompt``, ``negative_prompt``, ``categories``, ``source_id``, ``seed``
int64, ``guidance`` float32.

Randomness (flip, latent noise) is stateless, from ``element_seed`` = (dataset seed, position), so a record
gets the same flip and noise whenever it is read at the same position (the basis of exact resume).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import tensorflow as tf

from sc_dpo_jax.data.schema import IMAGE, LATENT, PAIR, RecordSpec

LOGVAR_RANGE = (-30.0, 20.0)   # diffusers' DiagonalGaussianDistribution (and models.vae)


def _first(values, default):
  """The first value of a parsed VarLen feature, or ``default`` when there is none."""
  return tf.concat([values, tf.reshape(default, [1])], axis=0)[0]


def resize_and_crop(image: tf.Tensor, resolution: int) -> tf.Tensor:
  """``uint8 [H, W, 3]`` -> ``float32 [R, R, 3]`` in [0, 255]: shorter side to ``R`` (antialiased bilinear,
  as torchvision's ``Resize(R)`` with antialias), then the centre ``R x R``."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = resolution / tf.minimum(h, w)
  nh = tf.maximum(resolution, tf.cast(tf.round(h * scale), tf.int32))
  nw = tf.maximum(resolution, tf.cast(tf.round(w * scale), tf.int32))
  image = tf.image.resize(image, tf.stack([nh, nw]), method="bilinear", antialias=True)
  top, left = (nh - resolution) // 2, (nw - resolution) // 2
  return tf.ensure_shape(image[top:top + resolution, left:left + resolution, :], [resolution, resolution, 3])


def _to_uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


LATENT_MODES = ("sample", "mean", "moments")


def make_decoder(spec: RecordSpec, *, resolution: Optional[int] = None, random_flip: bool = False,
                 latents: str = "sample") -> Callable[[tf.Tensor, tf.Tensor], Dict[str, tf.Tensor]]:
  """The map ``(raw serialized record, element_seed int64[2]) -> dict of tensors`` for ``spec``.

  ``latents`` (latent datasets): ``"sample"`` draws the diffusion model's latents here; ``"mean"`` uses the
  mean; ``"moments"`` passes the moments on as ``moments_chosen`` / ``moments_rejected`` for the device to
  sample (``data.latents.sample_latents``), which spares the host the noise (the fastest mode).
  """
  if latents not in LATENT_MODES:
    raise ValueError(f"latents = {latents!r}; choose one of {LATENT_MODES}")
  if spec.kind == PAIR and spec.image_format == IMAGE and not resolution:
    raise ValueError("image pair datasets need a resolution (images are resized and cropped to it)")
  if random_flip and not (spec.kind == PAIR and spec.image_format == IMAGE):
    raise ValueError("random_flip applies to encoded images; this dataset has "
                     f"{'latents' if spec.image_format == LATENT else 'no images'} (flip before precomputing)")

  features = {}     # field name -> feature; parsed under the spec's stored names (older formats)
  for name in spec.string_fields + tuple(spec.array_fields):
    features[name] = tf.io.VarLenFeature(tf.string)
  for name in spec.float_fields:
    features[name] = tf.io.VarLenFeature(tf.float32)
  for name in spec.int_fields:
    features[name] = tf.io.VarLenFeature(tf.int64)
  stored = {spec.stored_name(name): feature for name, feature in features.items()}

  def decode(raw, element_seed):
    parsed = tf.io.parse_single_example(raw, stored)
    ok = tf.constant(True)
    out = {}
    for name in features:
      values = parsed[spec.stored_name(name)].values
      ok = tf.logical_and(ok, tf.equal(tf.size(values), 1))
      default = {tf.string: b"", tf.float32: 0.0, tf.int64: 0}[values.dtype]
      out[name] = _first(values, tf.constant(default, values.dtype))
    for name, (shape, dtype) in spec.array_fields.items():
      n = 1
      for d in shape:
        n *= d
      nbytes = n * tf.as_dtype(dtype).size
      right = tf.equal(tf.strings.length(out[name]), nbytes)
      ok = tf.logical_and(ok, right)
      array = tf.cond(right,
                      lambda b=out[name], s=shape, d=dtype: tf.reshape(tf.io.decode_raw(b, d, little_endian=True), s),
                      lambda s=shape, d=dtype: tf.zeros(s, d))
      array = tf.cast(array, tf.float32)
      finite = tf.reduce_all(tf.math.is_finite(array))
      ok = tf.logical_and(ok, finite)
      out[name] = tf.where(finite, array, tf.zeros_like(array))
    for name in spec.float_fields:
      finite = tf.math.is_finite(out[name])
      ok = tf.logical_and(ok, finite)
      out[name] = tf.where(finite, out[name], 0.0)
    if spec.kind == PAIR and "harmful_prompt" in out:
      out["harmful_prompt"] = tf.cast(out["harmful_prompt"], tf.int32)

    if spec.kind == PAIR and spec.image_format == IMAGE:
      flip = tf.constant(False)
      if random_flip:
        flip = tf.random.stateless_uniform([], seed=element_seed + tf.constant([1, 0], tf.int64)) < 0.5
      for name in ("image_chosen", "image_rejected"):
        image = tf.io.decode_image(out[name], channels=3, expand_animations=False)   # raises when undecodable
        image = resize_and_crop(image, resolution)
        image = tf.cond(flip, lambda im=image: tf.reverse(im, axis=[1]), lambda im=image: im)
        out[name] = _to_uint8(image)
    if spec.kind == PAIR and spec.image_format == LATENT and latents != "moments":    # "moments": as stored
      scale = float(spec.latent_scaling_factor)
      shift = float(spec.latent_shift_factor or 0.0)
      for i, which in enumerate(("chosen", "rejected")):
        moments = out.pop(f"moments_{which}")
        mean, logvar = tf.split(moments, 2, axis=-1)
        z = mean
        if latents == "sample":
          logvar = tf.clip_by_value(logvar, *LOGVAR_RANGE)
          eps = tf.random.stateless_normal(tf.shape(mean), seed=element_seed + tf.constant([2 + i, 0], tf.int64))
          z = mean + tf.exp(0.5 * logvar) * eps
        out[f"latents_{which}"] = (z - shift) * scale
    out["_ok"] = ok
    return out

  return decode
