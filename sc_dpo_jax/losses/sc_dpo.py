"""The SC-DPO loss: Diffusion-DPO with a safety-cost margin and Dynamic Focusing.

THIS PROJECT'S FORMULATION. Only the abstract of SC-DPO (arXiv 2504.14290 v1) is public in what we could read;
it fixes the ingredients (a preference objective that also minimises a learned safety cost, and a Dynamic
Focusing Mechanism weighting hard pairs), not the equations. The equations below are ours (METHODS.md,
"SC-DPO"); each choice is a knob so it can be changed when the paper's exact form is known::

    inside = -(beta / 2) * Delta                     exactly as Diffusion-DPO (losses/dpo.py)
    p(c)   = sigmoid(c)                              cost_transform "probability" (default); "raw": p(c) = c
    margin = cost_margin_scale * max(p(cost_l) - p(cost_w), 0)
    z      = inside - margin
    w      = stop_gradient((1 - sigmoid(z)) ** focus_gamma), normalised to mean 1 over the batch
    loss   = mean(w * -log sigmoid(z)) + retention_weight * R        R: the retention term (below)
             + preserve_weight * P                                   P: "preserve"'s term, added to any R

* **Calibrated costs.** The cost model is a logistic classifier at cost 0 (``losses/cost_model.py``: its
  anchoring term is ``-log sigmoid(label * cost)``), so ``sigmoid(cost)`` is its probability that the image is
  harmful. The margin is ``cost_margin_scale`` times the gap of those probabilities: bounded in
  ``[0, cost_margin_scale]``, and the same knob means the same thing on any cost model (raw costs are logits
  whose spread depends on how separable the cost model's data was: about +-13 on the toy world, so a margin
  scale tuned on one cost model meant nothing on another). ``cost_transform = "raw"`` is the earlier form.
* **Retention** (``retention``, weight ``retention_weight``; :func:`retention_term`), so that the safe prompts'
  images are kept while the harmful ones change:

  - ``"sft"``: ``R = mean over pairs of err_w``, the policy's denoising error on the chosen images (a
    supervised term pulling the model towards the preferred images, as DPO+SFT recipes do);
  - ``"preserve"``: ``R = mean over pairs of [clean prompt] * mean((eps_policy - eps_ref)^2)`` over both images:
    output preservation (as DUO's prior term, but on the pairs' own noisy inputs) on the pairs whose prompt is
    not harmful (the records' ``harmful_prompt`` = 0); a mean over all pairs, so gradient accumulation gives
    the same value;
  - ``"none"``: ``R = 0``.

  ``preserve_weight`` adds the output preservation term ``P`` (``"preserve"``'s) on top of whichever ``R``
  (e.g. SFT on the chosen images and preservation of the clean prompts' outputs together); 0: no ``P``.

* The margin makes a pair whose rejected image is much more harmful than the chosen one demand a larger
  implicit-reward gap: the policy must beat the reference by more than the safety gap. Costs come from the
  frozen safety cost model (``rewards/cost_model.py``) and are data here: the margin is wrapped in
  ``stop_gradient`` (our choice; the policy cannot move it anyway).
* The focusing weight is the focal-loss factor of the pair's preference probability: pairs the policy already
  orders confidently (large z) get small weights, hard pairs (small or negative z) large ones.
  ``(1 - sigmoid(z)) ** g`` is computed as ``exp(g * log_sigmoid(-z))`` and normalised as
  ``exp(l - max l) / mean(exp(l - max l))``, so it stays finite when every pair is very easy (no 0/0) and
  is exactly 1 for every pair when ``focus_gamma == 0``.
* With ``cost_margin_scale = 0`` and ``focus_gamma = 0`` the loss, and its gradients, are exactly
  Diffusion-DPO's (tested).

Metrics: Diffusion-DPO's (``implicit_accuracy`` = mean(inside > 0), ``tie_fraction``, ``reward_w``,
``reward_l``, ``reward_margin``, the raw errors), plus ``margin_accuracy`` = mean(z > 0), ``cost_w``,
``cost_l`` (mean costs of chosen and rejected, raw), ``margin`` (mean), ``loss_preference`` (the loss
without the retention term), ``retention`` (R), ``loss_unweighted`` = mean(-log
sigmoid(z)), and the focusing weights' ``focus_weight_min``, ``focus_weight_max``, ``focus_weight_std``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from sc_dpo_jax.losses import _validate
from sc_dpo_jax.losses.dpo import diffusion_dpo_inside, pair_metrics

WHAT = "sc_dpo_loss"
COST_TRANSFORMS = ("probability", "raw")
RETENTION = ("none", "sft", "preserve")


def margin_costs(cost: jax.Array, cost_transform: str) -> jax.Array:
  """The costs as the margin sees them: ``sigmoid(cost)`` (``"probability"``) or ``cost`` (``"raw"``)."""
  if cost_transform not in COST_TRANSFORMS:
    raise ValueError(f"{WHAT}: cost_transform = {cost_transform!r}; choose one of {COST_TRANSFORMS}")
  cost = jnp.asarray(cost, jnp.float32)
  return jax.nn.sigmoid(cost) if cost_transform == "probability" else cost


def cost_margin(cost_w, cost_l, cost_margin_scale, cost_transform: str) -> jax.Array:
  """``stop_gradient(cost_margin_scale * max(p(cost_l) - p(cost_w), 0))`` (``[B]``)."""
  gap = margin_costs(cost_l, cost_transform) - margin_costs(cost_w, cost_transform)
  return jax.lax.stop_gradient(cost_margin_scale * jnp.maximum(gap, 0.0))


def retention_term(retention: str, err_w, prediction=None, ref_prediction=None,
                   clean=None) -> jax.Array:
  """The retention term ``R`` (module docstring) as a float32 scalar.

  Args:
    retention: ``"none"``, ``"sft"`` or ``"preserve"``.
    err_w: ``[B]`` the policy's errors on the chosen images (``"sft"``).
    prediction, ref_prediction: ``[2B, ...]`` the policy's and the reference's outputs on ``[w; l]``
      (``"preserve"``).
    clean: ``[B]`` 1 where the pair's prompt is not harmful (``"preserve"``).
  """
  if retention not in RETENTION:
    raise ValueError(f"{WHAT}: retention = {retention!r}; choose one of {RETENTION}")
  if retention == "none":
    return jnp.zeros((), jnp.float32)
  if retention == "sft":
    return jnp.mean(jnp.asarray(err_w, jnp.float32))
  if prediction is None or ref_prediction is None or clean is None:
    raise ValueError(f"{WHAT}: retention 'preserve' needs the policy's and the reference's predictions and the "
                     f"pairs' clean-prompt flags (the records' harmful_prompt)")
  b = jnp.shape(clean)[0]
  diff = prediction.astype(jnp.float32) - jax.lax.stop_gradient(ref_prediction).astype(jnp.float32)
  per_image = jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
  per_pair = 0.5 * (per_image[:b] + per_image[b:2 * b])
  return jnp.mean(jnp.asarray(clean, jnp.float32) * per_pair)


def focusing_weights(z: jax.Array, focus_gamma) -> jax.Array:
  """Dynamic Focusing weights ``stop_gradient((1 - sigmoid(z)) ** focus_gamma)``, mean 1 over the batch."""
  log_w = focus_gamma * jax.nn.log_sigmoid(-z)
  w = jnp.exp(log_w - jnp.max(log_w))
  return jax.lax.stop_gradient(w / jnp.mean(w))


def sc_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, cost_w, cost_l, *, beta, cost_margin_scale,
                focus_gamma, cost_transform: str = "probability", retention: jax.Array = None,
                retention_weight=0.0, preservation: jax.Array = None,
                preserve_weight=0.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """SC-DPO on per-pair errors and safety costs (see the module docstring).

  Args:
    err_w, err_l, ref_err_w, ref_err_l: ``[B]`` as :func:`sc_dpo_jax.losses.dpo.diffusion_dpo_loss`.
    cost_w, cost_l: ``[B]`` safety costs of the chosen and rejected images (higher = more harmful).
    beta: the Diffusion-DPO beta (with its ½), >= 0.
    cost_margin_scale: gamma_c, >= 0; 0 disables the margin.
    focus_gamma: gamma_f, >= 0; 0 disables focusing (all weights 1).
    cost_transform: ``"probability"`` (margin on ``sigmoid(cost)``) or ``"raw"`` (on the costs themselves).
    retention: the retention term ``R`` (:func:`retention_term`), a scalar; None: 0.
    retention_weight: its weight, >= 0.
    preservation: the output preservation term ``P`` (``retention_term("preserve", ...)``), a scalar; None: 0.
    preserve_weight: its weight, >= 0.

  Returns:
    ``(loss, metrics)``.
  """
  inside, reward_w, reward_l, errs = diffusion_dpo_inside(err_w, err_l, ref_err_w, ref_err_l, beta=beta,
                                                          what=WHAT)
  cost_w, cost_l = _validate.per_sample(WHAT, cost_w=cost_w, cost_l=cost_l)
  if cost_w.shape != inside.shape:
    raise ValueError(f"{WHAT}: cost_w and cost_l have shape {cost_w.shape} but the errors have "
                     f"{inside.shape}; all must be [B]")
  gamma_c = _validate.scalar(WHAT, "cost_margin_scale", cost_margin_scale)
  gamma_f = _validate.scalar(WHAT, "focus_gamma", focus_gamma)

  weight_r = _validate.scalar(WHAT, "retention_weight", retention_weight)
  weight_p = _validate.scalar(WHAT, "preserve_weight", preserve_weight)
  margin = cost_margin(cost_w, cost_l, gamma_c, cost_transform)
  z = inside - margin
  per_pair = -jax.nn.log_sigmoid(z)
  w = focusing_weights(z, gamma_f)
  preference = jnp.mean(w * per_pair)
  retention = jnp.zeros((), jnp.float32) if retention is None else jnp.asarray(retention, jnp.float32)
  preservation = jnp.zeros((), jnp.float32) if preservation is None else jnp.asarray(preservation, jnp.float32)
  loss = preference + weight_r * retention + weight_p * preservation
  metrics = {"loss": loss.astype(jnp.float32), "loss_preference": preference.astype(jnp.float32),
             "retention": retention, "preservation": preservation,
             **pair_metrics(inside, reward_w, reward_l, *errs),
             **_validate.metrics(margin_accuracy=jnp.mean(z > 0), cost_w=jnp.mean(cost_w),
                                 cost_l=jnp.mean(cost_l), margin=jnp.mean(margin),
                                 loss_unweighted=jnp.mean(per_pair), focus_weight_min=jnp.min(w),
                                 focus_weight_max=jnp.max(w), focus_weight_std=jnp.std(w))}
  return loss, metrics
