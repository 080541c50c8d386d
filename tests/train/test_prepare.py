"""The trainer's batch preparation: moments sampled on the device, images through the VAE, prompts through the
text encoder, costs for SC-DPO, the NaN probe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax import models
from sc_dpo_jax.data import latents as latents_lib
from sc_dpo_jax.data import schema
from sc_dpo_jax.models import tiny
from sc_dpo_jax.train import loop


@pytest.fixture(scope="module")
def pipe():
  return tiny.tiny_pipeline(0)


def test_moments_and_text_states_records(pipe):
  spec = schema.pair_spec(image_format="latent", latent_shape=(8, 8, 8), latent_scaling_factor=0.18215,
                          text_states_shape=(16, 32), has_costs=True)
  rng = np.random.default_rng(0)
  batch = {"moments_chosen": rng.normal(size=(2, 8, 8, 8)).astype(np.float32),
           "moments_rejected": rng.normal(size=(2, 8, 8, 8)).astype(np.float32),
           "text_states": rng.normal(size=(2, 16, 32)).astype(np.float32),
           "cost_chosen": np.zeros(2, np.float32), "cost_rejected": np.ones(2, np.float32),
           "nonfinite_probe": np.zeros(2, np.float32)}
  key = jax.random.PRNGKey(3)
  out = loop.make_prepare(pipe, spec, "sc_dpo")({}, batch, key)
  assert set(out) == {"latents_chosen", "latents_rejected", "text_states", "cost_chosen", "cost_rejected"}
  k_chosen, k_rejected = jax.random.split(key)
  np.testing.assert_allclose(out["latents_chosen"], latents_lib.sample_latents(batch["moments_chosen"], k_chosen,
                                                                               scaling_factor=0.18215), atol=1e-6)
  np.testing.assert_allclose(out["latents_rejected"], latents_lib.sample_latents(batch["moments_rejected"],
                                                                                 k_rejected, scaling_factor=0.18215),
                             atol=1e-6)
  np.testing.assert_array_equal(out["text_states"], batch["text_states"])
  np.testing.assert_array_equal(out["cost_chosen"], batch["cost_chosen"])
  np.testing.assert_array_equal(out["cost_rejected"], batch["cost_rejected"])
  chosen_states = rng.normal(size=(2, 16, 32)).astype(np.float32)    # records with prompt_chosen: passed on
  given = loop.make_prepare(pipe, spec, "duo")({}, dict(batch, text_states_chosen=chosen_states), key)
  np.testing.assert_array_equal(given["text_states_chosen"], chosen_states)
  np.testing.assert_array_equal(given["text_states"], batch["text_states"])
  poisoned = loop.make_prepare(pipe, spec, "diffusion_dpo")({}, dict(batch, nonfinite_probe=np.full(2, np.nan,
                                                                                                     np.float32)), key)
  assert np.isnan(np.asarray(poisoned["latents_chosen"])).all() and "cost_chosen" not in poisoned


def test_image_records_go_through_the_vae_and_the_text_encoder(pipe):
  spec = schema.pair_spec()
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
  ids = pipe.tokenizer(["a square", "a bar"])
  frozen = {"vae": pipe.params["vae"], "text_encoder": pipe.params["text_encoder"]}
  key = jax.random.PRNGKey(0)
  out = loop.make_prepare(pipe, spec, "duo")(frozen, {"image_chosen": images, "image_rejected": images,
                                                      "input_ids": ids}, key)
  k_chosen, _ = jax.random.split(key)
  want = models.encode_to_latents(pipe.vae, pipe.params["vae"], jnp.asarray(images, jnp.float32) / 127.5 - 1,
                                  k_chosen)
  np.testing.assert_allclose(out["latents_chosen"], want, atol=1e-5)
  assert out["latents_chosen"].shape == (2, 8, 8, 4)
  np.testing.assert_allclose(out["text_states"], pipe.encode_prompts(["a square", "a bar"]), atol=1e-5)
  assert "text_states_chosen" not in out      # records without prompt_chosen
  # records with the chosen image's own prompt (prompt_chosen -> input_ids_chosen): its states likewise
  chosen_ids = pipe.tokenizer(["a blue square", "a green bar"])
  given = loop.make_prepare(pipe, schema.pair_spec(has_chosen_prompt=True), "duo")(
      frozen, {"image_chosen": images, "image_rejected": images, "input_ids": ids, "input_ids_chosen": chosen_ids},
      key)
  np.testing.assert_allclose(given["text_states_chosen"], pipe.encode_prompts(["a blue square", "a green bar"]),
                             atol=1e-5)
  np.testing.assert_allclose(given["text_states"], out["text_states"], atol=1e-6)
  with pytest.raises(ValueError, match="SC-DPO needs the safety costs"):
    loop.make_prepare(pipe, spec, "sc_dpo")(frozen, {"image_chosen": images, "image_rejected": images,
                                                     "input_ids": ids}, key)
