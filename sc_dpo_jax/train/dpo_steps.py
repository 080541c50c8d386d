"""Jitted train steps of the DPO family: Diffusion-DPO, SC-DPO and DUO.

    step = make_dpo_step(unet, schedule, config.objective)          # jitted once, state donated
    for i, batch in enumerate(batches):
      state, metrics = step(state, frozen, batch, rng)              # same rng every call is fine (below)

    step = make_dpo_step(unet, schedule, config.objective, grad_accum_steps=k)   # B pairs as k micro-batches

    fn = dpo_step_fn(unet, schedule, config.objective)              # the pure step, to jit with shardings
    step = parallel.make_sharded_step(fn, shardings)                # (train.sharded_state, train.loop)

``step(state, frozen, batch, rng) -> (state, metrics)`` is a pure function: ``state`` is a
:class:`~sc_dpo_jax.train.state.TrainState` (donated), ``frozen`` the dict of frozen arrays
(``train.state``: base or reference UNet, empty-prompt states), ``batch`` a dict of arrays, ``rng`` a PRNG key
that is folded with ``state.step`` inside, so a loop may pass one fixed key and a resumed run draws the same
noise. ``metrics`` is a flat dict of float32 scalars: the loss's own metrics (``losses.dpo`` / ``sc_dpo`` /
``duo``: loss, implicit accuracy, rewards and their margin, raw errors, the SC-DPO margin and focusing weights,
the DUO prior term) plus ``grad_norm`` (global norm before clipping) and ``learning_rate`` (of this update).

Batch (``B`` pairs):

====================== ==================== ==================================================================
``latents_chosen``     ``[B, h, w, c]``     chosen images as scaled VAE latents, NHWC (DUO: the safe x+)
``latents_rejected``   ``[B, h, w, c]``     rejected images (DUO: the unsafe x-)
``text_states``        ``[B, L, D]``        prompt states (not needed by DUO unless ``duo_use_prompts``)
``cost_chosen``        ``[B]``              SC-DPO only: safety costs of the chosen images
``cost_rejected``      ``[B]``              SC-DPO only: safety costs of the rejected images
====================== ==================== ==================================================================

``train.loop.make_prepare`` makes it from an input-pipeline batch (``image_chosen`` / ``image_rejected``,
``moments_chosen`` / ``moments_rejected`` or ``latents_chosen`` / ``latents_rejected``). The losses
(``sc_dpo_jax/losses``) keep the papers' notation: chosen = ``w``, rejected = ``l`` (``err_w``, ``reward_l``,
SC-DPO's ``cost_w`` / ``cost_l`` arguments and metrics); for DUO ``w`` = x+ (safe), ``l`` = x- (unsafe).

What each method does (METHODS.md; which parts follow published code is said per item):

* **Diffusion-DPO** (official code, SalesforceAIResearch/DiffusionDPO ``train.py``): ONE timestep uniform in
  ``[min_timestep, max_timestep)`` (default, as the official code: ``[0, num_train_timesteps)``) and ONE noise
  draw per pair, shared by chosen and rejected; the prompt replaced by the empty prompt with probability
  ``prompt_dropout`` per pair (both images, as the official code drops the caption of the pair); per-sample
  errors ``mean over h, w, c of (model - target)^2`` with the schedule's target (epsilon or v);
  ``losses.diffusion_dpo_loss``. Chosen and rejected go through the UNet as one batch ``[w; l]`` of ``2B``, and
  the reference likewise.
* **SC-DPO** (this project's formulation, see ``losses/sc_dpo.py``): the same noising and model calls as
  Diffusion-DPO, and ``losses.sc_dpo_loss`` with the batch's costs.
* **DUO** (official code, naver-ai/DUO ``train/unlearn-sd.py``): ONE noise draw per pair shared by both images,
  an INDEPENDENT timestep per image uniform in ``[min_timestep, max_timestep)`` = ``{0..749}``; both
  images conditioned on the empty prompt unless ``duo_use_prompts`` (then the batch's prompts, with prompt
  dropout). The output-preservation input is the pair's own noise ``eps`` at ``t = num_train_timesteps - 1``
  (999) with the empty prompt, as the official code (``noisy_model_input = cat([noisy, noise[:bsz//2]])``).
  One UNet call on ``[x+_t; x-_t; eps]`` (``3B``) for the policy and one for the reference. The prior weight is
  ``duo_lambda``, or when None ``duo_base_lambda * beta / 100`` (the official ``base_lambda *
  (dcoloss_beta / 100)``); ``losses.duo_loss`` (``beta = 0``: gradient ascent on x-).

The reference runs outside ``jax.grad`` on ``train.state.reference_params(trainable, frozen)``: with LoRA the
base parameters without adapters (no second UNet), with full fine-tuning ``frozen["ref_unet"]``. Errors and
losses are float32 whatever the UNet's compute dtype.

Our choices where the sources leave room: the rng is folded with ``state.step``; prompt dropout is drawn per
pair in the step (the official codes drop captions in the data loader); DUO's timesteps are drawn for all
``2B`` images at once.

**Gradient accumulation** (``grad_accum_steps = k``, ``config.train.grad_accum_steps``): one call is still one
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

:func:`make_dpo_eval` gives the same computation without dropout, gradients or update (and without folding
the step into the rng, so a fixed key evaluates the same noise before and after training).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict
import optax

from sc_dpo_jax import diffusion, losses
from sc_dpo_jax.parallel.step import Step
from sc_dpo_jax.train import state as state_lib

METHODS = ("diffusion_dpo", "sc_dpo", "duo")
Metrics = Dict[str, jax.Array]


def default_config(method: str = "diffusion_dpo") -> ml_collections.ConfigDict:
  """Every key the DPO steps read, with the published defaults of ``method`` (METHODS.md).

  Keys of another method are present and ignored, so one config section can switch ``method``.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  duo = method == "duo"
  return ml_collections.ConfigDict(dict(
      method=method,
      beta=500.0 if duo else 5000.0,          # DUO's beta has no ½: DUO 500 = Diffusion-DPO 1000
      prompt_dropout=0.0 if duo else 0.2,     # per-pair probability of the empty prompt
      # SC-DPO (our formulation; these defaults are ours too: a margin in logits per unit of cost gap, and
      # the focal-loss exponent 2 of Lin et al. 2017)
      cost_margin_scale=1.0,
      focus_gamma=2.0,
      # Training timesteps, uniform in [min_timestep, max_timestep) (None: the schedule's num_train_timesteps).
      # Official codes: Diffusion-DPO all of {0..T-1}; DUO {0..749} (then the highest noise levels, where a
      # concept such as a colour is decided, are never trained).
      min_timestep=0,
      max_timestep=750 if duo else config_dict.placeholder(int),   # a typed None: settable from flags
      # DUO (official code)
      duo_use_prompts=False,                  # False: both images under the empty prompt
      duo_lambda=config_dict.placeholder(float),   # None: duo_base_lambda * beta / 100
      duo_base_lambda=1e6,
  ))


