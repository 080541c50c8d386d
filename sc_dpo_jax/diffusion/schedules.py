"""DDPM noise schedules read from diffusers scheduler configs, and the forward (noising) process.

``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``; the training target is ``eps`` (epsilon
prediction) or ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0`` (v-prediction), as the model's
scheduler config says. The betas are computed as diffusers computes them (float32, same formulas), so
``add_noise`` and the targets agree with ``diffusers.DDPMScheduler`` to float32 rounding.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# The keys that define the training schedule; every other key of a scheduler config (timestep spacing,
# clipping, PNDM/DDIM options, ...) concerns sampling and is kept in ``NoiseSchedule.sampler_config``.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """A DDPM training schedule: ``betas[t]`` for ``t`` in ``[0, num_train_timesteps)``.

  Equal (and hashing alike) when betas, prediction type and sampler config are, so the jitted programs keyed on
  a schedule (e.g. a pipeline's sampler) are shared by two checkpoints loaded separately.
  """
  betas: np.ndarray
  prediction_type: str = "epsilon"
  sampler_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; "
                       f"choose one of {PREDICTION_TYPES}")
    betas = np.asarray(self.betas, np.float32)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError("betas must be a 1-D array of values in (0, 1]")
    object.__setattr__(self, "betas", betas)
    object.__setattr__(self, "alphas_cumprod", _cumprod(1.0 - betas))
    object.__setattr__(self, "_key", (betas.tobytes(), self.prediction_type,
                                      json.dumps(dict(self.sampler_config), sort_keys=True, default=str)))

  def __eq__(self, other):
    return isinstance(other, NoiseSchedule) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  @property
  def num_train_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @classmethod
  def from_config(cls, config: Mapping[str, Any], source: str = "scheduler config") -> "NoiseSchedule":
    """Builds the schedule from a diffusers scheduler config dict (any scheduler class)."""
    c = {k: config[k] for k in _SCHEDULE_KEYS if k in config}
    n = int(c.get("num_train_timesteps", 1000))
    if c.get("trained_betas") is not None:
      betas = np.asarray(c["trained_betas"], np.float32)
      if betas.shape != (n,):
        raise ValueError(f"{source}: 'trained_betas' has {betas.shape[0]} values but "
                         f"'num_train_timesteps' is {n}")
    else:
      kind = c.get("beta_schedule", "linear")
      if kind not in BETA_SCHEDULES:
        raise ValueError(f"{source}: 'beta_schedule' = {kind!r} is not supported; "
                         f"choose one of {BETA_SCHEDULES}")
      betas = make_betas(kind, n, float(c.get("beta_start", 1e-4)), float(c.get("beta_end", 0.02)))
    if c.get("rescale_betas_zero_snr", False):
      betas = rescale_zero_terminal_snr(betas)
    prediction_type = c.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"{source}: 'prediction_type' = {prediction_type!r} is not supported; "
                       f"choose one of {PREDICTION_TYPES}")
    sampler = {k: v for k, v in config.items() if k not in _SCHEDULE_KEYS}
    return cls(betas, prediction_type, sampler)

  def to_config(self) -> Dict[str, Any]:
    """A scheduler config that rebuilds this schedule exactly (betas written out as trained_betas)."""
    config = dict(self.sampler_config)
    config.update(num_train_timesteps=self.num_train_timesteps, trained_betas=self.betas.tolist(),
                  prediction_type=self.prediction_type)
    return config


def make_betas(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """The betas of diffusers' ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` schedules, float32."""
  n = num_train_timesteps
  if kind == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float32)
  if kind == "scaled_linear":  # the SD1.x/2.x schedule
    return np.square(np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float32))
  if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, betas capped at 0.999
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                    dtype=np.float32)
  raise ValueError(f"unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023: shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (as diffusers)."""
  sqrt_ab = np.sqrt(_cumprod(1.0 - betas))
  first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alpha_bar = np.square(sqrt_ab)
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
  # PyTorch's CPU cumprod of float32 accumulates in float64 and rounds each partial product once.
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def load_schedule(path: str) -> NoiseSchedule:
  """Reads a diffusers ``scheduler_config.json`` (or the ``scheduler`` folder holding it)."""
  if os.path.isdir(path):
    path = os.path.join(path, "scheduler_config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  return NoiseSchedule.from_config(config, source=path)


def save_schedule(path: str, schedule: NoiseSchedule, class_name: Optional[str] = None) -> str:
  """Writes a ``scheduler_config.json`` (into folder ``path`` unless it ends in ``.json``) that
  ``load_schedule`` and ``diffusers.<class_name>.from_pretrained`` both read back exactly; returns its path.

  ``class_name`` defaults to the one the schedule was read with, else ``DDPMScheduler``.
  """
  if not path.endswith(".json"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, "scheduler_config.json")
  config = schedule.to_config()
  config["_class_name"] = class_name or config.get("_class_name", "DDPMScheduler")
  with open(path, "w") as f:
    json.dump(config, f, indent=2)
  return path


def _coefficients(schedule: NoiseSchedule, timesteps, ndim: int):
  alpha_bar = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(timesteps)]
  shape = alpha_bar.shape + (1,) * (ndim - alpha_bar.ndim)
  return jnp.sqrt(alpha_bar).reshape(shape), jnp.sqrt(1.0 - alpha_bar).reshape(shape)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
  """``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``; ``timesteps`` is ``[B]`` (or scalar)."""
  a, s = _coefficients(schedule, timesteps, x0.ndim)
  return (a * x0 + s * noise).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
  """The v-prediction target ``sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0``."""
  a, s = _coefficients(schedule, timesteps, x0.ndim)
  return (a * noise - s * x0).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
  """What the model is trained to predict: ``noise`` or the velocity, by ``schedule.prediction_type``."""
  if schedule.prediction_type == "epsilon":
    return noise
  return velocity(schedule, x0, noise, timesteps)


def predict_x0(schedule: NoiseSchedule, x_t: jax.Array, model_output: jax.Array, timesteps,
               ) -> jax.Array:
  """The clean sample implied by a model output at ``x_t`` (inverts the forward process)."""
  a, s = _coefficients(schedule, timesteps, x_t.ndim)
  if schedule.prediction_type == "epsilon":
    return (x_t - s * model_output) / a
  return a * x_t - s * model_output


def default_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
  """Stable Diffusion 1.x/2.x training schedule: 1000 steps, scaled_linear betas 0.00085 -> 0.012."""
  return NoiseSchedule(make_betas("scaled_linear", 1000, 0.00085, 0.012), prediction_type)

