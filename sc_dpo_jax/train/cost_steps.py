"""The safety cost model's training step and held-out evaluation: the adapter's train state
(:func:`create_cost_train_state`, :class:`CostTrainState`), the jitted :func:`cost_train_step` (an optax step of
``losses.cost_model.cost_loss``: ranking of ordered pairs plus ``anchor_weight`` x anchoring of labelled images at
zero, on precomputed embeddings or on images through the frozen CLIP), and :func:`evaluate`, the held-out losses
and accuracies over a whole labelled split on the host. The model itself (``SafetyCostModel``, ``CostAdapter``),
its save/load and ``CostReward`` are ``rewards.cost_model``'s; the run is ``train.cost_loop``'s.

    tx, _ = optim.make_optimizer(config.optim)
    state = create_cost_train_state(model, jax.random.PRNGKey(0), tx=tx, anchor_weight=1.0)
    emb = embed_in_batches(model, clip_params, images)                  # precompute once (optional)
    state, metrics = cost_train_step(state, clip_params, {"emb_more": ..., "emb_less": ...,
                                                          "emb_labelled": ..., "labels": ...}, rng)
"""
from __future__ import annotations

from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from sc_dpo_jax.data.cost_pairs import Labelled
from sc_dpo_jax.losses.cost_model import cost_loss
from sc_dpo_jax.rewards.cost_model import SafetyCostModel

# Keys of a training batch: each group is given either as images or as precomputed normalised embeddings.
BATCH_GROUPS = ("more", "less", "labelled")


class CostTrainState(train_state.TrainState):
  """``TrainState`` of the adapter parameters only, with the model and the anchoring weight as static fields
  (part of the jitted program, not of the checkpointed arrays)."""
  model: SafetyCostModel = struct.field(pytree_node=False, default=None)
  anchor_weight: float = struct.field(pytree_node=False, default=1.0)


def create_cost_train_state(model: SafetyCostModel, rng_or_params, *, tx: optax.GradientTransformation,
                            anchor_weight: float = 1.0) -> CostTrainState:
  """A ``CostTrainState`` from fresh adapter parameters (``rng_or_params`` a PRNG key) or given ones, updated by
  ``tx`` (the trainer's: ``train.optim.make_optimizer(config.optim)``)."""
  if isinstance(anchor_weight, bool) or not np.isfinite(anchor_weight) or anchor_weight < 0:
    raise ValueError(f"create_cost_train_state: anchor_weight = {anchor_weight!r} must be finite and >= 0")
  if isinstance(rng_or_params, Mapping):
    params = rng_or_params
  else:
    params = model.init_adapter(rng_or_params)
  state = CostTrainState.create(apply_fn=model.adapter.apply, params=params, tx=tx, model=model,
                                anchor_weight=float(anchor_weight))
  # An int32 array, not TrainState's Python 0: the step's first call would otherwise compile a second program.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _batch_embeddings(model: SafetyCostModel, clip_params, batch: Mapping) -> Dict[str, jax.Array]:
  """``emb_<group>`` as given, or ``model.embed`` of ``images_<group>``, for each group of ``BATCH_GROUPS``."""
  out = {}
  for group in BATCH_GROUPS:
    has_emb, has_images = f"emb_{group}" in batch, f"images_{group}" in batch
    if has_emb == has_images:
      which = "both" if has_emb else "neither"
      raise KeyError(f"cost_train_step: the batch must hold exactly one of 'emb_{group}' and 'images_{group}'; "
                     f"it has {which} (keys: {sorted(batch)})")
    if has_emb:
      emb = jnp.asarray(batch[f"emb_{group}"], jnp.float32)
      if emb.ndim != 2 or emb.shape[-1] != model.embed_dim:
        raise ValueError(f"cost_train_step: batch['emb_{group}'] must be [N, {model.embed_dim}] (CLIP's "
                         f"projection_dim), got shape {tuple(emb.shape)}")
      out[group] = emb
    else:
      out[group] = model.embed(clip_params, batch[f"images_{group}"])
  if "labels" not in batch:
    raise KeyError(f"cost_train_step: the batch must hold 'labels' (+1 harmful, -1 safe); keys: {sorted(batch)}")
  return out