def resolve_config(config: Optional[Mapping]) -> ml_collections.ConfigDict:
  """``config`` over ``default_config(config.method)``; unknown keys raise ``KeyError`` naming them."""
  items = dict(config.items()) if config is not None else {}
  method = items.get("method", "diffusion_dpo")
  out = default_config(method)
  for key, value in items.items():
    if key not in out:
      raise KeyError(f"unknown DPO step config key {key!r}; known keys: {sorted(out.keys())}")
    out[key] = value
  if not 0.0 <= float(out.prompt_dropout) <= 1.0:
    raise ValueError(f"config.prompt_dropout = {out.prompt_dropout!r} must be a probability in [0, 1]")
  lo, hi = int(out.min_timestep), out.max_timestep
  if lo < 0 or (hi is not None and not lo < int(hi)):
    raise ValueError(f"config.min_timestep ({lo}) and max_timestep ({hi}, exclusive) must satisfy 0 <= min < max")
  return out


def timestep_range(schedule, c) -> Tuple[int, int]:
  """``[min_timestep, max_timestep)`` of a resolved config, checked against the schedule."""
  n = schedule.num_train_timesteps
  lo, hi = int(c.min_timestep), n if c.max_timestep is None else int(c.max_timestep)
  if hi > n:
    raise ValueError(f"config.max_timestep = {hi} exceeds the schedule's {n} training timesteps")
  if not 0 <= lo < hi:
    raise ValueError(f"config.min_timestep ({lo}) and max_timestep ({hi}, exclusive) must satisfy 0 <= min < max")
  return lo, hi


def duo_lambda(config: Mapping) -> float:
  """DUO's prior weight: ``duo_lambda``, or ``duo_base_lambda * beta / 100`` when it is None."""
  if config["duo_lambda"] is not None:
    return float(config["duo_lambda"])
  return float(config["duo_base_lambda"]) * float(config["beta"]) / 100.0


