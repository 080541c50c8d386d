"""Will a training step fit? Device memory of a DPO-family step, counted before anything runs.

    python -m sc_dpo_jax.bench --config=configs/diffusion_dpo.py:sd15 --mode=memory

Two parts, both from shapes alone (tracing, no compilation, no device memory; seconds to a minute on a CPU):

* **the train state**, exactly: ``jax.eval_shape`` of ``train.state.create_train_state`` for the config
  (trainable parameters, optimizer state, the frozen reference or base) plus one gradient tree;
* **the saved activations**: what JAX keeps from the policy UNet's forward for its backward
  (``saved_residuals`` of the loss with respect to the trainable parameters), under the config's compute dtype
  and remat policy, traced at batch 1 and 2 to split it into a per-image and a batch-independent part (the
  latter: compute-dtype copies of the weights). Attention probabilities (``[B, Lq, H, Lk]`` inside
  ``dot_product_attention``) are left out when the config's attention is a flash kernel (``cudnn``), which
  keeps only its output and log-sum-exp.

The activation figure counts values at the level of the traced program: XLA's fusion and buffer reuse move the
real peak either way, so this is a prediction to check against ``peak_bytes_in_use`` on the device, not a
measurement. The reference UNet's forward saves nothing (no gradient flows through it).
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

GB = 1e9


def tree_bytes(tree) -> int:
  return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def saved_activation_bytes(unet, params, latent_shape, text_shape, *, batch: int, lora=None,
                           drop_attention_probs: bool = True) -> Dict[str, int]:
  """Bytes JAX saves from ``unet``'s forward at ``batch`` for the gradient with respect to the trainable tree
  (``params``, or the LoRA ``adapters`` when given); ``{"kept": ..., "attention_probs": ...}``."""
  try:
    from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  except ImportError as e:   # a private helper of jax.ad_checkpoint.print_saved_residuals
    raise RuntimeError(f"this jax ({jax.__version__}) has no saved_residuals, which the activation estimate "
                       "needs") from e
  from sc_dpo_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((batch,) + tuple(latent_shape), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  text = jnp.zeros((batch,) + tuple(text_shape), jnp.float32)
  if lora is None:
    loss = lambda p: jnp.mean(unet.apply({"params": p}, x, t, text).astype(jnp.float32) ** 2)  # noqa: E731
    trainable = params
  else:
    loss = lambda a: jnp.mean(unet.apply({"params": lora_lib.apply_lora(params, a)}, x, t, text)  # noqa: E731
                              .astype(jnp.float32) ** 2)
    trainable = lora
  out = {"kept": 0, "attention_probs": 0}
  for aval, where in saved_residuals(loss, trainable):
    if "from the argument" in where:
      continue      # the parameters themselves: counted with the state
    size = int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
    if drop_attention_probs and "dot_product_attention" in where and _is_probs(aval.shape):
      out["attention_probs"] += size
    else:
      out["kept"] += size
  return out


def _is_probs(shape) -> bool:
  # Logits/probabilities hold a query and a key axis (in some order among the heads); queries, keys, values and
  # outputs are [B, L, heads, head_dim] with head_dim <= 256. Two axes above 256 can only be the former (those
  # of shorter sequences, e.g. 77 text tokens, are small and stay counted).
  return len(shape) >= 4 and sum(int(d) > 256 for d in shape[1:]) >= 2


def estimate(config) -> Dict:
  """The memory estimate of ``config``'s train step (see the module docstring), figures in GB."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  from sc_dpo_jax.models.architectures import models_for  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.train import dpo_steps, optim, state as state_lib  # pylint: disable=g-import-not-at-top

  c = config
  objective = dpo_steps.resolve_config(c.objective)
  dtype = jnp.dtype(c.model.dtype)
  flash = c.model.attention == "cudnn"
  # cuDNN attention cannot be traced on every backend: XLA's stands in (same residuals outside attention).
  unet, latent_shape, text_shape = models_for(c.model.architecture, dtype,
                                                    "xla" if flash else c.model.attention, c.model.remat_policy)
  params = nn.meta.unbox(jax.eval_shape(unet.clone(dtype=jnp.float32).init, jax.random.PRNGKey(0),
                                        *unet.dummy_inputs())["params"])
  pairs = int(c.data.batch_size)
  tx, lr = optim.make_optimizer(c.optim, total_batch_size=pairs, beta=float(objective.beta))
  lora = {k: c.lora[k] for k in ("rank", "alpha", "targets")} if c.lora.enabled else None
  ref_dtype = None if lora else jnp.dtype(c.model.ref_dtype)
  state, frozen = jax.eval_shape(
      lambda p, r: state_lib.create_train_state(p, tx, lr, lora=lora, rng=r, ref_dtype=ref_dtype),
      params, jax.random.PRNGKey(0))
  adapters = state.params if lora else None
  real_params = params
  if lora:   # saved_residuals needs values for the frozen base it closes over: zeros of the right shapes
    real_params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
    adapters = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), adapters)
  counts = {b: saved_activation_bytes(unet, real_params, latent_shape, text_shape, batch=b, lora=adapters,
                                      drop_attention_probs=flash) for b in (1, 2)}
  per_image = counts[2]["kept"] - counts[1]["kept"]
  fixed = 2 * counts[1]["kept"] - counts[2]["kept"]
  images = 2 * pairs   # the policy's forward runs on the [w; l] batch
  out = {
      "mode": "memory", "method": objective.method, "architecture": c.model.architecture, "batch_pairs": pairs,
      "policy_images": images, "dtype": c.model.dtype, "attention": c.model.attention,
      "remat_policy": c.model.remat_policy, "lora": bool(lora),
      "trainable_gb": tree_bytes(state.params) / GB,
      "optimizer_gb": tree_bytes(state.opt_state) / GB,
      "frozen_gb": tree_bytes(frozen) / GB,
      "gradients_gb": tree_bytes(state.params) / GB,
      "activations_per_image_gb": per_image / GB,
      "activations_fixed_gb": fixed / GB,
      "attention_probs_per_image_gb": (counts[2]["attention_probs"] - counts[1]["attention_probs"]) / GB,
  }
  out["state_gb"] = out["trainable_gb"] + out["optimizer_gb"] + out["frozen_gb"]
  out["activations_gb"] = out["activations_per_image_gb"] * images + out["activations_fixed_gb"]
  out["predicted_gb"] = out["state_gb"] + out["activations_gb"]
  out["predicted_with_gradients_gb"] = out["predicted_gb"] + out["gradients_gb"]
  return out


def format_estimate(e: Dict) -> str:
  return "\n".join([
      f"memory estimate: {e['method']} {e['architecture']}, {e['batch_pairs']} pairs ({e['policy_images']} policy "
      f"images), {e['dtype']} compute, attention {e['attention']}, remat {e['remat_policy'] or 'none'}"
      + (", LoRA" if e["lora"] else ""),
      f"  train state: trainable {e['trainable_gb']:.2f} GB + optimizer {e['optimizer_gb']:.2f} GB + frozen "
      f"{e['frozen_gb']:.2f} GB = {e['state_gb']:.2f} GB (exact)",
      f"  saved activations: {e['activations_per_image_gb']:.3f} GB per image x {e['policy_images']} + "
      f"{e['activations_fixed_gb']:.2f} GB = {e['activations_gb']:.2f} GB (traced program; "
      f"attention probabilities left out: {e['attention_probs_per_image_gb']:.3f} GB per image)",
      f"  predicted peak: {e['predicted_gb']:.1f} GB, {e['predicted_with_gradients_gb']:.1f} GB if a whole "
      f"gradient tree ({e['gradients_gb']:.2f} GB) is live at once",
  ])
