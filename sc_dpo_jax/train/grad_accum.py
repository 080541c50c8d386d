"""Gradient accumulation inside the DPO family's jitted step (``train.dpo_steps``, ``grad_accum_steps = k``).

With ``grad_accum_steps = k`` (``config.train.grad_accum_steps``) one call of the step is still one
optimiser update over the batch's ``B`` pairs, computed as ``k`` micro-batches of ``B / k`` pairs in a
``jax.lax.scan`` inside the jitted step. Why a scan and not ``optax.MultiSteps`` (one call per micro-batch,
the sum in the optimiser state): memory is the same (activations of one micro-batch, and one accumulator
the size of the trainable parameters, float32: 3.4 GB for the whole SD1.5 UNet), but with the scan
``data.batch_size`` stays the batch of an update, so ``optim.lr_rule``'s ``per_sample`` scaling,
``state.step``, the schedule, ``train.steps`` and checkpoints all count optimiser updates, the metrics are
those of the whole batch, and a checkpoint never holds half an accumulation. The price: the host hands over
the whole batch at once (precomputed latent moments: 256 KB a pair for SD1.5) and XLA all-reduces (under FSDP:
reduce-scatters) each micro-batch's gradient, ``k`` collectives per update instead of one.

* The batch is split strided (micro-batch ``m`` = rows ``m, m + k, ...``: :func:`split_micro_batches`), which
  under data parallelism moves no data when ``B`` is divisible by ``k x`` the data-parallel devices
  (:func:`check_batch_split` says so naming the keys otherwise).
* The random draws (t, eps, prompt dropout) are made for the whole batch with the same calls as one pass
  (:func:`draw_noise`) and split with it, so every pair gets the same t and noise for any ``k``, and ``k``
  micro-batches give the update of one pass up to float32 summation order (tested: about 1e-6 relative).
* Diffusion-DPO and DUO losses are means over pairs (DUO's prior term a mean over its equal-sized inputs),
  so the update's gradient is the mean of the micro-batch gradients, and the metrics their means.
* SC-DPO's Dynamic Focusing normalises its weights to mean 1 over THE WHOLE BATCH, as one pass does (our
  choice: normalising per micro-batch would make the objective depend on ``k``, and a micro-batch of 8 pairs
  would give its hardest pair a weight up to 8 whatever the other micro-batches hold). With
  ``f_i = (1 - sigmoid(z_i))^gamma``, ``S_m = sum over micro-batch m of f_i`` and ``loss_m`` the
  micro-batch's loss (weights normalised over it), the batch's loss is ``sum_m S_m loss_m / sum_m S_m`` and its
  gradient likewise; the scan keeps ``sum_m S_m grad_m`` relative to the running maximum of ``log S_m``. The
  loss and the ``focus_weight_*`` metrics are the whole batch's; the others are means over micro-batches.
* A ``prepare`` function (VAE and text encoding) runs inside the scan on each micro-batch, so its activations
  too are those of ``B / k`` pairs.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sc_dpo_jax import losses
from sc_dpo_jax.train.dpo_inputs import Noise, draw_noise, require

PREPARE_SALT = 0x5eed   # the prepare function's rng: fold_in(fold_in(rng, step), PREPARE_SALT) (as train.loop)


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} = {value!r} must be an integer >= 1")
  return int(value)


def check_batch_split(batch_size: int, grad_accum_steps: int = 1, data_parallel: int = 1) -> int:
  """The micro-batch size ``batch_size / grad_accum_steps``, after checking that every micro-batch splits
  evenly over the ``data_parallel`` devices that share the batch (mesh ``data x fsdp``): ``batch_size`` must be
  divisible by ``grad_accum_steps * data_parallel``; ``ValueError`` naming the keys otherwise."""
  k = positive_int("config.train.grad_accum_steps", grad_accum_steps)
  d = positive_int("the data-parallel size (config.mesh data x fsdp)", data_parallel)
  n = positive_int("config.data.batch_size", batch_size)
  if n % (k * d):
    raise ValueError(
        f"config.data.batch_size = {n} pairs is not divisible by config.train.grad_accum_steps ({k}) x the "
        f"data-parallel devices (config.mesh data x fsdp = {d}) = {k * d}: each of the {k} micro-batches is split "
        f"evenly over the {d} devices. Set config.data.batch_size to a multiple of {k * d} (e.g. "
        f"{-(-n // (k * d)) * k * d}) or config.train.grad_accum_steps to a divisor of batch_size / {d}")
  return n // k


def batch_rows(batch: Mapping) -> int:
  """The common leading size of every array in ``batch`` (the pairs); ``ValueError`` naming the fields if they
  differ."""
  sizes = {key: (value.shape[0] if getattr(value, "ndim", 0) else None) for key, value in batch.items()}
  if not sizes or len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"every batch field must have the pairs as its leading axis, of one size; got leading sizes "
                     f"{sizes}")
  return next(iter(sizes.values()))


def split_micro_batches(tree, k: int):
  """``[B, ...] -> [k, B / k, ...]`` for every leaf; micro-batch ``m`` holds rows ``m, m + k, m + 2k, ...``.

  Strided, not contiguous: with the batch split over ``D`` devices in contiguous blocks of ``B / D`` rows and
  ``B`` divisible by ``k * D``, each device's block splits into its own ``k`` micro-batches, so the split moves
  no data (contiguous micro-batches would each sit on ``D / k`` of the devices, and XLA all-gathers them).
  """
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), tree)


def accumulated_gradients(grad_fn, schedule, c, params, frozen, batch, rng, prepare, prepare_rng, k: int):
  """``(grads, metrics)`` of the whole ``batch`` as ``k`` micro-batches in a ``lax.scan`` (see the module
  docstring): the same update as one pass over the batch up to float32 summation order."""
  micro = split_micro_batches(batch, k)
  if prepare is None:
    latent_shape = require(batch, "latents_chosen", "chosen latents [B, h, w, c]", c.method).shape[1:]
  else:
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro)
    prepared = jax.eval_shape(prepare, frozen, one, prepare_rng)
    latent_shape = require(prepared, "latents_chosen", "chosen latents the prepare function returns",
                            c.method).shape[1:]
  dropout = float(c.prompt_dropout)
  noise = split_micro_batches(draw_noise(schedule, c, rng, batch_rows(batch), latent_shape, dropout), k)
  weighted = c.method == "sc_dpo"
  gamma = float(c.focus_gamma)

  def body(carry, xs):
    acc, top = carry
    mb, noise_m, m = xs
    if prepare is not None:
      mb = prepare(frozen, mb, jax.random.fold_in(prepare_rng, m))
    (_, (metrics, z)), grads = grad_fn(params, frozen, mb, rng, Noise(*noise_m))
    if not weighted:
      return (jax.tree.map(jnp.add, acc, grads), top), (metrics, None, None)
    # SC-DPO: loss_m = sum_{i in m} f_i loss_i / S_m with S_m = sum_{i in m} f_i, f_i = (1 - sigmoid(z_i))^gamma;
    # the whole batch's gradient is sum_m S_m grad_m / sum_m S_m. acc = sum_m exp(log S_m - top) grad_m,
    # rescaled whenever the running maximum `top` of log S_m rises (so no S_m under- or overflows).
    log_mass = jax.nn.logsumexp(gamma * jax.nn.log_sigmoid(-z))
    new_top = jnp.maximum(top, log_mass)
    old, new = jnp.exp(top - new_top), jnp.exp(log_mass - new_top)
    acc = jax.tree.map(lambda a, g: a * old + g * new, acc, grads)
    return (acc, new_top), (metrics, z, log_mass)

  init = (jax.tree.map(jnp.zeros_like, params), jnp.full((), -jnp.inf, jnp.float32))
  (acc, top), (metrics, z, log_mass) = jax.lax.scan(body, init, (micro, noise, jnp.arange(k)))
  means = {key: jnp.mean(value) for key, value in metrics.items()}   # equal micro-batches: the batch's means
  if not weighted:
    return jax.tree.map(lambda a: a / k, acc), means
  mass = jnp.exp(log_mass - top)   # [k]: S_m / max_m S_m
  total = jnp.sum(mass)
  means["loss"] = jnp.sum(mass * metrics["loss"]) / total
  w = losses.focusing_weights(z.reshape(-1), gamma)   # the whole batch's weights, as one pass computes them
  means.update(focus_weight_min=jnp.min(w), focus_weight_max=jnp.max(w), focus_weight_std=jnp.std(w))
  return jax.tree.map(lambda a: a / total, acc), means
