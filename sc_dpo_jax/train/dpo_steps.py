"""Jitted train steps of the DPO family: Diffusion-DPO, SC-DPO and DUO.

    step = make_dpo_step(unet, schedule, config.objective)          # jitted once, state donated
    for i, batch in enumerate(batches):
      state, metrics = step(state, frozen, batch, rng)              # same rng every call is fine (below)

``step(state, frozen, batch, rng) -> (state, metrics)`` is a pure function: ``state`` is a
:class:`~sc_dpo_jax.train.state.TrainState` (donated), ``frozen`` the dict of frozen arrays
(``train.state``: base or reference UNet, empty-prompt states), ``batch`` a dict of arrays, ``rng`` a PRNG key
that is folded with ``state.step`` inside, so a loop may pass one fixed key and a resumed run draws the same
noise. ``metrics`` is a flat dict of float32 scalars: the loss's own metrics (``losses.dpo`` / ``sc_dpo`` /
``duo``: loss, implicit accuracy, rewards and their margin, raw errors, the SC-DPO margin and focusing weights,
the DUO prior term) plus ``grad_norm`` (global norm before clipping) and ``learning_rate`` (of this update).

Batch (``B`` pairs):

=================== ==================== =====================================================================
``latents_w``       ``[B, h, w, c]``     chosen images as scaled VAE latents, NHWC (DUO: the safe x+)
``latents_l``       ``[B, h, w, c]``     rejected images (DUO: the unsafe x-)
``text_states``     ``[B, L, D]``        prompt states (not needed by DUO unless ``duo_use_prompts``)
``cost_w``/``cost_l`` ``[B]``            SC-DPO only: safety costs of chosen and rejected
=================== ==================== =====================================================================

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

:func:`make_dpo_eval` gives the same computation without dropout, gradients or update (and without folding
the step into the rng, so a fixed key evaluates the same noise before and after training).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import optax

from sc_dpo_jax import diffusion, losses
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


class Step:
  """A jitted step (or eval) function with a count of how often JAX traced it.

  Calling it calls the jitted function; ``trace_count`` grows only when JAX (re)traces, which after the
  first call means a changed input structure, shape or dtype (a test asserts it stays 1). ``fn`` is the pure
  function (to jit with other options, e.g. shardings) and ``jitted`` the compiled one (``.lower(...)``).
  """

  def __init__(self, fn: Callable, jit_kwargs: Mapping[str, Any]):
    self.trace_count = 0

    @functools.wraps(fn)
    def counted(*args):
      self.trace_count += 1
      return fn(*args)

    self.fn = fn
    self.jitted = jax.jit(counted, **jit_kwargs)

  def __call__(self, *args):
    return self.jitted(*args)

  def lower(self, *args):
    return self.jitted.lower(*args)


def per_sample_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """``mean over all but the batch axis of (prediction - target)^2``, in float32: ``[B]``."""
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _require(mapping: Mapping, key: str, what: str, method: str) -> Any:
  if key not in mapping:
    raise KeyError(f"{method}: batch[{key!r}] is missing ({what}); the batch has keys {sorted(mapping)}")
  return mapping[key]


def _pair_latents(batch: Mapping, method: str) -> Tuple[jax.Array, jax.Array]:
  w = _require(batch, "latents_w", "chosen latents [B, h, w, c]", method)
  l = _require(batch, "latents_l", "rejected latents [B, h, w, c]", method)
  if w.ndim != 4 or w.shape != l.shape:
    raise ValueError(f"{method}: batch['latents_w'] {w.shape} and batch['latents_l'] {l.shape} must both be "
                     f"NHWC [B, h, w, c] of one shape")
  return w.astype(jnp.float32), l.astype(jnp.float32)


def _empty_text(frozen: Mapping, batch_size: int, purpose: str) -> jax.Array:
  empty = state_lib.require(frozen, state_lib.EMPTY_TEXT, f"the [1, L, D] empty-prompt states ({purpose})")
  if empty.ndim != 3 or empty.shape[0] != 1:
    raise ValueError(f"frozen['empty_text'] must be [1, L, D], got {empty.shape}")
  return jnp.broadcast_to(empty, (batch_size,) + empty.shape[1:])


def _prompts(batch: Mapping, frozen: Mapping, rng: jax.Array, dropout: float, method: str) -> jax.Array:
  """The batch's text states with each pair's prompt replaced by the empty prompt with prob. ``dropout``."""
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
  drop = jax.random.bernoulli(rng, dropout, (text.shape[0],))
  return jnp.where(drop[:, None, None], empty, text)


class Inputs(NamedTuple):
  """One method's UNet batch (``x``, ``t``, ``text``, concatenated) and what the loss needs."""
  x: jax.Array
  t: jax.Array
  text: jax.Array
  target: jax.Array   # training targets of the 2B pair images
  pairs: int          # B


def dpo_inputs(schedule, c, batch, frozen, rng, dropout: float) -> Inputs:
  """Diffusion-DPO / SC-DPO: one t and one eps per pair, shared by w and l; UNet batch [w; l].

  ``c`` is a resolved config (:func:`resolve_config`); ``dropout`` the prompt-dropout probability.
  """
  w, l = _pair_latents(batch, c.method)
  b = w.shape[0]
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  t = jax.random.randint(k_t, (b,), *timestep_range(schedule, c))
  eps = jax.random.normal(k_eps, w.shape, jnp.float32)
  x0, t2, eps2 = jnp.concatenate([w, l]), jnp.concatenate([t, t]), jnp.concatenate([eps, eps])
  text = _prompts(batch, frozen, k_drop, dropout, c.method)
  return Inputs(diffusion.add_noise(schedule, x0, eps2, t2), t2, jnp.concatenate([text, text]),
                 diffusion.training_target(schedule, x0, eps2, t2), b)


