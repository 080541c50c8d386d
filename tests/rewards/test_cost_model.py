"""The safety cost model on a tiny random CLIP vision tower and synthetic images where "harmful" = "a lot of red".

Images (36x36, resized to the tower's 32 by the model's preprocessing) are a random background from a palette
without red, three random rectangles, and a red disc covering a random fraction (0 .. 0.7) of the image, with
pixel noise. Harmful: red fraction > 0.3; safe: < 0.1; ordered pairs differ by > 0.1 in red fraction. The
adapter trains on precomputed embeddings of 300 images; 300 steps of 32 pairs + 32 labelled images.

Measured on held-out images (2-core CPU): ranking accuracy 0.95, mean cost of harmful images +5.4 and of safe
ones -6.7, every held-out harmful image > 0 and every safe one < 0. The asserts ask for ranking accuracy >= 0.8
and mean costs beyond +-1.
"""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax.models import CLIPVisionModel, save_clip_vision, tiny_vision_config
from sc_dpo_jax.models.random_init import host_random_params
from sc_dpo_jax.models.weights import CheckpointMismatchError
from sc_dpo_jax.rewards import cost_model
from sc_dpo_jax.rewards.cost_model import (CostAdapter, SafetyCostModel, embed_in_batches, load_cost_model,
                                           save_cost_model)
from sc_dpo_jax.train import optim
from sc_dpo_jax.train.cost_steps import cost_train_step, create_cost_train_state

PALETTE = np.array([[40, 90, 200], [40, 170, 60], [200, 200, 60], [120, 120, 120], [160, 80, 200],
                    [30, 160, 170], [230, 230, 230]], np.uint8)
RED = np.array([220, 20, 30])
HARMFUL, SAFE = 0.3, 0.1


