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
``text_states``        ``[B, L, D]``        prompt states (DUO: only with ``duo_prompts`` "given" or "unsafe")
``text_states_chosen`` ``[B, L, D]``        DUO with ``duo_prompts = "given"`` only: states of the chosen
                                            image's own prompt (records' ``prompt_chosen``)
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
  an INDEPENDENT timestep per image uniform in ``[min_timestep, max_timestep)`` = ``{0..749}``. Prompts
  (``duo_prompts``): ``"empty"`` (the official default) conditions both images on the empty prompt;
  ``"given"`` (the official ``--given_prompt``) each on its own prompt, x+ on its safe prompt
  (``text_states_chosen``, from the records' ``prompt_chosen``) and x- on the unsafe ``prompt``
  (``text_states``); ``"unsafe"`` (ours) both on the pair's unsafe ``prompt``. With "given" and "unsafe" the
  prompts of a pair are dropped together (``prompt_dropout``, as the official ``--cfg_train`` drops both with
  probability 0.2). The output-preservation input is the pair's own noise ``eps`` at
  ``t = num_train_timesteps - 1`` (999) with the empty prompt, as the official code (``noisy_model_input =
  cat([noisy, noise[:bsz//2]])``). One UNet call on ``[x+_t; x-_t; eps]`` (``3B``) for the policy and one for
  the reference. The prior weight is ``duo_lambda``, or when None ``duo_base_lambda * beta / 100`` (the
  official ``base_lambda * (dcoloss_beta / 100)``); ``losses.duo_loss`` (``beta = 0``: gradient ascent on x-).

The reference runs outside ``jax.grad`` on ``train.state.reference_params(trainable, frozen)``: with LoRA the
base parameters without adapters (no second UNet), with full fine-tuning ``frozen["ref_unet"]``. Errors and
losses are float32 whatever the UNet's compute dtype.

Our choices where the sources leave room: the rng is folded with ``state.step``; prompt dropout is drawn per
pair in the step (the official codes drop captions in the data loader); DUO's timesteps are drawn for all
``2B`` images at once.

**Gradient accumulation** (``grad_accum_steps = k``): one call is one optimiser update over the batch's ``B``
pairs as ``k`` micro-batches in a ``lax.scan``; how, and why so: ``train.grad_accum``. The UNet inputs of
each method (noising, timesteps, prompts, the random draws of an update): ``train.dpo_inputs``.

:func:`make_dpo_eval` gives the same computation without dropout, gradients or update (and without folding
the step into the rng, so a fixed key evaluates the same noise before and after training).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import optax

from sc_dpo_jax import diffusion, losses
from sc_dpo_jax.parallel.step import Step
from sc_dpo_jax.train import state as state_lib
from sc_dpo_jax.train.dpo_inputs import DUO_PROMPTS, Inputs, check_duo_prompts, dpo_inputs, duo_inputs, require
from sc_dpo_jax.train.grad_accum import PREPARE_SALT, accumulated_gradients, batch_rows, check_batch_split, positive_int

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
      cost_transform="probability",           # the margin on sigmoid(cost) (bounded, calibrated) or "raw"
      retention="none",                       # "none" | "sft" | "preserve" (losses/sc_dpo.py)
      retention_weight=0.0,
      preserve_weight=0.0,                    # + preserve_weight x output preservation on clean pairs (ours)
      # Training timesteps, uniform in [min_timestep, max_timestep) (None: the schedule's num_train_timesteps).
      # Official codes: Diffusion-DPO all of {0..T-1}; DUO {0..749} (then the highest noise levels, where a
      # concept such as a colour is decided, are never trained).
      min_timestep=0,
      max_timestep=750 if duo else config_dict.placeholder(int),   # a typed None: settable from flags
      # DUO (official code)
      duo_prompts="empty",                    # "empty" | "given" | "unsafe" (dpo_inputs.duo_inputs)
      duo_lambda=config_dict.placeholder(float),   # None: duo_base_lambda * beta / 100
      duo_base_lambda=1e6,
  ))


def resolve_config(config: Optional[Mapping]) -> ml_collections.ConfigDict:
  """``config`` over ``default_config(config.method)``; unknown keys raise ``KeyError`` naming them."""
  items = dict(config.items()) if config is not None else {}
  method = items.get("method", "diffusion_dpo")
  out = default_config(method)
  for key, value in items.items():
    if key == "duo_use_prompts":
      raise KeyError(f"config key 'duo_use_prompts' is now 'duo_prompts' (one of {DUO_PROMPTS}): False was "
                     f"'empty', True was 'unsafe'; 'given' is the official --given_prompt (each image under its "
                     f"own prompt)")
    if key not in out:
      raise KeyError(f"unknown DPO step config key {key!r}; known keys: {sorted(out.keys())}")
    if key == "duo_prompts":
      check_duo_prompts(value)      # before the ConfigDict's own type check, whose error names no choices
    out[key] = value
  if not 0.0 <= float(out.prompt_dropout) <= 1.0:
    raise ValueError(f"config.prompt_dropout = {out.prompt_dropout!r} must be a probability in [0, 1]")
  for key, choices in (("cost_transform", losses.sc_dpo.COST_TRANSFORMS), ("retention", losses.sc_dpo.RETENTION)):
    if out[key] not in choices:
      raise ValueError(f"config.objective.{key} = {out[key]!r}; choose one of {choices}")
  for key in ("retention_weight", "preserve_weight"):
    if not float(out[key]) >= 0.0:
      raise ValueError(f"config.objective.{key} = {out[key]!r} must be >= 0")
  lo, hi = int(out.min_timestep), out.max_timestep
  if lo < 0 or (hi is not None and not lo < int(hi)):
    raise ValueError(f"config.min_timestep ({lo}) and max_timestep ({hi}, exclusive) must satisfy 0 <= min < max")
  return out


def duo_lambda(config: Mapping) -> float:
  """DUO's prior weight: ``duo_lambda``, or ``duo_base_lambda * beta / 100`` when it is None."""
  if config["duo_lambda"] is not None:
    return float(config["duo_lambda"])
  return float(config["duo_base_lambda"]) * float(config["beta"]) / 100.0


def per_sample_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """``mean over all but the batch axis of (prediction - target)^2``, in float32: ``[B]``."""
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _sc_dpo_z(c, err, ref_err, cost_w, cost_l, b: int) -> jax.Array:
  """SC-DPO's per-pair ``z = inside - margin`` (``losses/sc_dpo.py``, the same operations), without gradient:
  what the focusing weights of a whole accumulated batch are computed from."""
  inside = losses.dpo.diffusion_dpo_inside(err[:b], err[b:], ref_err[:b], ref_err[b:], beta=float(c.beta),
                                           what=losses.sc_dpo.WHAT)[0]
  margin = losses.sc_dpo.cost_margin(cost_w, cost_l, float(c.cost_margin_scale), str(c.cost_transform))
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
    cost_chosen = require(batch, "cost_chosen", "safety costs of the chosen images [B]", c.method)
    cost_rejected = require(batch, "cost_rejected", "safety costs of the rejected images [B]", c.method)
    clean, preservation = None, None
    if c.retention == "preserve" or float(c.preserve_weight) > 0:
      clean = 1.0 - require(batch, "harmful_prompt", "1 where the pair's prompt is harmful [B] (retention "
                            "'preserve' keeps the outputs of the others)", c.method).astype(jnp.float32)
    retention = losses.sc_dpo.retention_term(str(c.retention), err[:b], prediction[:n], ref_prediction[:n], clean)
    if float(c.preserve_weight) > 0:
      preservation = losses.sc_dpo.retention_term("preserve", err[:b], prediction[:n], ref_prediction[:n], clean)
    loss, metrics = losses.sc_dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cost_chosen, cost_rejected,
                                       beta=float(c.beta), cost_margin_scale=float(c.cost_margin_scale),
                                       focus_gamma=float(c.focus_gamma), cost_transform=str(c.cost_transform),
                                       retention=retention, retention_weight=float(c.retention_weight),
                                       preservation=preservation, preserve_weight=float(c.preserve_weight))
    return loss, metrics, _sc_dpo_z(c, err, ref_err, cost_chosen, cost_rejected, b)
  return (*losses.duo_loss(err[:b], ref_err[:b], err[b:], ref_err[b:], prediction[n:],
                           jax.lax.stop_gradient(ref_prediction[n:]), beta=float(c.beta), lam=duo_lambda(c)), None)


def _make_objective(unet, schedule: diffusion.NoiseSchedule, c, *, train: bool):
  """``objective(trainable, frozen, batch, rng, noise) -> (loss, (metrics, z))`` of a resolved config ``c``;
  ``noise`` None draws from ``rng`` (``dpo_inputs.draw_noise``), ``z`` is SC-DPO's (else None)."""
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
      ``B`` must be divisible by ``k * data_parallel`` (``grad_accum.check_batch_split``, at trace time).
    prepare: optional ``prepare(frozen, raw_batch, rng) -> batch`` run inside the step before the objective
      (``train.loop.make_prepare``: VAE encoding, text encoding), per micro-batch when ``k > 1`` so its
      activations are those of ``B / k`` pairs. Its rng: ``fold_in(fold_in(rng, step), PREPARE_SALT)``, and
      with ``k > 1`` further ``fold_in(.., m)`` for micro-batch ``m`` (so its own draws, e.g. the VAE's
      posterior samples, differ from one pass's; they are equal in distribution).
  """
  c = resolve_config(config)
  k = positive_int("config.train.grad_accum_steps", grad_accum_steps)
  d = positive_int("the data-parallel size (config.mesh data x fsdp)", data_parallel)
  if (k > 1 and c.method == "sc_dpo" and float(c.focus_gamma) > 0
      and ((c.retention != "none" and float(c.retention_weight) > 0) or float(c.preserve_weight) > 0)):
    # grad_accum combines SC-DPO's micro-batch gradients by their focusing mass, which is exact for the focused
    # preference term but would weight the retention term's micro-batches unequally.
    raise ValueError(f"SC-DPO's retention terms ({c.retention!r}, weight {c.retention_weight}; preserve_weight "
                     f"{c.preserve_weight}) with Dynamic Focusing (focus_gamma = {c.focus_gamma}) are not supported "
                     f"with gradient accumulation (config.train.grad_accum_steps = {k}): set grad_accum_steps to 1, "
                     f"focus_gamma to 0 (then micro-batches weigh equally and accumulation is exact) or retention "
                     f"to 'none' and preserve_weight to 0")
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
      grads, metrics = accumulated_gradients(grad_fn, schedule, c, state.params, frozen, batch, rng, prepare,
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