def duo_inputs(schedule, c, batch, frozen, rng, dropout: float) -> Inputs:
  """DUO: one eps per pair, independent t per image; then the prior inputs (eps at t = T - 1, empty prompt).
  UNet batch [x+_t; x-_t; eps]. Arguments as :func:`dpo_inputs`."""
  safe, unsafe = _pair_latents(batch, c.method)
  b = safe.shape[0]
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  t = jax.random.randint(k_t, (2 * b,), *timestep_range(schedule, c))
  eps = jax.random.normal(k_eps, safe.shape, jnp.float32)
  x0, eps2 = jnp.concatenate([safe, unsafe]), jnp.concatenate([eps, eps])
  empty = _empty_text(frozen, b, "DUO conditions on the empty prompt")
  if c.duo_use_prompts:
    text = _prompts(batch, frozen, k_drop, dropout, c.method)
    if text.shape[1:] != empty.shape[1:]:
      raise ValueError(f"duo: batch['text_states'] {text.shape} and frozen['empty_text'] {empty.shape[1:]} must "
                       f"share [L, D] (they go through the UNet as one batch)")
    texts = jnp.concatenate([text, text, empty.astype(text.dtype)])
  else:
    texts = jnp.concatenate([empty, empty, empty])
  prior_t = jnp.full((b,), schedule.num_train_timesteps - 1, t.dtype)
  x = jnp.concatenate([diffusion.add_noise(schedule, x0, eps2, t), eps])
  return Inputs(x, jnp.concatenate([t, prior_t]), texts, diffusion.training_target(schedule, x0, eps2, t), b)


def _loss(c, inputs: Inputs, prediction, ref_prediction, batch) -> Tuple[jax.Array, Metrics]:
  """The method's loss from the policy's and the reference's outputs on ``inputs``."""
  b = inputs.pairs
  n = 2 * b
  err = per_sample_error(prediction[:n], inputs.target)
  ref_err = jax.lax.stop_gradient(per_sample_error(ref_prediction[:n], inputs.target))
  if c.method == "diffusion_dpo":
    return losses.diffusion_dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], beta=float(c.beta))
  if c.method == "sc_dpo":
    cost_w = _require(batch, "cost_w", "safety costs of the chosen images [B]", c.method)
    cost_l = _require(batch, "cost_l", "safety costs of the rejected images [B]", c.method)
    return losses.sc_dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cost_w, cost_l, beta=float(c.beta),
                              cost_margin_scale=float(c.cost_margin_scale), focus_gamma=float(c.focus_gamma))
  return losses.duo_loss(err[:b], ref_err[:b], err[b:], ref_err[b:], prediction[n:],
                         jax.lax.stop_gradient(ref_prediction[n:]), beta=float(c.beta), lam=duo_lambda(c))


def make_loss_fn(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping], *, train: bool = True):
  """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``: the pure objective of the step, with the
  policy evaluated at ``trainable`` (differentiable) and the reference outside the gradient.

  ``train=False`` disables prompt dropout (evaluation).
  """
  c = resolve_config(config)
  make_inputs = duo_inputs if c.method == "duo" else dpo_inputs
  dropout = float(c.prompt_dropout) if train else 0.0

  def loss_fn(trainable, frozen, batch, rng):
    inputs = make_inputs(schedule, c, batch, frozen, rng, dropout)
    ref_params = state_lib.reference_params(trainable, frozen)
    ref_prediction = jax.lax.stop_gradient(unet.apply({"params": ref_params}, inputs.x, inputs.t, inputs.text))
    prediction = unet.apply({"params": state_lib.policy_params(trainable, frozen)}, inputs.x, inputs.t,
                            inputs.text)
    return _loss(c, inputs, prediction, ref_prediction, batch)

  return loss_fn


def make_dpo_step(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping], *, donate: bool = True,
                  **jit_kwargs) -> Step:
  """The jitted train step of ``config.method`` (see the module docstring).

  Args:
    unet: the ``models.UNet2DConditionModel`` (static: its config, dtype and attention are baked in).
    schedule: the training ``diffusion.NoiseSchedule`` (its prediction type sets the target).
    config: the objective section (keys of :func:`default_config`; unknown keys are errors).
    donate: donate the state (argument 0) to the update.
    **jit_kwargs: more ``jax.jit`` options (``in_shardings``, ``out_shardings``, ...).

  Returns:
    A :class:`Step`: ``step(state, frozen, batch, rng) -> (state, metrics)``.
  """
  c = resolve_config(config)
  loss_fn = make_loss_fn(unet, schedule, c, train=True)

  def step(state: state_lib.TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, rng)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads).astype(jnp.float32),
                   learning_rate=state.learning_rate())
    return state.apply_gradients(grads), metrics

  if donate:
    jit_kwargs.setdefault("donate_argnums", (0,))
  return Step(step, jit_kwargs)


def make_dpo_eval(unet, schedule: diffusion.NoiseSchedule, config: Optional[Mapping], **jit_kwargs) -> Step:
  """``evaluate(state, frozen, batch, rng) -> metrics``: the step's loss and metrics on ``batch`` without
  prompt dropout, gradient or update; ``rng`` is used as given (not folded with the step)."""
  loss_fn = make_loss_fn(unet, schedule, config, train=False)

  def evaluate(state: state_lib.TrainState, frozen, batch, rng):
    return loss_fn(state.params, frozen, batch, rng)[1]

  return Step(evaluate, jit_kwargs)