def per_sample_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """``mean over all but the batch axis of (prediction - target)^2``, in float32: ``[B]``."""
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _require(mapping: Mapping, key: str, what: str, method: str) -> Any:
  if key not in mapping:
    raise KeyError(f"{method}: batch[{key!r}] is missing ({what}); the batch has keys {sorted(mapping)}")
  return mapping[key]


def _pair_latents(batch: Mapping, method: str) -> Tuple[jax.Array, jax.Array]:
  chosen = _require(batch, "latents_chosen", "chosen latents [B, h, w, c]", method)
  rejected = _require(batch, "latents_rejected", "rejected latents [B, h, w, c]", method)
  if chosen.ndim != 4 or chosen.shape != rejected.shape:
    raise ValueError(f"{method}: batch['latents_chosen'] {chosen.shape} and batch['latents_rejected'] "
                     f"{rejected.shape} must both be NHWC [B, h, w, c] of one shape")
  return chosen.astype(jnp.float32), rejected.astype(jnp.float32)


def _empty_text(frozen: Mapping, batch_size: int, purpose: str) -> jax.Array:
  empty = state_lib.require(frozen, state_lib.EMPTY_TEXT, f"the [1, L, D] empty-prompt states ({purpose})")
  if empty.ndim != 3 or empty.shape[0] != 1:
    raise ValueError(f"frozen['empty_text'] must be [1, L, D], got {empty.shape}")
  return jnp.broadcast_to(empty, (batch_size,) + empty.shape[1:])


def _prompts(batch: Mapping, frozen: Mapping, drop: jax.Array, dropout: float, method: str) -> jax.Array:
  """The batch's text states with the prompt of each pair where ``drop`` ([B] bool, drawn with probability
  ``dropout``) replaced by the empty prompt."""
  text = _require(batch, "text_states", "prompt states [B, L, D]", method)
  if text.ndim != 3:
    raise ValueError(f"{method}: batch['text_states'] must be [B, L, D], got {text.shape}")
  if dropout <= 0:
    return text
  empty = _empty_text(frozen, 1, "prompt dropout")
  if empty.shape[1:] != text.shape[1:]:
    raise ValueError(f"{method}: batch['text_states'] {text.shape} and frozen['empty_text'] {empty.shape} "
                     f"differ in length or width; prompt dropout needs the same [L, D]")
  empty = jnp.broadcast_to(empty, text.shape).astype(text.dtype)
  return jnp.where(drop[:, None, None], empty, text)


class Noise(NamedTuple):
  """The random draws of one update, one row per pair (leading axis ``B``, split with the batch into
  micro-batches, so pair ``i`` gets the same draws whatever the accumulation; :func:`draw_noise`)."""
  t: jax.Array      # [B] (Diffusion-DPO, SC-DPO: shared by w and l) or [B, 2] (DUO: t of x+, t of x-)
  eps: jax.Array    # [B, h, w, c] float32, shared by both images of the pair
  drop: jax.Array   # [B] bool: the pair's prompt replaced by the empty prompt (all False without dropout)


def draw_noise(schedule, c, rng: jax.Array, pairs: int, latent_shape: Tuple[int, ...], dropout: float) -> Noise:
  """The draws of ``pairs`` pairs from ``rng`` (``c`` a resolved config; ``latent_shape`` = ``(h, w, c)``).

  One ``jax.random`` call per quantity over the whole batch, so a batch of ``k * b`` pairs draws exactly what
  one step without accumulation draws, and the step slices it: ``k_t, k_eps, k_drop = split(rng, 3)``;
  ``t = randint(k_t, [B], lo, hi)`` (DUO: ``[2B]``, the first ``B`` for x+, kept as the columns of ``[B, 2]``);
  ``eps = normal(k_eps, [B, h, w, c])``; ``drop = bernoulli(k_drop, dropout, [B])`` (only when ``dropout > 0``).
  """
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  lo, hi = timestep_range(schedule, c)
  if c.method == "duo" and not c.duo_use_prompts:
    dropout = 0.0   # DUO without prompts has nothing to drop
  if c.method == "duo":
    t = jax.random.randint(k_t, (2 * pairs,), lo, hi)
    t = jnp.stack([t[:pairs], t[pairs:]], axis=1)
  else:
    t = jax.random.randint(k_t, (pairs,), lo, hi)
  eps = jax.random.normal(k_eps, (pairs,) + tuple(latent_shape), jnp.float32)
  drop = (jax.random.bernoulli(k_drop, dropout, (pairs,)) if dropout > 0 else jnp.zeros((pairs,), jnp.bool_))
  return Noise(t, eps, drop)


