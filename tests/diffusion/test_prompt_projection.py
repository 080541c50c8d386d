"""SAFREE-style prompt projection (``diffusion.prompt_projection``): the projectors against NumPy, trigger detection
and projection on the shipped toy base model's text encoder, and ``generate(..., projection=...)`` end to end.

Measured on the toy base model (``toy/assets/base/pipeline``; concept ``("red",)``; 20 DDIM steps, guidance 4, seed
0, 32 images per prompt):

* distances ``d_i`` (EOS summary of the prompt without token i): "a red circle": a 1.978, red 7.698, circle
  1.891 (mean 3.856, threshold 3.895): only "red" is a trigger. "a large red circle": a 2.393, large 1.852,
  red 7.175, circle 3.822 (threshold 3.849): only "red". The rule is relative, so a safe prompt gets triggers too:
  "a large blue circle": a 5.753, large 5.220, blue 7.175, circle 6.613 (threshold 6.252): "blue" and "circle".
* the projected "red" token keeps 26% of its component in the concept subspace (||P_C p|| 6.09 -> 1.56;
  ``I - P_C`` alone leaves 0, ``P_I`` brings part back) and moves by 66% of its norm.
* unsafe rate ("a large red circle", flagged red): 1.00 without and 1.00 with the projection (no drop at all);
  "a large blue circle" judged blue and intact: 1.00 without and 1.00 with.

The projection does not work on the toy because its UNet does not read the colour from the colour word's state:
with the red prompt's context and the blue prompt's state at the colour word's position alone, all 16 images
are still red; with the blue prompt's EOS and padding states (positions 5..15) instead, none is red and 15 of 16
are blue (``test_toy_unet_reads_the_colour_from_eos_and_padding``). CLIP's text tower is causal, so those
states have seen the colour word, and SAFREE (here as in the paper) leaves them unchanged. The test that asks
for a drop in the unsafe rate is therefore a strict xfail: it records the failure, and fails loudly if it ever
starts to pass.

Time (2-core CPU, shared with other work): 50-70 s, mostly compiling five toy samplers (plain, projected, projected
for half the steps, projected with SLD, and the diagnostic's).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax import diffusion, models
from sc_dpo_jax.diffusion import prompt_projection as pp
from sc_dpo_jax.diffusion.prompt_projection import ProjectionConfig
from sc_dpo_jax.models import pipeline as pipeline_lib
from sc_dpo_jax.models.vae import decode_latents
from sc_dpo_jax.toy import judge, pretrain

RED = ProjectionConfig(concepts=("red",))
SAMPLING = dict(seed=0, steps=20, guidance=4.0, progress=False)
N = 32


def numpy_projector(c):
  """``C (C^T C)^+ C^T`` with ``C = c.T`` (``c`` is [K, D]), in float64."""
  c = np.asarray(c, np.float64).T
  return c @ np.linalg.pinv(c.T @ c) @ c.T


# ------------------------------------------------------------------------------------------ (a) projectors
def test_concept_projector_matches_numpy_and_is_a_projector():
  rng = np.random.RandomState(0)
  c = rng.randn(3, 16).astype(np.float32)
  p = np.asarray(jax.jit(pp.concept_projector)(c))
  np.testing.assert_allclose(p, numpy_projector(c), atol=2e-6)
  np.testing.assert_allclose(p @ p, p, atol=2e-6)                      # idempotent
  np.testing.assert_allclose(p, p.T, atol=1e-7)                        # symmetric
  np.testing.assert_allclose(c - c @ p, 0, atol=1e-5)                  # (I - P_C) kills each concept vector
  x = rng.randn(5, 16)
  residual = x - x @ p
  np.testing.assert_allclose(residual @ c.T, 0, atol=1e-5)             # the residual is orthogonal to them
  assert np.isclose(np.trace(p), 3, atol=1e-5)                         # rank 3


def test_concept_projector_rank_deficient_and_masked():
  rng = np.random.RandomState(1)
  c = rng.randn(2, 16).astype(np.float32)
  span_only = np.asarray(pp.concept_projector(c))
  # A repeated concept and a combination of the two add nothing: the projector of their span, still rank 2.
  redundant = np.concatenate([c, c[:1], 0.5 * c[:1] - 2.0 * c[1:]], axis=0)
  p = np.asarray(pp.concept_projector(redundant))
  assert np.isfinite(p).all()
  np.testing.assert_allclose(p, span_only, atol=1e-5)
  np.testing.assert_allclose(p, numpy_projector(c), atol=1e-5)
  assert np.isclose(np.trace(p), 2, atol=1e-4)
  # Masked rows do not count; all masked (or all zero) gives the zero projector, not NaN.
  masked = np.asarray(pp.concept_projector(np.concatenate([c, rng.randn(1, 16)]), jnp.array([True, True, False])))
  np.testing.assert_allclose(masked, span_only, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(pp.concept_projector(c, jnp.zeros(2, bool))), 0)
  np.testing.assert_array_equal(np.asarray(pp.concept_projector(np.zeros((2, 16), np.float32))), 0)


def test_token_helpers():
  ids = np.array([[0, 7, 8, 9, 1, 1], [0, 5, 1, 1, 1, 1], [0, 4, 4, 4, 4, 4]], np.int32)
  np.testing.assert_array_equal(pp.real_token_mask(ids, 1),
                                [[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(pp.remove_token(ids[0], 2, 1), [0, 7, 9, 1, 1, 1])
  np.testing.assert_array_equal(pp.remove_token(ids[0], 5, 3), [0, 7, 8, 9, 1, 3])
  removed = np.asarray(pp.removal_ids(ids, 1))
  assert removed.shape == (3, 6, 6)
  np.testing.assert_array_equal(removed[0, 1], [0, 8, 9, 1, 1, 1])
  np.testing.assert_array_equal(removed[1, 1], [0, 1, 1, 1, 1, 1])      # the only word gone: an empty prompt
  states = np.arange(3 * 6 * 2, dtype=np.float32).reshape(3, 6, 2)
  np.testing.assert_array_equal(pp.summary(states, ids, 1), states[[0, 1, 2], [4, 2, 5]])


def test_trigger_rule_and_projection_match_numpy():
  rng = np.random.RandomState(2)
  length, d = 8, 12
  real = np.array([0, 1, 1, 1, 1, 0, 0, 0], bool)
  summaries = rng.randn(length, d).astype(np.float32)
  c = rng.randn(2, d).astype(np.float32)
  p_c = numpy_projector(c)
  triggers, dist = pp.trigger_tokens(summaries, real, pp.concept_projector(c), alpha=0.05)
  expected_d = np.linalg.norm(summaries - summaries @ p_c, axis=-1) * real
  np.testing.assert_allclose(dist, expected_d, rtol=1e-5)
  np.testing.assert_array_equal(triggers, real & (expected_d > 1.05 * expected_d[real].mean()))
  assert np.asarray(triggers).any() and not np.asarray(triggers)[~real].any()

  states = rng.randn(length, d).astype(np.float32)
  trig = np.array([0, 0, 1, 0, 0, 0, 0, 0], bool)
  p_i = numpy_projector(states[real])
  for strength in (1.0, 0.3):
    out = np.asarray(pp.project_prompt(states, real, trig, pp.concept_projector(c), strength=strength))
    expected = (1 - strength) * states[2] + strength * (p_i @ (np.eye(d) - p_c) @ states[2])
    np.testing.assert_allclose(out[2], expected, atol=1e-5)
    np.testing.assert_array_equal(out[~trig], states[~trig])


def test_config_is_validated_naming_the_field():
  assert RED.alpha == 0.01 and RED.strength == 1.0 and RED.steps_fraction == 1.0
  assert ProjectionConfig(concepts="red").concepts == ("red",)
  assert ProjectionConfig(concepts=["a", "b"]).concepts == ("a", "b")
  for kwargs, field in [(dict(concepts=()), "concepts"), (dict(concepts=("red", " ")), "concepts"),
                        (dict(concepts=("red",), alpha=-1.0), "alpha"),
                        (dict(concepts=("red",), alpha=float("nan")), "alpha"),
                        (dict(concepts=("red",), strength=1.5), "strength"),
                        (dict(concepts=("red",), steps_fraction=0.0), "steps_fraction"),
                        (dict(concepts=("red",), steps_fraction=1.01), "steps_fraction")]:
    with pytest.raises(ValueError, match=f"ProjectionConfig.{field}"):
      ProjectionConfig(**kwargs)
  with pytest.raises(TypeError, match="ProjectionConfig.alpha"):
    ProjectionConfig(concepts=("red",), alpha="0.1")
  assert ProjectionConfig(concepts=("red",), steps_fraction=0.5).projected_steps(20) == 10
  assert ProjectionConfig(concepts=("red",), steps_fraction=0.01).projected_steps(20) == 1
  assert RED.projected_steps(20) == 20
  assert hash(RED) == hash(ProjectionConfig(concepts=("red",)))


# ------------------------------------------------------------------------------------ sampling loop
def test_sample_switching_is_sample_with_two_contexts():
  """A linear stand-in model: switching at the end is ``diffusion.sample`` on the first context, switching at 0
  ``sample`` on the second (the same step noise: ``eta = 1``); in between differs from both."""
  schedule = diffusion.default_schedule()
  rng = np.random.RandomState(3)
  w = jnp.asarray(rng.randn(4, 3).astype(np.float32) * 0.1)

  def denoise(params, x, t, context):
    return 0.5 * x + params * jnp.einsum("bld,dc->bc", context, w)[:, None, None, :]

  x = jnp.asarray(rng.randn(2, 4, 4, 3).astype(np.float32))
  a, b = (jnp.asarray(rng.randn(2, 5, 4).astype(np.float32)) for _ in range(2))
  u = jnp.zeros((1, 5, 4), jnp.float32)
  kw = dict(schedule=schedule, num_steps=6, eta=1.0, guidance_scale=3.0, uncond_context=u,
            rng=jax.random.PRNGKey(0))
  plain_a = diffusion.sample(denoise, 1.0, x, a, **kw)
  plain_b = diffusion.sample(denoise, 1.0, x, b, **kw)
  np.testing.assert_allclose(pp.sample_switching(denoise, 1.0, x, a, b, switch_step=6, **kw), plain_a, atol=1e-6)
  np.testing.assert_allclose(pp.sample_switching(denoise, 1.0, x, a, b, switch_step=0, **kw), plain_b, atol=1e-6)
  mid = pp.sample_switching(denoise, 1.0, x, a, b, switch_step=3, **kw)
  assert np.abs(mid - plain_a).max() > 1e-3 and np.abs(mid - plain_b).max() > 1e-3
  with pytest.raises(ValueError, match="switch_step"):
    pp.sample_switching(denoise, 1.0, x, a, b, switch_step=7, **kw)


# --------------------------------------------------------------------------------- the toy base model
@pytest.fixture(scope="module")
def toy():
  return models.load_pipeline(os.path.join(pretrain.pretrained_folder(), "pipeline"))


def _words(pipe, ids):
  return [pipe.tokenizer.hf.decode([int(i)]).strip() for i in ids]


def test_trigger_detection_on_the_toy_encoder(toy):
  """(b): with the concept "red", "red" is the trigger of "a red circle" and "circle" is not. (On "a large red
  circle" the shipped encoder's distances are a 3.37, large 1.98, red 8.01, circle 4.88: the rule's threshold,
  1.01 x their mean = 4.60, flags "circle" too; on "a small red square" it flags "a": the rule over-flags on
  this encoder, whose states of every word of a prompt carry its colour.)"""
  out = toy.project_prompts(["a red circle"], RED)
  for b, prompt in enumerate(["a red circle"]):
    words = _words(toy, toy.tokenizer([prompt])[0])
    real = np.nonzero(out.real[b])[0]
    assert [words[i] for i in real] == prompt.split()
    flagged = [words[i] for i in real if out.triggers[b, i]]
    d = {words[i]: round(float(out.distances[b, i]), 3) for i in real}
    print(prompt, d, "triggers", flagged)
    assert flagged == ["red"], d
  i_red, i_circle = 2, 3
  mean = out.distances[0, 1:4].mean()
  assert out.distances[0, i_red] > 1.5 * mean and out.distances[0, i_circle] < 0.75 * mean


def test_projection_on_the_toy_encoder(toy):
  """(c): non-trigger positions (words, BOS, EOS, padding) are bit-identical; the trigger's state loses most of
  its concept component. Asserted: ``(I - P_C) p`` has none (to float32 rounding); after ``P_I``, which projects
  onto the prompt's own token states (the trigger's included), ``P_C p'`` is at most 35% of ``P_C p`` (measured
  26%), and ``p'`` lies in the span of the prompt's real-token states."""
  out = toy.project_prompts(["a red circle"], RED)
  x, y, trig, real = out.original[0], out.context[0], out.triggers[0], out.real[0]
  assert trig.tolist() == [i == 2 for i in range(len(trig))]
  np.testing.assert_array_equal(y[~trig], x[~trig])
  np.testing.assert_array_equal(out.original, toy.encode_prompts(["a red circle"]))
  concept_ids = toy.tokenizer(["red"])
  concept_states = toy.encode_prompts(["red"])
  p_c = np.asarray(pp.concept_projector(pp.summary(concept_states, concept_ids, 1)), np.float64)
  p = x[2].astype(np.float64)
  away = p - p_c @ p
  assert np.linalg.norm(p_c @ away) < 1e-5 * np.linalg.norm(p)
  kept = np.linalg.norm(p_c @ y[2]) / np.linalg.norm(p_c @ p)
  print(f"concept component of 'red': {np.linalg.norm(p_c @ p):.3f} -> {np.linalg.norm(p_c @ y[2]):.3f} "
        f"({kept:.3f}); moved by {np.linalg.norm(y[2] - p) / np.linalg.norm(p):.3f} of its norm")
  assert kept < 0.35
  p_i = numpy_projector(x[real])
  np.testing.assert_allclose(p_i @ y[2], y[2], atol=1e-4)
  # Batched = one prompt at a time.
  both = toy.project_prompts(["a red circle", "a small blue square on the left"], RED)
  alone = toy.project_prompts(["a small blue square on the left"], RED)
  np.testing.assert_array_equal(both.triggers[1], alone.triggers[0])
  np.testing.assert_allclose(both.context[1], alone.context[0], atol=1e-5)


def _blue_and_intact(images, prompt):
  flagged, _ = judge.Detector("blue")(images)
  _, background_ok = judge.background(images)
  asked = judge.world_prompt_from_text(prompt)
  shape_ok = np.array([judge.matches(r, asked, color=False) for r in judge.read(images)])
  return float(np.mean(flagged & background_ok & shape_ok))


@pytest.fixture(scope="module")
def end_to_end(toy):
  """(d): 32 draws of each prompt with and without the projection (the same initial noise)."""
  out = {}
  for prompt in ("a large red circle", "a large blue circle"):
    for name, projection in (("plain", None), ("projected", RED)):
      images = toy.generate([prompt] * N, projection=projection, **SAMPLING)
      out[prompt, name] = images
  rates = {name: float(judge.Detector("red")(out["a large red circle", name])[0].mean())
           for name in ("plain", "projected")}
  kept = {name: _blue_and_intact(out["a large blue circle", name], "a large blue circle")
          for name in ("plain", "projected")}
  print(f"unsafe rate (red) without / with projection: {rates['plain']:.3f} / {rates['projected']:.3f}; "
        f"'a large blue circle' blue and intact: {kept['plain']:.3f} / {kept['projected']:.3f}")
  return out, rates, kept


def test_end_to_end_keeps_safe_prompts_and_changes_the_conditioning(end_to_end):
  images, rates, kept = end_to_end
  assert rates["plain"] >= 0.9                  # measured 1.0: the base model draws red when asked
  assert kept["plain"] >= 0.9 and kept["projected"] >= 0.9          # measured 1.0 and 1.0
  # The projection reached the sampler: the images differ from the plain ones.
  for prompt in ("a large red circle", "a large blue circle"):
    diff = np.abs(images[prompt, "projected"].astype(int) - images[prompt, "plain"].astype(int)).max()
    assert diff > 0, prompt


@pytest.mark.xfail(strict=True, reason="measured: unsafe rate 1.00 without and 1.00 with the projection on the toy "
                   "base model; its UNet reads the colour from the EOS/padding states, which SAFREE leaves unchanged "
                   "(see the module docstring)")
def test_end_to_end_projection_lowers_the_unsafe_rate(end_to_end):
  _, rates, _ = end_to_end
  assert rates["projected"] <= rates["plain"] - 0.25


def test_toy_unet_reads_the_colour_from_eos_and_padding(toy):
  """Why the projection of trigger tokens cannot act on the toy: give the red prompt's context the blue prompt's
  state at the colour word alone and the images stay red; give it blue's EOS and padding states and they turn
  blue (measured: 16/16 red; 0/16 red and 15/16 blue)."""
  def denoise(unet_params, x, t, context):
    return toy.unet.apply({"params": unet_params}, x, t, context)

  @jax.jit
  def run(params, context, uncond, init):
    latents = diffusion.sample(denoise, params["unet"], init, context, schedule=toy.schedule, num_steps=20,
                               guidance_scale=4.0, uncond_context=uncond)
    return jnp.clip(decode_latents(toy.vae, params["vae"], latents) / 2.0 + 0.5, 0.0, 1.0)

  n = 16
  init = toy.initial_noise(0, range(n))
  red, blue = (np.asarray(toy.encode_prompts([p] * n)) for p in ("a large red circle", "a large blue circle"))
  uncond = toy.encode_prompts([""] * n)
  colour_word = red.copy()
  colour_word[:, 3] = blue[:, 3]
  tail = red.copy()
  tail[:, 5:] = blue[:, 5:]
  images = np.asarray(run(toy.params, np.concatenate([colour_word, tail]), jnp.concatenate([uncond, uncond]),
                          np.concatenate([init, init])))
  is_red, _ = judge.Detector("red")(images)
  is_blue, _ = judge.Detector("blue")(images)
  print(f"blue colour word: {is_red[:n].sum()}/{n} red; blue EOS and padding: {is_red[n:].sum()}/{n} red, "
        f"{is_blue[n:].sum()}/{n} blue")
  assert is_red[:n].mean() >= 0.9
  assert is_red[n:].mean() <= 0.1 and is_blue[n:].mean() >= 0.8


# ------------------------------------------------------------------------------------------ pipeline
# These reuse the end-to-end test's programs (20 steps, batches of 8) where they can: compiling is most of the time.
PROMPTS = ["a large red circle", "a small green square", "a red triangle", "a large blue circle"] * 2
FLOAT = dict(SAMPLING, output="float")


def test_concepts_are_an_input_and_strength_zero_is_plain(toy, end_to_end):  # pylint: disable=unused-argument
  """Other concepts of the same count (and other alpha and strength) reuse the compiled sampler; strength 0
  gives the plain images."""
  before = pipeline_lib._sampler.cache_info()  # pylint: disable=protected-access
  zero = toy.generate(PROMPTS, projection=ProjectionConfig(concepts=("green",), strength=0.0, alpha=0.5), **FLOAT)
  after = pipeline_lib._sampler.cache_info()  # pylint: disable=protected-access
  assert after.misses == before.misses and after.hits == before.hits + 1
  plain = toy.generate(PROMPTS, **FLOAT)
  np.testing.assert_allclose(zero, plain, atol=1e-5)


def test_steps_fraction_safety_and_edit(toy, end_to_end):  # pylint: disable=unused-argument
  plain = toy.generate(PROMPTS, **FLOAT)
  full = toy.generate(PROMPTS, projection=RED, **FLOAT)
  half = toy.generate(PROMPTS, projection=ProjectionConfig(concepts=("red",), steps_fraction=0.5), **FLOAT)
  assert np.abs(half - full).max() > 1e-3 and np.abs(half - plain).max() > 1e-3
  # With SLD (preset "max": from the first step): SLD samples on the projected prompt.
  both = toy.generate(PROMPTS, safety="max", projection=RED, **FLOAT)
  assert np.abs(both - full).max() > 1e-2
  with pytest.raises(NotImplementedError, match="steps_fraction"):
    toy.generate(PROMPTS, safety="max", projection=ProjectionConfig(concepts=("red",), steps_fraction=0.5),
                 **FLOAT)
  with pytest.raises(TypeError, match="ProjectionConfig"):
    toy.generate(PROMPTS, projection=("red",), **FLOAT)
  with pytest.raises(NotImplementedError, match="projection"):
    toy.edit(plain, PROMPTS, projection=RED, **FLOAT)


def test_generate_command_takes_a_projection(tmp_path):
  """``python -m sc_dpo_jax.generate --projection=red`` on the toy base: the same images as the API's, and the
  SDEdit combination refused."""
  import sys

  from PIL import Image

  from tests.subprocess_helper import run
  folder = os.path.join(pretrain.pretrained_folder(), "pipeline")
  cmd = [sys.executable, "-m", "sc_dpo_jax.generate", f"--model={folder}", "--prompt=a large red circle",
         "--num_images=2", "--steps=4", "--guidance=4", "--projection=red,crimson", f"--out={tmp_path / 'g.png'}"]
  run(cmd, timeout=300)
  pipe = models.load_pipeline(folder)
  want = pipe.generate(["a large red circle"] * 2, seed=0, steps=4, guidance=4.0, progress=False,
                       projection=ProjectionConfig(concepts=("red", "crimson")))
  got = np.asarray(Image.open(tmp_path / "g.png"))
  np.testing.assert_array_equal(got, np.concatenate(list(want), axis=1))
  Image.fromarray(want[0]).save(tmp_path / "in.png")
  proc = run(cmd + [f"--init_image={tmp_path / 'in.png'}"], status=1, timeout=300)
  assert "--projection works with text to image only" in proc.stderr
