"""Safe Latent Diffusion: the guidance rule against a NumPy transcription of its formulas, and the pipeline's
``generate(..., safety=...)`` against diffusers' ``StableDiffusionPipelineSafe`` on a tiny random model.

Parity tolerance: images agree to 1e-3 in [0, 1] pixel space (a quarter of one uint8 level), the plain
pipeline's parity tolerance (tests/models/test_pipeline.py). Both sides run the same float32 networks on the CPU
(each within ~1e-6 of the other). SLD adds the elementwise min(|c - s| * sld_scale, 1) with sld_scale up to
5000, whose slope turns a 1e-7 difference of the noise predictions into ~5e-4 of one element's weight, and a
threshold an element could fall on either side of; 1e-3 leaves room for that. Measured (guidance 5): 2.8e-6
("medium", 30 steps), 7.6e-6 ("max", 6 steps); the safety term moves the images by 3.3e-2 and 5.1e-1 (max
abs), more than 30 times the tolerance.

The runs are chosen well-conditioned. "max" (sld_scale 5000, from the first step) over 8 steps is not, on this
random model: there diffusers' own images move by 4.7e-3 when its initial latents change by 1e-6 (relative),
and ours differ from its by 2.3e-2; over 6 steps that sensitivity is 2e-5 and ours agree to 7e-6.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax import models
from sc_dpo_jax.diffusion import safe_guidance
from sc_dpo_jax.diffusion.safe_guidance import DEFAULT_SAFETY_CONCEPT, SLDConfig, sld_guidance
from sc_dpo_jax.models import pipeline as pipeline_lib
from tests.sd_reference import tiny_sd_pipeline
from tests.subprocess_helper import run

TOL = 1e-3
# Short prompts: diffusers' safe pipeline tokenizes a batch of prompts without padding to check truncation, and
# fails when a prompt is longer than the (tiny, 16-token) text length.
PROMPTS = ["a red cat", "blue sky, small"]


# ------------------------------------------------------------------------------ the rule, in NumPy
def numpy_sld(u, c, s, *, g, sld_scale, warmup, threshold, mom_scale, mom_beta):
  """SLD over a run of steps (``u[i], c[i], s[i]`` at step ``i``), the paper's equations as written."""
  momentum = np.zeros_like(u[0])
  outs, momenta = [], []
  for i in range(len(u)):
    scale = np.minimum(np.abs(c[i] - s[i]) * sld_scale, 1.0)                 # eq. 6
    scale[c[i] - s[i] >= threshold] = 0.0
    gamma = (s[i] - u[i]) * scale + mom_scale * momentum                   # eq. 4 and 7
    momentum = mom_beta * momentum + (1 - mom_beta) * gamma                # eq. 8
    guidance = c[i] - u[i]
    if i >= warmup:
      guidance = guidance - gamma                                           # eq. 3
    outs.append(u[i] + g * guidance)
    momenta.append(momentum)
  return np.stack(outs), np.stack(momenta)


def jax_sld(u, c, s, *, g, sld):
  """``sld_guidance`` scanned over the steps under jit (step index and guidance scale traced)."""
  @jax.jit
  def run_steps(u, c, s, g):
    def body(m, inputs):
      i, ui, ci, si = inputs
      out, m = sld_guidance(ui, ci, si, i, m, guidance_scale=g, sld=sld)
      return m, (out, m)
    _, (outs, momenta) = jax.lax.scan(body, safe_guidance.init_momentum(u[0]),
                                      (jnp.arange(len(u)), u, c, s))
    return outs, momenta
  return tuple(np.asarray(a) for a in run_steps(u, c, s, jnp.float32(g)))


def _predictions(steps, seed=0, shape=(2, 4, 4, 3)):
  """Random (u, c, s) for ``steps`` steps, each element on a scale log-uniform in [1e-4, 1], so that for every
  preset both sides of the clip (|c - s| sld_scale = 1) and of the threshold occur (checked in the test)."""
  rng = np.random.RandomState(seed)
  return [(rng.randn(steps, *shape) * 10.0 ** rng.uniform(-4, 0, (steps, *shape))).astype(np.float32)
          for _ in range(3)]


@pytest.mark.parametrize("sld", [
    SLDConfig(guidance_scale=30.0, warmup_steps=2, threshold=0.01, momentum_scale=0.5, mom_beta=0.7),
    *(SLDConfig.preset(name) for name in safe_guidance.PRESET_NAMES),
], ids=["custom", *safe_guidance.PRESET_NAMES])
def test_guidance_matches_the_formulas_over_steps(sld):
  steps = max(sld.warmup_steps + 4, 6)
  u, c, s = _predictions(steps)
  expected, expected_m = numpy_sld(u, c, s, g=7.5, sld_scale=sld.guidance_scale, warmup=sld.warmup_steps,
                                   threshold=sld.threshold, mom_scale=sld.momentum_scale, mom_beta=sld.mom_beta)
  got, got_m = jax_sld(u, c, s, g=7.5, sld=sld)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_m, expected_m, rtol=1e-5, atol=1e-9)
  plain = u + 7.5 * (c - u)
  # Warm-up: plain guidance (to rounding) before step warmup_steps, the safety term from it on.
  np.testing.assert_allclose(got[:sld.warmup_steps], plain[:sld.warmup_steps], rtol=1e-6, atol=1e-7)
  assert np.abs(got[sld.warmup_steps:] - plain[sld.warmup_steps:]).max() > 1e-4
  scaled = np.abs(c - s) * sld.guidance_scale
  active = c - s < sld.threshold
  assert active.any() and (~active).any()
  assert (scaled[active] < 1).any() and (scaled[active] > 1).any()