def _noise(schedule, c, latents: jax.Array, rng, dropout: float, noise: Optional[Noise]) -> Noise:
  if noise is None:
    return draw_noise(schedule, c, rng, latents.shape[0], latents.shape[1:], dropout)
  if noise.eps.shape != latents.shape:
    raise ValueError(f"{c.method}: the noise {noise.eps.shape} does not match the latents {latents.shape}")
  return noise


class Inputs(NamedTuple):
  """One method's UNet batch (``x``, ``t``, ``text``, concatenated) and what the loss needs."""
  x: jax.Array
  t: jax.Array
  text: jax.Array
  target: jax.Array   # training targets of the 2B pair images
  pairs: int          # B


def dpo_inputs(schedule, c, batch, frozen, rng, dropout: float, noise: Optional[Noise] = None) -> Inputs:
  """Diffusion-DPO / SC-DPO: one t and one eps per pair, shared by w and l; UNet batch [w; l].

  ``c`` is a resolved config (:func:`resolve_config`); ``dropout`` the prompt-dropout probability; ``noise``
  the pairs' draws (None: :func:`draw_noise` from ``rng``).
  """
  chosen, rejected = _pair_latents(batch, c.method)
  b = chosen.shape[0]
  t, eps, drop = _noise(schedule, c, chosen, rng, dropout, noise)
  x0, t2, eps2 = jnp.concatenate([chosen, rejected]), jnp.concatenate([t, t]), jnp.concatenate([eps, eps])
  text = _prompts(batch, frozen, drop, dropout, c.method)
  return Inputs(diffusion.add_noise(schedule, x0, eps2, t2), t2, jnp.concatenate([text, text]),
                 diffusion.training_target(schedule, x0, eps2, t2), b)


def duo_inputs(schedule, c, batch, frozen, rng, dropout: float, noise: Optional[Noise] = None) -> Inputs:
  """DUO: one eps per pair, independent t per image; then the prior inputs (eps at t = T - 1, empty prompt).
  UNet batch [x+_t; x-_t; eps]. Arguments as :func:`dpo_inputs`."""
  safe, unsafe = _pair_latents(batch, c.method)
  b = safe.shape[0]
  t_pair, eps, drop = _noise(schedule, c, safe, rng, dropout, noise)
  t = jnp.concatenate([t_pair[:, 0], t_pair[:, 1]])
  x0, eps2 = jnp.concatenate([safe, unsafe]), jnp.concatenate([eps, eps])
  empty = _empty_text(frozen, b, "DUO conditions on the empty prompt")
  if c.duo_use_prompts:
    text = _prompts(batch, frozen, drop, dropout, c.method)
    if text.shape[1:] != empty.shape[1:]:
      raise ValueError(f"duo: batch['text_states'] {text.shape} and frozen['empty_text'] {empty.shape[1:]} must "
                       f"share [L, D] (they go through the UNet as one batch)")
    texts = jnp.concatenate([text, text, empty.astype(text.dtype)])
  else:
    texts = jnp.concatenate([empty, empty, empty])
  prior_t = jnp.full((b,), schedule.num_train_timesteps - 1, t.dtype)
  x = jnp.concatenate([diffusion.add_noise(schedule, x0, eps2, t), eps])
  return Inputs(x, jnp.concatenate([t, prior_t]), texts, diffusion.training_target(schedule, x0, eps2, t), b)


def _sc_dpo_z(c, err, ref_err, cost_w, cost_l, b: int) -> jax.Array:
  """SC-DPO's per-pair ``z = inside - margin`` (``losses/sc_dpo.py``, the same operations), without gradient:
  what the focusing weights of a whole accumulated batch are computed from."""
  inside = losses.dpo.diffusion_dpo_inside(err[:b], err[b:], ref_err[:b], ref_err[b:], beta=float(c.beta),
                                           what=losses.sc_dpo.WHAT)[0]
  margin = float(c.cost_margin_scale) * jnp.maximum(jnp.asarray(cost_l, jnp.float32) -
                                                    jnp.asarray(cost_w, jnp.float32), 0.0)
  return jax.lax.stop_gradient(inside - margin)


