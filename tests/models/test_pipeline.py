"""The Stable Diffusion pipeline end to end against diffusers' StableDiffusionPipeline on a tiny random model.

Tolerance: images agree to 1e-3 in [0, 1] pixel space. Both sides run the same float32 networks (each
within ~1e-6 of the other, see the model parity tests) through 10 DDIM steps, where differences can grow by
the guidance scale each step; 1e-3 is a quarter of one uint8 level. Measured: 2.4e-6 (10 steps, guidance 3),
2.1e-6 (50 steps, guidance 7.5), 1.0e-6 (no guidance), 1.5e-6 (our saved folder run by diffusers).
"""
import os
import sys

import numpy as np
import pytest

from sc_dpo_jax import models
from tests.sd_reference import diffusers_images, tiny_sd_pipeline
from tests.subprocess_helper import run

PROMPTS = ["a red cat", "blue square, small"]
TOL = 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sd") / "tiny-sd")
  pipe = tiny_sd_pipeline()
  pipe.save_pretrained(folder)
  return pipe, folder


@pytest.fixture(scope="module")
def ours(reference):
  return models.load_pipeline(reference[1])


def _latents(n=2, seed=0):
  return np.random.RandomState(seed).randn(n, 8, 8, 4).astype(np.float32)


def test_generate_matches_diffusers(reference, ours):
  latents = _latents()
  expected = diffusers_images(reference[0], PROMPTS, latents, steps=10, guidance=3.0,
                              negative_prompt=["green", "dog"])
  got = ours.generate(PROMPTS, latents=latents, steps=10, guidance=3.0, negative_prompt=["green", "dog"],
                      output="float")
  assert got.shape == expected.shape == (2, 16, 16, 3)
  diff = np.abs(got - expected).max()
  assert diff <= TOL, diff
  # Without guidance (scale 1: the conditional branch only).
  expected = diffusers_images(reference[0], PROMPTS, latents, steps=4, guidance=1.0)
  got = ours.generate(PROMPTS, latents=latents, steps=4, guidance=1.0, output="float")
  assert np.abs(got - expected).max() <= TOL


def test_saved_pipeline_loads_in_diffusers_and_generates_the_same(reference, ours, tmp_path):
  from diffusers import StableDiffusionPipeline
  models.save_pipeline(str(tmp_path / "out"), ours)
  theirs = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
  latents = _latents(seed=1)
  expected = diffusers_images(theirs, PROMPTS, latents, steps=5, guidance=2.0)
  got = ours.generate(PROMPTS, latents=latents, steps=5, guidance=2.0, output="float")
  assert np.abs(got - expected).max() <= TOL
  again = models.load_pipeline(str(tmp_path / "out"))
  np.testing.assert_array_equal(again.params["unet"]["conv_in"]["kernel"], ours.params["unet"]["conv_in"]["kernel"])
  np.testing.assert_array_equal(again.tokenizer(PROMPTS), ours.tokenizer(PROMPTS))


def test_seeded_images_do_not_depend_on_batch_size(ours):
  a = ours.generate(PROMPTS * 2, seed=3, steps=3, guidance=2.0, batch_size=4, progress=False)
  b = ours.generate(PROMPTS * 2, seed=3, steps=3, guidance=2.0, batch_size=1, progress=False)
  assert a.dtype == np.uint8 and a.shape == (4, 16, 16, 3)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
  c = ours.generate(PROMPTS * 2, seed=4, steps=3, guidance=2.0, batch_size=4, progress=False)
  assert np.abs(a.astype(int) - c.astype(int)).mean() > 5   # another seed, other pictures


def test_sdedit_keeps_the_input_at_low_strength(ours):
  import dataclasses
  import jax
  from sc_dpo_jax.models.vae import decode_latents, encode_to_latents
  # The tiny random VAE has a wide posterior; narrow it (logvar -> -30) so an edit's start is its mean and
  # the comparison below measures the sampler, not the VAE's noise. SD's own VAE has std ~1e-3.
  vae_params = jax.tree.map(lambda x: x, ours.params["vae"])
  bias = np.array(vae_params["quant_conv"]["bias"])
  bias[bias.shape[0] // 2:] = -40.0
  vae_params["quant_conv"]["bias"] = bias
  pipe = dataclasses.replace(ours, params=dict(ours.params, vae=vae_params))
  rng = np.random.RandomState(0)
  images = (rng.rand(2, 16, 16, 3) * 255).astype(np.uint8)
  x = images.astype(np.float32) / 255 * 2 - 1
  roundtrip = np.clip(np.asarray(decode_latents(pipe.vae, vae_params, encode_to_latents(
      pipe.vae, vae_params, x))) / 2 + 0.5, 0, 1)
  distance = {}
  for strength in (0.1, 0.5, 1.0):
    edited = pipe.edit(images, PROMPTS, strength=strength, steps=10, guidance=2.0, output="float")
    distance[strength] = float(np.abs(edited - roundtrip).mean())
  # More strength, more change (measured 0.093, 0.175, 0.181). Strength 0.1 of 10 steps is one DDIM step from
  # t=1; it still moves the picture because the random UNet's noise estimate is poor and the tiny VAE's
  # latents are small next to it.
  assert distance[0.1] < 0.6 * distance[0.5] and distance[0.5] < distance[1.0], distance


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "empty"),
    (dict(guidance=-1.0), "guidance"),
    (dict(steps=0), "steps"),
    (dict(height=15), "multiples of 2"),
])
def test_generate_rejects_bad_input(ours, kwargs, match):
  args = dict(prompts=PROMPTS, steps=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    ours.generate(args.pop("prompts"), **args)


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.2])
def test_edit_rejects_strength_outside_0_1(ours, strength):
  with pytest.raises(ValueError, match="strength"):
    ours.edit(np.zeros((2, 16, 16, 3), np.uint8), PROMPTS, strength=strength, steps=2)


def test_folder_without_model_index(tmp_path):
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    models.load_pipeline(str(tmp_path))


def test_generate_command_writes_a_grid(reference, tmp_path):
  from PIL import Image
  cmd = [sys.executable, "-m", "sc_dpo_jax.generate", f"--model={reference[1]}", "--prompt=a red cat",
         "--prompt=blue", "--num_images=3", "--steps=2", "--guidance=2", f"--out={tmp_path / 'grid.png'}",
         f"--out_dir={tmp_path / 'images'}"]
  run(cmd, timeout=300)
  grid = np.asarray(Image.open(tmp_path / "grid.png"))
  assert grid.shape == (2 * 16, 3 * 16, 3)
  assert len(os.listdir(tmp_path / "images")) == 6
