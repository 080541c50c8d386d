"""Noise schedules, add_noise and training targets against diffusers' DDPMScheduler.

Tolerance 1e-6 absolute for inputs of unit scale: both sides compute sqrt(alpha_bar) and the products in
float32 from the same float32 betas, so only the last bit can differ. With ``rescale_betas_zero_snr``
sqrt(alpha_bar) goes to zero at the last steps, where PyTorch's vectorised sqrt differs from IEEE sqrt by one
ulp of a number near zero: there we allow 1e-4.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax import diffusion

T = np.array([0, 1, 17, 250, 500, 749, 998, 999])


def _reference(**config):
  from diffusers import DDPMScheduler
  return DDPMScheduler(**config)


def _data(seed=0):
  rng = np.random.RandomState(seed)
  return rng.randn(len(T), 8, 8, 4).astype(np.float32), rng.randn(len(T), 8, 8, 4).astype(np.float32)


@pytest.mark.parametrize("kind", diffusion.BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_add_noise_and_velocity_match_diffusers(kind, zero_snr):
  import torch
  ref = _reference(beta_schedule=kind, beta_start=0.00085, beta_end=0.012,
                   prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr)
  ours = diffusion.NoiseSchedule.from_config(dict(ref.config))
  assert ours.prediction_type == "v_prediction"
  x0, noise = _data()
  tt = torch.from_numpy(T)
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  expected_xt = ref.add_noise(nchw(x0), nchw(noise), tt).numpy().transpose(0, 2, 3, 1)
  expected_v = ref.get_velocity(nchw(x0), nchw(noise), tt).numpy().transpose(0, 2, 3, 1)
  tol = 1e-4 if zero_snr else 1e-6
  np.testing.assert_allclose(diffusion.add_noise(ours, x0, noise, T), expected_xt, atol=tol, rtol=0)
  np.testing.assert_allclose(diffusion.velocity(ours, x0, noise, T), expected_v, atol=tol, rtol=0)
  np.testing.assert_allclose(diffusion.training_target(ours, x0, noise, T), expected_v, atol=tol, rtol=0)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6, rtol=0)


def test_epsilon_target_is_the_noise_and_predict_x0_inverts():
  for prediction_type in diffusion.PREDICTION_TYPES:
    sched = diffusion.default_schedule(prediction_type)
    x0, noise = _data(1)
    t = T[:-1]  # at t=999 with zero terminal SNR x0 is not recoverable; here SNR is small but positive
    x0, noise = x0[:-1], noise[:-1]
    xt = diffusion.add_noise(sched, x0, noise, t)
    target = diffusion.training_target(sched, x0, noise, t)
    if prediction_type == "epsilon":
      np.testing.assert_array_equal(target, noise)
    np.testing.assert_allclose(diffusion.predict_x0(sched, xt, target, t), x0, atol=2e-3)


def test_default_schedule_is_sd():
  ref = _reference(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  np.testing.assert_allclose(diffusion.default_schedule().alphas_cumprod, ref.alphas_cumprod.numpy(),
                             atol=1e-7)


def test_load_from_sd_scheduler_folder(tmp_path):
  """A Stable Diffusion pipeline's scheduler folder (PNDM keys included) gives the training schedule."""
  config = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon"}
  (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
  sched = diffusion.load_schedule(str(tmp_path))
  np.testing.assert_allclose(sched.alphas_cumprod, diffusion.default_schedule().alphas_cumprod)
  assert sched.sampler_config["steps_offset"] == 1 and "beta_end" not in sched.sampler_config
  again = diffusion.NoiseSchedule.from_config(sched.to_config())
  np.testing.assert_array_equal(again.betas, sched.betas)


@pytest.mark.parametrize("class_name", ["DDPMScheduler", "DDIMScheduler"])
def test_save_schedule_is_read_back_exactly_by_us_and_diffusers(tmp_path, class_name):
  import diffusers
  sched = diffusion.NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2",
                                               "prediction_type": "v_prediction", "steps_offset": 1})
  path = diffusion.save_schedule(str(tmp_path / "scheduler"), sched, class_name)
  assert path == str(tmp_path / "scheduler" / "scheduler_config.json")
  ours = diffusion.load_schedule(str(tmp_path / "scheduler"))
  np.testing.assert_array_equal(ours.alphas_cumprod, sched.alphas_cumprod)
  assert ours.prediction_type == "v_prediction" and ours.sampler_config["steps_offset"] == 1
  theirs = getattr(diffusers, class_name).from_pretrained(str(tmp_path / "scheduler"))
  assert theirs.config.prediction_type == "v_prediction"
  np.testing.assert_array_equal(theirs.alphas_cumprod.numpy(), sched.alphas_cumprod)


def test_bad_schedule_configs_name_the_key(tmp_path):
  with pytest.raises(ValueError, match="beta_schedule.*sigmoid"):
    diffusion.NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
  with pytest.raises(ValueError, match="prediction_type.*sample"):
    diffusion.NoiseSchedule.from_config({"prediction_type": "sample"})
  with pytest.raises(ValueError, match="trained_betas"):
    diffusion.NoiseSchedule.from_config({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3})
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    diffusion.load_schedule(str(tmp_path))


def test_works_under_jit_with_traced_timesteps():
  import jax
  sched = diffusion.default_schedule()
  x0, noise = _data()
  f = jax.jit(lambda x, n, t: diffusion.add_noise(sched, x, n, t))
  np.testing.assert_allclose(f(x0, noise, jnp.asarray(T)), diffusion.add_noise(sched, x0, noise, T),
                             atol=1e-7)


def test_schedules_with_the_same_content_are_equal_and_share_compiled_programs():
  a, b = diffusion.default_schedule(), diffusion.default_schedule()
  assert a is not b and a == b and hash(a) == hash(b)
  assert a != diffusion.default_schedule("v_prediction")
  assert a != diffusion.NoiseSchedule(a.betas * 0.5)
  calls = []

  @functools.partial(jax.jit, static_argnums=0)
  def f(schedule, x):
    calls.append(1)   # runs once per trace
    return x * schedule.alphas_cumprod[0]

  f(a, jnp.ones(2))
  f(b, jnp.ones(2))
  assert len(calls) == 1