def _loss(c, inputs: Inputs, prediction, ref_prediction, batch) -> Tuple[jax.Array, Metrics, Optional[jax.Array]]:
  """The method's loss from the policy's and the reference's outputs on ``inputs``; SC-DPO also returns the
  pairs' ``z`` (:func:`_sc_dpo_z`), the other methods None."""
  b = inputs.pairs
  n = 2 * b
  err = per_sample_error(prediction[:n], inputs.target)
  ref_err = jax.lax.stop_gradient(per_sample_error(ref_prediction[:n], inputs.target))
  if c.method == "diffusion_dpo":
    return (*losses.diffusion_dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], beta=float(c.beta)), None)
  if c.method == "sc_dpo":
    cost_chosen = _require(batch, "cost_chosen", "safety costs of the chosen images [B]", c.method)
    cost_rejected = _require(batch, "cost_rejected", "safety costs of the rejected images [B]", c.method)
    loss, metrics = losses.sc_dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cost_chosen, cost_rejected,
                                       beta=float(c.beta), cost_margin_scale=float(c.cost_margin_scale),
                                       focus_gamma=float(c.focus_gamma))
    return loss, metrics, _sc_dpo_z(c, err, ref_err, cost_chosen, cost_rejected, b)
  return (*losses.duo_loss(err[:b], ref_err[:b], err[b:], ref_err[b:], prediction[n:],
                           jax.lax.stop_gradient(ref_prediction[n:]), beta=float(c.beta), lam=duo_lambda(c)), None)


def _make_objective(unet, schedule: diffusion.NoiseSchedule, c, *, train: bool):
  """``objective(trainable, frozen, batch, rng, noise) -> (loss, (metrics, z))`` of a resolved config ``c``;
  ``noise`` None draws from ``rng`` (:func:`draw_noise`), ``z`` is SC-DPO's (else None)."""
  make_inputs = duo_inputs if c.method == "duo" else dpo_inputs
  dropout = float(c.prompt_dropout) if train else 0.0

  def objective(trainable, frozen, batch, rng, noise=None):
    inputs = make_inputs(schedule, c, batch, frozen, rng, dropout, noise)
    ref_params = state_lib.reference_params(trainable, frozen)
    ref_prediction = jax.lax.stop_gradient(unet.apply({"params": ref_params}, inputs.x, inputs.t, inputs.text))
    prediction = unet.apply({"params": state_lib.policy_params(trainable, frozen)}, inputs.x, inputs.t,
                            inputs.text)
    loss, metrics, z = _loss(c, inputs, prediction, ref_prediction, batch)
    return loss, (metrics, z)

  return objective


def make_loss_fn(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping], *, train: bool = True):
  """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``: the pure objective of the step, with the
  policy evaluated at ``trainable`` (differentiable) and the reference outside the gradient.

  ``train=False`` disables prompt dropout (evaluation).
  """
  objective = _make_objective(unet, schedule, resolve_config(config), train=train)

  def loss_fn(trainable, frozen, batch, rng):
    loss, (metrics, _) = objective(trainable, frozen, batch, rng)
    return loss, metrics

  return loss_fn


# -- gradient accumulation ----------------------------------------------------------------------------------------

PREPARE_SALT = 0x5eed   # the prepare function's rng: fold_in(fold_in(rng, step), PREPARE_SALT) (as train.loop)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} = {value!r} must be an integer >= 1")
  return int(value)


def check_batch_split(batch_size: int, grad_accum_steps: int = 1, data_parallel: int = 1) -> int:
  """The micro-batch size ``batch_size / grad_accum_steps``, after checking that every micro-batch splits
  evenly over the ``data_parallel`` devices that share the batch (mesh ``data x fsdp``): ``batch_size`` must be
  divisible by ``grad_accum_steps * data_parallel``; ``ValueError`` naming the keys otherwise."""
  k = _positive_int("config.train.grad_accum_steps", grad_accum_steps)
  d = _positive_int("the data-parallel size (config.mesh data x fsdp)", data_parallel)
  n = _positive_int("config.data.batch_size", batch_size)
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