def make_images(n, seed, size=36):
  """uint8 images [n, size, size, 3] and the fraction of each covered by the red disc."""
  rng = np.random.RandomState(seed)
  images = np.empty((n, size, size, 3), np.uint8)
  red = np.empty(n)
  yy, xx = np.mgrid[0:size, 0:size]
  for i in range(n):
    img = np.broadcast_to(PALETTE[rng.randint(len(PALETTE))], (size, size, 3)).copy()
    for _ in range(3):
      y0, x0 = rng.randint(0, size, 2)
      h, w = rng.randint(4, 16, 2)
      img[y0:y0 + h, x0:x0 + w] = PALETTE[rng.randint(len(PALETTE))]
    radius = np.sqrt(rng.uniform(0, 0.7) * size * size / np.pi)
    cy, cx = rng.uniform(0, size, 2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
    img[mask] = RED
    red[i] = mask.mean()
    images[i] = np.clip(img.astype(np.int32) + rng.randint(-12, 13, img.shape), 0, 255)
  return images, red


def ordered_pairs(red, n, rng):
  a, b = rng.randint(0, len(red), (2, n))
  keep = np.abs(red[a] - red[b]) > 0.1
  a, b = a[keep], b[keep]
  return np.where(red[a] > red[b], a, b), np.where(red[a] > red[b], b, a)


@pytest.fixture(scope="module")
def world():
  clip = CLIPVisionModel(tiny_vision_config(), with_projection=True)
  clip_params = host_random_params(clip, seed=0)
  model = SafetyCostModel(clip, CostAdapter(hidden_sizes=(64,)), clip_name="tiny-random-clip")
  train_images, train_red = make_images(300, seed=1)
  test_images, test_red = make_images(120, seed=2)
  embed = embed_in_batches(model, clip_params, np.concatenate([train_images, test_images]), batch_size=140)
  return dict(clip=clip, clip_params=clip_params, model=model, train_images=train_images, train_red=train_red,
              test_images=test_images, test_red=test_red, train_emb=embed[:300], test_emb=embed[300:])


def _batch(w, rng, n_pairs=32, n_labelled=16):
  red, emb = w["train_red"], w["train_emb"]
  more, less = ordered_pairs(red, 4 * n_pairs, rng)
  harmful, safe = np.flatnonzero(red > HARMFUL), np.flatnonzero(red < SAFE)
  labelled = np.concatenate([rng.choice(harmful, n_labelled), rng.choice(safe, n_labelled)])
  labels = np.where(red[labelled] > HARMFUL, 1, -1).astype(np.int32)
  return {"emb_more": emb[more[:n_pairs]], "emb_less": emb[less[:n_pairs]], "emb_labelled": emb[labelled],
          "labels": labels}


@pytest.fixture(scope="module")
def trained(world):
  clip_params = world["clip_params"]
  clip_before = jax.tree.map(lambda x: np.array(x, copy=True), clip_params)
  tx, _ = optim.make_optimizer({"learning_rate": 3e-3})
  state = create_cost_train_state(world["model"], jax.random.PRNGKey(0), tx=tx, anchor_weight=1.0)
  rng = np.random.RandomState(3)
  history = []
  cache_before = cost_train_step._cache_size()
  for step in range(300):
    state, metrics = cost_train_step(state, clip_params, _batch(world, rng), jax.random.PRNGKey(step))
    history.append({k: float(v) for k, v in metrics.items()})
  compiled = cost_train_step._cache_size() - cache_before
  return dict(state=state, history=history, clip_before=clip_before, compiled=compiled)


def test_training_ranks_and_anchors_held_out_images(world, trained):
  model, state = world["model"], trained["state"]
  costs = np.asarray(jax.jit(model.cost_from_embeddings)(state.params, world["test_emb"]))
  red = world["test_red"]
  more, less = ordered_pairs(red, 600, np.random.RandomState(4))
  accuracy = np.mean(costs[more] > costs[less])
  harmful, safe = costs[red > HARMFUL], costs[red < SAFE]
  print(f"held-out: {len(more)} pairs, ranking accuracy {accuracy:.3f}; mean cost harmful "
        f"{harmful.mean():+.2f} ({len(harmful)}), safe {safe.mean():+.2f} ({len(safe)}); anchored "
        f"{np.mean(harmful > 0):.2f} / {np.mean(safe < 0):.2f}")
  assert len(more) > 200 and len(harmful) > 20 and len(safe) > 10
  assert accuracy >= 0.8
  assert harmful.mean() > 1.0 > -1.0 > safe.mean()
  assert np.mean(harmful > 0) >= 0.8 and np.mean(safe < 0) >= 0.8
  first, last = trained["history"][0], np.mean([h["loss"] for h in trained["history"][-20:]])
  assert last < 0.5 * first["loss"], (first["loss"], last)
  assert "grad_norm" in first and first["grad_norm"] > 0


def test_clip_params_untouched_and_step_compiled_once(world, trained):
  before, after = trained["clip_before"], world["clip_params"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)
  assert trained["compiled"] == 1
  assert int(trained["state"].step) == 300


def test_image_batches_equal_embedding_batches(world):
  """A step on images (CLIP inside the step) equals a step on their precomputed embeddings."""
  model, clip_params = world["model"], world["clip_params"]
  images, red = world["train_images"][:24], world["train_red"][:24]
  emb = world["train_emb"][:24]
  labels = np.where(red[16:] > 0.2, 1, -1).astype(np.int32)
  by_images = {"images_more": images[:8], "images_less": images[8:16], "images_labelled": images[16:],
               "labels": labels}
  by_emb = {"emb_more": emb[:8], "emb_less": emb[8:16], "emb_labelled": emb[16:], "labels": labels}
  results = []
  for batch in (by_images, by_emb):
    state = create_cost_train_state(model, jax.random.PRNGKey(5), tx=optim.make_optimizer({"learning_rate": 1e-3})[0],
                                    anchor_weight=0.5)
    state, metrics = cost_train_step(state, clip_params, batch, jax.random.PRNGKey(0))
    results.append((state.params, metrics))
  for name in results[1][1]:
    np.testing.assert_allclose(results[0][1][name], results[1][1][name], rtol=1e-5, atol=1e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), results[0][0], results[1][0])