def test_momentum_builds_during_warm_up_and_carries_over():
  sld = SLDConfig(guidance_scale=30.0, warmup_steps=3, threshold=0.01, momentum_scale=0.5, mom_beta=0.7)
  u, c, s = _predictions(5, seed=1)
  with_momentum, momenta = jax_sld(u, c, s, g=5.0, sld=sld)
  assert np.abs(momenta[:3]).max() > 1e-3   # built up while the safety term is not applied yet
  # Step 3 (the first applied one) with the momentum of steps 0-2 differs from one without momentum.
  without, _ = jax_sld(u, c, s, g=5.0, sld=SLDConfig(guidance_scale=30.0, warmup_steps=3, threshold=0.01,
                                                      momentum_scale=0.0, mom_beta=0.7))
  np.testing.assert_allclose(with_momentum[:3], without[:3], rtol=1e-6, atol=1e-9)
  assert np.abs(with_momentum[3] - without[3]).max() > 1e-3
  # By hand: gamma_3 = scale * (s - u) + 0.5 * m_3, with m_3 from the three warm-up steps.
  m = np.zeros_like(u[0])
  for i in range(3):
    scale = np.where(c[i] - s[i] >= 0.01, 0.0, np.minimum(np.abs(c[i] - s[i]) * 30.0, 1.0))
    m = 0.7 * m + 0.3 * ((s[i] - u[i]) * scale + 0.5 * m)
  np.testing.assert_allclose(with_momentum[3] - without[3], -5.0 * 0.5 * m, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ settings
def test_presets_and_concept_are_diffusers():
  from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
  for name in safe_guidance.PRESET_NAMES:
    assert safe_guidance.PRESETS[name].diffusers_kwargs() == getattr(SafetyConfig, name.upper())
    assert SLDConfig.preset(name) == safe_guidance.PRESETS[name] == safe_guidance.resolve(name)
  assert SLDConfig.preset("MAX") == SLDConfig.preset("max")
  assert SLDConfig.preset("medium", concept="x").concept == "x"
  assert SLDConfig() == SLDConfig.preset("medium")        # diffusers' __call__ defaults are MEDIUM's
  assert SLDConfig().concept == DEFAULT_SAFETY_CONCEPT
  assert hash(SLDConfig.preset("max")) == hash(SLDConfig.preset("max"))


def test_default_concept_is_the_diffusers_pipelines(safe_reference):
  assert safe_reference.safety_concept == DEFAULT_SAFETY_CONCEPT


@pytest.mark.parametrize("field,value,error", [
    ("guidance_scale", 1.0, ValueError),
    ("guidance_scale", float("nan"), ValueError),
    ("guidance_scale", "1000", TypeError),
    ("warmup_steps", -1, ValueError),
    ("warmup_steps", 2.5, TypeError),
    ("warmup_steps", True, TypeError),
    ("threshold", float("inf"), ValueError),
    ("momentum_scale", -0.1, ValueError),
    ("mom_beta", 1.5, ValueError),
    ("mom_beta", None, TypeError),
    ("concept", "  ", ValueError),
    ("concept", None, ValueError),
])
def test_settings_refuse_bad_values_naming_the_field(field, value, error):
  with pytest.raises(error, match=f"SLDConfig.{field}"):
    SLDConfig(**{field: value})


def test_resolve():
  assert safe_guidance.resolve(None) is None
  sld = SLDConfig(warmup_steps=3)
  assert safe_guidance.resolve(sld) is sld
  with pytest.raises(ValueError, match="unknown SLD preset 'extreme'.*weak"):
    safe_guidance.resolve("extreme")
  with pytest.raises(TypeError, match="safety must be"):
    safe_guidance.resolve(3)


# ------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sd") / "tiny-sd")
  pipe = tiny_sd_pipeline()
  pipe.save_pretrained(folder)
  return pipe, folder


@pytest.fixture(scope="module")
def one_torch_thread():
  """The tiny runs are far faster on one thread than on several contending for a busy machine's cores."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def safe_reference(reference, one_torch_thread):  # pylint: disable=unused-argument
  from diffusers import StableDiffusionPipelineSafe
  pipe = reference[0]
  safe = StableDiffusionPipelineSafe(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
  safe.set_progress_bar_config(disable=True)
  return safe


@pytest.fixture(scope="module")
def ours(reference):
  return models.load_pipeline(reference[1])


def _latents(n=2, seed=0):
  return np.random.RandomState(seed).randn(n, 8, 8, 4).astype(np.float32)


def _diffusers_safe(safe, latents_nhwc, *, steps, guidance, **sld_kwargs):
  import torch
  latents = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return safe(PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=guidance, eta=0.0,
                output_type="np", height=16, width=16, **sld_kwargs).images


@pytest.mark.filterwarnings("ignore:Safety checker disabled")   # diffusers' run with sld_guidance_scale 0
@pytest.mark.parametrize("preset,steps", [("medium", 30), ("max", 6)])
def test_generate_with_safety_matches_diffusers(safe_reference, ours, preset, steps):
  """Enough steps that the warm-up (10 for medium, 0 for max) passes and the safety term acts."""
  latents, guidance = _latents(), 5.0
  sld = SLDConfig.preset(preset)
  expected = _diffusers_safe(safe_reference, latents, steps=steps, guidance=guidance, **sld.diffusers_kwargs())
  got = ours.generate(PROMPTS, latents=latents, steps=steps, guidance=guidance, safety=preset, output="float",
                      progress=False)
  assert got.shape == expected.shape == (2, 16, 16, 3)
  diff = float(np.abs(got - expected).max())
  assert diff <= TOL, diff
  # The safety term is active: SLD moves the images far more than the tolerance, on both sides alike.
  plain = ours.generate(PROMPTS, latents=latents, steps=steps, guidance=guidance, output="float", progress=False)
  their_plain = _diffusers_safe(safe_reference, latents, steps=steps, guidance=guidance, sld_guidance_scale=0.0)
  effect = float(np.abs(got - plain).max())
  assert effect > 20 * TOL, effect
  assert np.abs(plain - their_plain).max() <= TOL
  np.testing.assert_allclose(got - plain, expected - their_plain, atol=TOL)
  print(f"{preset}: max |ours - diffusers| = {diff:.2e}, SLD effect {effect:.2e}")


def test_concept_is_an_input_of_one_program(ours):
  """A safety concept equal to the negative prompt gives s = u, so no safety term: plain guidance. It is run
  by the program compiled for the preset's numbers (the concept's token ids are an input). 30 steps: the
  programs of the parity test serve (the guidance scale is an input too)."""
  latents, kw = _latents(seed=2), dict(steps=30, guidance=4.0, negative_prompt="green", output="float",
                                       progress=False)
  medium = ours.generate(PROMPTS, latents=latents, safety="medium", **kw)
  before = pipeline_lib._sampler.cache_info()  # pylint: disable=protected-access
  same = ours.generate(PROMPTS, latents=latents, safety=SLDConfig.preset("medium", concept="green"), **kw)
  after = pipeline_lib._sampler.cache_info()  # pylint: disable=protected-access
  assert after.misses == before.misses and after.hits == before.hits + 1
  plain = ours.generate(PROMPTS, latents=latents, **kw)
  assert np.abs(same - plain).max() <= 1e-5      # a batch of 3 against one of 2: float rounding only
  assert np.abs(medium - plain).max() > 10 * TOL


def test_programs_are_keyed_on_the_settings(ours):
  sampler = pipeline_lib._sampler  # pylint: disable=protected-access
  key = dict(steps=4, eta=0.0, use_guidance=True, strength=None)
  parts = (ours.text_encoder, ours.unet, ours.vae, ours.schedule)
  plain = sampler(*parts, **key, safety=None)
  medium = sampler(*parts, **key, safety=SLDConfig.preset("medium"))
  assert medium is sampler(*parts, **key, safety=SLDConfig())
  assert medium is not plain
  assert medium is not sampler(*parts, **key, safety=SLDConfig.preset("max"))
  with pytest.raises(ValueError, match="text to image"):
    sampler(*parts, **dict(key, strength=0.5), safety=SLDConfig())


def test_safety_needs_guidance_and_text_to_image(ours):
  with pytest.raises(ValueError, match="guidance > 1"):
    ours.generate(PROMPTS, steps=2, guidance=1.0, safety="max")
  with pytest.raises(ValueError, match="unknown SLD preset"):
    ours.generate(PROMPTS, steps=2, guidance=3.0, safety="maximum")
  with pytest.raises(NotImplementedError, match="edit.*safety"):
    ours.edit(np.zeros((2, 16, 16, 3), np.uint8), PROMPTS, steps=2, safety="max")


def test_generate_command_takes_safety(reference, tmp_path):
  from PIL import Image
  cmd = [sys.executable, "-m", "sc_dpo_jax.generate", f"--model={reference[1]}", "--prompt=a red cat",
         "--num_images=2", "--steps=3", "--guidance=3", "--safety=max", f"--out={tmp_path / 'grid.png'}"]
  run(cmd, timeout=300)
  assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (16, 2 * 16, 3)