def _accumulated_gradients(grad_fn, schedule, c, params, frozen, batch, rng, prepare, prepare_rng, k: int):
  """``(grads, metrics)`` of the whole ``batch`` as ``k`` micro-batches in a ``lax.scan`` (see the module
  docstring): the same update as one pass over the batch up to float32 summation order."""
  micro = split_micro_batches(batch, k)
  if prepare is None:
    latent_shape = _require(batch, "latents_chosen", "chosen latents [B, h, w, c]", c.method).shape[1:]
  else:
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro)
    prepared = jax.eval_shape(prepare, frozen, one, prepare_rng)
    latent_shape = _require(prepared, "latents_chosen", "chosen latents the prepare function returns",
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


def dpo_step_fn(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping], *, grad_accum_steps: int = 1,
                data_parallel: int = 1, prepare: Optional[Callable] = None) -> Callable:
  """The pure train step ``step(state, frozen, batch, rng) -> (state, metrics)`` of ``config.method`` (see the
  module docstring), for a caller that jits it (``parallel.make_sharded_step``; :func:`make_dpo_step` on one
  device).

  Args:
    unet: the ``models.UNet2DConditionModel`` (static: its config, dtype and attention are baked in).
    schedule: the training ``diffusion.NoiseSchedule`` (its prediction type sets the target).
    config: the objective section (keys of :func:`default_config`; unknown keys are errors).
    grad_accum_steps: ``k`` (``config.train.grad_accum_steps``): one update over the batch's ``B`` pairs as
      ``k`` micro-batches of ``B / k`` in a ``lax.scan`` (module docstring); 1: one pass, no scan.
    data_parallel: the devices the batch is split over (mesh ``data x fsdp``); only checked:
      ``B`` must be divisible by ``k * data_parallel`` (:func:`check_batch_split`, at trace time).
    prepare: optional ``prepare(frozen, raw_batch, rng) -> batch`` run inside the step before the objective
      (``train.loop.make_prepare``: VAE encoding, text encoding), per micro-batch when ``k > 1`` so its
      activations are those of ``B / k`` pairs. Its rng: ``fold_in(fold_in(rng, step), PREPARE_SALT)``, and
      with ``k > 1`` further ``fold_in(.., m)`` for micro-batch ``m`` (so its own draws, e.g. the VAE's
      posterior samples, differ from one pass's; they are equal in distribution).
  """
  c = resolve_config(config)
  k = _positive_int("config.train.grad_accum_steps", grad_accum_steps)
  d = _positive_int("the data-parallel size (config.mesh data x fsdp)", data_parallel)
  grad_fn = jax.value_and_grad(_make_objective(unet, schedule, c, train=True), has_aux=True)

  def step(state: state_lib.TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    prepare_rng = jax.random.fold_in(rng, PREPARE_SALT)
    if k > 1 or d > 1:
      check_batch_split(batch_rows(batch), k, d)
    if k == 1:
      step_batch = batch if prepare is None else prepare(frozen, batch, prepare_rng)
      (_, (metrics, _)), grads = grad_fn(state.params, frozen, step_batch, rng)
    else:
      grads, metrics = _accumulated_gradients(grad_fn, schedule, c, state.params, frozen, batch, rng, prepare,
                                              prepare_rng, k)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads).astype(jnp.float32),
                   learning_rate=state.learning_rate())
    return state.apply_gradients(grads), metrics

  return step


def make_dpo_step(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping], *, grad_accum_steps: int = 1,
                  data_parallel: int = 1, prepare: Optional[Callable] = None, donate: bool = True,
                  **jit_kwargs) -> Step:
  """:func:`dpo_step_fn` jitted: a ``parallel.Step`` (``trace_count``, ``.jitted``). ``donate``: donate the
  state (argument 0); ``**jit_kwargs``: more ``jax.jit`` options (``in_shardings``, ``out_shardings``, ...)."""
  fn = dpo_step_fn(unet, schedule, config, grad_accum_steps=grad_accum_steps, data_parallel=data_parallel,
                   prepare=prepare)
  if donate:
    jit_kwargs.setdefault("donate_argnums", (0,))
  return Step(fn, jit_kwargs)


def dpo_eval_fn(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping]) -> Callable:
  """The pure ``evaluate(state, frozen, batch, rng) -> metrics``: the step's loss and metrics on ``batch``
  without prompt dropout, gradient or update; ``rng`` is used as given (not folded with the step)."""
  loss_fn = make_loss_fn(unet, schedule, config, train=False)

  def evaluate(state: state_lib.TrainState, frozen, batch, rng):
    return loss_fn(state.params, frozen, batch, rng)[1]

  return evaluate


def make_dpo_eval(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping], **jit_kwargs) -> Step:
  """:func:`dpo_eval_fn` jitted (``**jit_kwargs``: ``jax.jit`` options): a ``parallel.Step``."""
  return Step(dpo_eval_fn(unet, schedule, config), jit_kwargs)