def test_save_load_round_trip(world, trained, tmp_path):
  model, clip_params = world["model"], world["clip_params"]
  clip_folder, folder = str(tmp_path / "clip"), str(tmp_path / "cost")
  save_clip_vision(clip_folder, world["clip"], clip_params)
  save_cost_model(folder, model, trained["state"].params)
  loaded, params = load_cost_model(folder, clip_folder)
  assert loaded.adapter == model.adapter and loaded.clip_name == "tiny-random-clip"
  images = world["test_images"][:16]
  assert loaded == model        # same static model: the one compiled program below serves both
  cost = jax.jit(SafetyCostModel.cost, static_argnums=0)
  expected = cost(model, {"clip": clip_params, "adapter": trained["state"].params}, images)
  got = cost(loaded, params, images)
  np.testing.assert_array_equal(got, expected)
  # As a reward part: lower cost, higher reward.
  reward, info = cost_model.CostReward(loaded, params)(images, ["unused"] * len(images))
  assert reward.dtype == np.float32 and info == {}
  np.testing.assert_allclose(reward, np.asarray(expected), atol=1e-5)


def test_load_refuses_a_different_clip(world, trained, tmp_path):
  folder = str(tmp_path / "cost")
  save_cost_model(folder, world["model"], trained["state"].params)
  other = CLIPVisionModel(tiny_vision_config(projection_dim=16), with_projection=True)
  save_clip_vision(str(tmp_path / "clip16"), other, host_random_params(other, seed=1))
  with pytest.raises(ValueError, match=r"dimension 24 .* projects to 16"):
    load_cost_model(folder, str(tmp_path / "clip16"))
  plain = CLIPVisionModel(tiny_vision_config(), with_projection=False)
  save_clip_vision(str(tmp_path / "plain"), plain, host_random_params(plain, seed=1))
  with pytest.raises(ValueError, match="without visual_projection"):
    load_cost_model(folder, str(tmp_path / "plain"))
  deeper = CLIPVisionModel(tiny_vision_config(num_hidden_layers=3), with_projection=True)
  save_clip_vision(str(tmp_path / "deeper"), deeper, host_random_params(deeper, seed=1))
  with pytest.raises(ValueError, match="num_hidden_layers: expected 2, found 3"):
    load_cost_model(folder, str(tmp_path / "deeper"))
  # Weights that do not fit the config (with the right CLIP).
  save_clip_vision(str(tmp_path / "clip_ok"), world["clip"], world["clip_params"])
  wrong = SafetyCostModel(world["clip"], CostAdapter(hidden_sizes=(8,)))
  save_cost_model(str(tmp_path / "wrong"), wrong, wrong.init_adapter(jax.random.PRNGKey(0)))
  shutil.copy(str(tmp_path / "cost" / cost_model.CONFIG_NAME), str(tmp_path / "wrong" / cost_model.CONFIG_NAME))
  with pytest.raises(CheckpointMismatchError, match="hidden_0.kernel: expected"):
    load_cost_model(str(tmp_path / "wrong"), str(tmp_path / "clip_ok"))


def test_errors_name_the_problem(world):
  model = world["model"]
  state = create_cost_train_state(model, jax.random.PRNGKey(0), tx=optim.make_optimizer(None)[0])
  emb = world["train_emb"][:4]
  with pytest.raises(KeyError, match="exactly one of 'emb_more' and 'images_more'; it has both"):
    cost_train_step(state, world["clip_params"], {"emb_more": emb, "images_more": world["train_images"][:4],
                                                  "emb_less": emb, "emb_labelled": emb,
                                                  "labels": np.ones(4, np.int32)}, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"emb_less'\] must be \[N, 24\]"):
    cost_train_step(state, world["clip_params"], {"emb_more": emb, "emb_less": emb[:, :8], "emb_labelled": emb,
                                                  "labels": np.ones(4, np.int32)}, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="with_projection=True"):
    SafetyCostModel(CLIPVisionModel(tiny_vision_config()), CostAdapter())
  with pytest.raises(ValueError, match="activation 'tanh' is not supported"):
    CostAdapter(activation="tanh")
  with pytest.raises(ValueError, match=r"\[B, 24\]"):
    model.cost_from_embeddings(state.params, jnp.zeros((2, 16)))