def _cost_train_step(state: CostTrainState, clip_params, batch: Mapping, rng: jax.Array):
  del rng  # the adapter is deterministic; the argument keeps the common step signature
  model = state.model
  if model is None:
    raise ValueError("cost_train_step: the state has no model; make it with create_cost_train_state")
  emb = jax.lax.stop_gradient(_batch_embeddings(model, clip_params, batch))

  def loss_fn(params):
    costs = {g: model.cost_from_embeddings(params, e) for g, e in emb.items()}
    return cost_loss(costs["more"], costs["less"], costs["labelled"], batch["labels"],
                     anchor_weight=state.anchor_weight)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {**metrics, "grad_norm": optax.global_norm(grads).astype(jnp.float32)}
  return state.apply_gradients(grads=grads), metrics


cost_train_step = jax.jit(_cost_train_step, donate_argnums=(0,))
cost_train_step.__doc__ = """One optimiser step of the adapter on ``losses.cost_model.cost_loss``: ``(state, metrics)``.

Args:
  state: a ``CostTrainState`` (donated: do not reuse the one passed in).
  clip_params: the frozen CLIP vision parameters (an argument, never updated; unused when the batch holds only
    embeddings).
  batch: ``labels`` ``[N]`` (+1 harmful, -1 safe) and, for each of ``more``, ``less`` (ordered pairs, ``[P]``
    each) and ``labelled`` (``[N]``), either ``images_<group>`` (uint8 or [0, 1] NHWC) or ``emb_<group>``
    (precomputed normalised embeddings ``[., D]``, e.g. from ``rewards.cost_model.embed_in_batches``).
  rng: a PRNG key (unused by this deterministic adapter; kept for the common step signature).

Metrics: those of ``cost_loss`` (loss, rank_loss, anchor_loss, ranking_accuracy, anchor_accuracy, mean costs)
and ``grad_norm`` (before clipping).
"""


# -- evaluation ---------------------------------------------------------------------------------------------------


def pool_costs(cost_fn, adapter_params, pool: np.ndarray, chunk: int = 4096) -> np.ndarray:
  """Costs of every pool embedding, in chunks of one padded shape (one compiled program)."""
  chunk = min(chunk, pool.shape[0])
  out = []
  for start in range(0, pool.shape[0], chunk):
    part = pool[start:start + chunk]
    n = part.shape[0]
    if n < chunk:
      part = np.concatenate([part, np.zeros((chunk - n, pool.shape[1]), pool.dtype)])
    out.append(np.asarray(cost_fn(adapter_params, part))[:n])
  return np.concatenate(out)


def _log_sigmoid_loss(x: np.ndarray) -> float:
  return float(np.mean(np.logaddexp(0.0, -x)))


def evaluate(cost_fn, adapter_params, data: Labelled, alpha: float, prefix: str = "eval/") -> Dict[str, float]:
  """Held-out metrics over the whole split: the losses and accuracies of ``losses.cost_model`` (ranking over
  every ranking pair, anchoring over every labelled image) and the mean costs of chosen and rejected images."""
  costs = pool_costs(cost_fn, adapter_params, data.pool)
  n = data.n_pairs
  out = {"cost_chosen": float(costs[:n].mean()), "cost_rejected": float(costs[n:].mean())}
  if data.more.size:
    diff = costs[data.more] - costs[data.less]
    out.update(rank_loss=_log_sigmoid_loss(diff), ranking_accuracy=float(np.mean(diff > 0)))
  labelled = data.labelled
  if labelled.size:
    signed = data.labels[labelled] * costs[labelled]
    out.update(anchor_loss=_log_sigmoid_loss(signed), anchor_accuracy=float(np.mean(signed > 0)))
    harmful, safe = labelled[data.labels[labelled] > 0], labelled[data.labels[labelled] < 0]
    if harmful.size:
      out["cost_harmful"] = float(costs[harmful].mean())
    if safe.size:
      out["cost_safe"] = float(costs[safe].mean())
  if "rank_loss" in out and "anchor_loss" in out:
    out["loss"] = out["rank_loss"] + alpha * out["anchor_loss"]
  return {prefix + k: v for k, v in out.items()}
