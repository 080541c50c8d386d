"""``sc_dpo_jax.memory`` (``python -m sc_dpo_jax.bench --mode=memory``): the state part is exact, the activation
part splits into a per-image and a fixed part that add up at any batch, and remat policies order as they must."""
import jax.numpy as jnp
import pytest

from configs import diffusion_dpo, duo
from sc_dpo_jax import memory
from sc_dpo_jax.models.architectures import models_for
from sc_dpo_jax.models.random_init import host_random_params
from sc_dpo_jax.train import dpo_steps, optim, state as state_lib


def _config(module=diffusion_dpo, **model):
  c = module.get_config("tiny")
  for k, v in model.items():
    c.model[k] = v
  return c


def test_state_sizes_are_those_of_the_real_state():
  c = _config()
  e = memory.estimate(c)
  unet, _, _ = models_for("tiny", jnp.float32, "reference")
  params = host_random_params(unet)
  objective = dpo_steps.resolve_config(c.objective)
  tx, lr = optim.make_optimizer(c.optim, total_batch_size=int(c.data.batch_size), beta=float(objective.beta))
  state, frozen = state_lib.create_train_state(params, tx, lr, ref_dtype=jnp.dtype(c.model.ref_dtype))
  assert e["trainable_gb"] * 1e9 == memory.tree_bytes(state.params) == memory.tree_bytes(params)
  assert e["optimizer_gb"] * 1e9 == memory.tree_bytes(state.opt_state)
  assert e["frozen_gb"] * 1e9 == memory.tree_bytes(frozen)
  assert e["policy_images"] == 2 * c.data.batch_size
  assert e["predicted_gb"] == pytest.approx(e["state_gb"] + e["activations_gb"])


def test_activations_split_into_per_image_and_fixed_parts():
  unet, latent, text = models_for("tiny", jnp.float32, "reference")
  params = host_random_params(unet)
  counts = {b: memory.saved_activation_bytes(unet, params, latent, text, batch=b)["kept"] for b in (1, 2, 3)}
  per_image, fixed = counts[2] - counts[1], 2 * counts[1] - counts[2]
  assert per_image > 0 and fixed >= 0
  assert counts[3] == fixed + 3 * per_image


def test_remat_policies_order_the_activations():
  sizes = {p: memory.estimate(_config(remat_policy=p))["activations_per_image_gb"]
           for p in ("none", "convs_and_dots_saveable", "nothing_saveable")}
  assert sizes["none"] > sizes["convs_and_dots_saveable"] > sizes["nothing_saveable"] > 0


def test_lora_trains_only_the_adapters():
  e = memory.estimate(_config(duo))
  full = memory.estimate(_config())
  assert e["lora"] and 0 < e["trainable_gb"] < full["trainable_gb"] / 5
  assert e["frozen_gb"] * 1e9 == pytest.approx(full["trainable_gb"] * 1e9)   # the base, float32


def test_attention_probabilities_are_recognised_by_shape():
  assert memory._is_probs((2, 8, 4096, 1, 4096)) and memory._is_probs((2, 8, 1024, 1024))
  assert not memory._is_probs((2, 4096, 8, 40)) and not memory._is_probs((2, 4096, 8, 160))
  assert not memory._is_probs((2, 4096, 320))

