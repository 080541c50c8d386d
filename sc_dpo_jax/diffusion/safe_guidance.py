"""Safe Latent Diffusion (SLD; Schramowski et al., CVPR 2023): training-free safety guidance at sampling time.

Written from the paper's formulas; the semantics (and the reference the tests compare against) are those of
diffusers' ``StableDiffusionPipelineSafe``. At every DDIM step the UNet runs on three contexts, the
unconditional (negative prompt) ``u``, the prompt ``c`` and the safety concept ``s`` (``DEFAULT_SAFETY_CONCEPT``
unless changed), and with ``i`` the index of the step in the sampling loop (0 first)::

    scale_i  = where(c - s >= threshold, 0, min(|c - s| * sld_scale, 1))    elementwise     (eq. 6)
    gamma_i  = scale_i * (s - u) + momentum_scale * m_i                                     (eq. 4, 7)
    m_{i+1}  = mom_beta * m_i + (1 - mom_beta) * gamma_i,  m_0 = 0                          (eq. 8)
    out      = u + g * ((c - u) - [i >= warmup_steps] * gamma_i)                            (eq. 3)

``g`` is the classifier-free guidance scale (which multiplies the safety term too, as in diffusers). The
momentum is built up during the warm-up steps as well, where the safety term is not yet applied. SLD needs
classifier-free guidance (diffusers turns SLD off when ``g <= 1`` or ``sld_scale <= 1``; here both are refused,
so that asking for safety never silently gives none).

``SLDConfig`` holds the settings (``SLDConfig.preset("medium")``, ``resolve("max")``); ``sld_guidance`` is the
per-step rule above (pure, jittable; the step index and the guidance scale may be traced); ``sample_sld`` is the
DDIM loop of ``diffusion.sample`` with SLD in place of plain guidance (one UNet call per step on the batch
``[u; c; s]``). ``models.StableDiffusion.generate(..., safety=...)`` uses it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from sc_dpo_jax.diffusion.ddim import DDIMConfig, ddim_step, ddim_timesteps
from sc_dpo_jax.diffusion.schedules import NoiseSchedule

# diffusers' StableDiffusionPipelineSafe default ``safety_concept`` (the I2P categories).
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty")

# diffusers' ``SafetyConfig.WEAK / MEDIUM / STRONG / MAX`` (the paper's hyper-parameter sets), as
# (guidance_scale, warmup_steps, threshold, momentum_scale, mom_beta).
_PRESET_VALUES = {
    "weak": (20.0, 15, 0.0, 0.0, 0.0),
    "medium": (1000.0, 10, 0.01, 0.3, 0.4),
    "strong": (2000.0, 7, 0.025, 0.5, 0.7),
    "max": (5000.0, 0, 1.0, 0.5, 0.7),
}
PRESET_NAMES = tuple(_PRESET_VALUES)


def real_setting(owner: str, name: str, value) -> float:
  """``value`` as a finite float; errors name ``owner.name`` (the settings classes of ``diffusion``)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{owner}.{name} must be a real number, got {value!r} ({type(value).__name__})")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{owner}.{name} must be finite, got {value}")
  return value


def _real(name: str, value) -> float:
  return real_setting("SLDConfig", name, value)


@dataclasses.dataclass(frozen=True)
class SLDConfig:
  """Safe Latent Diffusion settings (diffusers' ``sld_*`` arguments without the prefix). Hashable: the
  numbers are static in a jitted sampler.

  Attributes:
    guidance_scale: ``sld_guidance_scale``, the gain of ``|c - s|`` before it is clipped to 1; must be > 1.
    warmup_steps: ``sld_warmup_steps``: the safety term is applied from loop step ``warmup_steps`` on
      (0-based; 0 applies it from the first step).
    threshold: ``sld_threshold``: elements with ``c - s >= threshold`` get no safety guidance.
    momentum_scale: ``sld_momentum_scale`` (>= 0; 0 disables the momentum).
    mom_beta: ``sld_mom_beta`` in [0, 1]: how much of the previous momentum is kept.
    concept: the safety concept text (tokenized like a prompt).
  """
  guidance_scale: float = 1000.0
  warmup_steps: int = 10
  threshold: float = 0.01
  momentum_scale: float = 0.3
  mom_beta: float = 0.4
  concept: str = DEFAULT_SAFETY_CONCEPT

  def __post_init__(self):
    values = {name: _real(name, getattr(self, name))
              for name in ("guidance_scale", "threshold", "momentum_scale", "mom_beta")}
    if not values["guidance_scale"] > 1.0:
      raise ValueError(f"SLDConfig.guidance_scale = {values['guidance_scale']} must be > 1 (diffusers turns "
                       "SLD off at <= 1); for no safety guidance pass safety=None")
    if not values["momentum_scale"] >= 0.0:
      raise ValueError(f"SLDConfig.momentum_scale = {values['momentum_scale']} must be >= 0")
    if not 0.0 <= values["mom_beta"] <= 1.0:
      raise ValueError(f"SLDConfig.mom_beta = {values['mom_beta']} must be in [0, 1]")
    warmup = self.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)):
      raise TypeError(f"SLDConfig.warmup_steps must be an int, got {warmup!r} ({type(warmup).__name__})")
    if warmup < 0:
      raise ValueError(f"SLDConfig.warmup_steps = {warmup} must be >= 0")
    if not isinstance(self.concept, str) or not self.concept.strip():
      raise ValueError(f"SLDConfig.concept must be a non-empty string, got {self.concept!r}")
    for name, value in values.items():
      object.__setattr__(self, name, value)
    object.__setattr__(self, "warmup_steps", int(warmup))

  @classmethod
  def preset(cls, name: str, **overrides) -> "SLDConfig":
    """diffusers' ``SafetyConfig`` preset ``name`` (``PRESET_NAMES``: weak, medium, strong, max), with
    ``overrides`` (e.g. ``concept=...``) replacing its fields."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _PRESET_VALUES:
      raise ValueError(f"unknown SLD preset {name!r}; choose one of {PRESET_NAMES}")
    fields = dict(zip(("guidance_scale", "warmup_steps", "threshold", "momentum_scale", "mom_beta"),
                      _PRESET_VALUES[key]))
    fields.update(overrides)
    return cls(**fields)

  def diffusers_kwargs(self) -> dict:
    """The ``sld_*`` keyword arguments of ``StableDiffusionPipelineSafe.__call__`` (its ``safety_concept``
    is set separately, as a pipeline attribute)."""
    return dict(sld_guidance_scale=self.guidance_scale, sld_warmup_steps=self.warmup_steps,
                sld_threshold=self.threshold, sld_momentum_scale=self.momentum_scale,
                sld_mom_beta=self.mom_beta)


PRESETS = {name: SLDConfig.preset(name) for name in PRESET_NAMES}


def resolve(safety: Union[None, str, SLDConfig]) -> Optional[SLDConfig]:
  """``None`` (no safety guidance), a preset name (``PRESET_NAMES``) or an ``SLDConfig`` -> the settings."""
  if safety is None or isinstance(safety, SLDConfig):
    return safety
  if isinstance(safety, str):
    return SLDConfig.preset(safety)
  raise TypeError(f"safety must be None, a preset name {PRESET_NAMES} or an SLDConfig, got "
                  f"{type(safety).__name__}")


def init_momentum(like: jax.Array) -> jax.Array:
  """The momentum before the first step: zeros shaped like the noise predictions, float32."""
  return jnp.zeros(jnp.shape(like), jnp.float32)


def sld_guidance(uncond: jax.Array, text: jax.Array, concept: jax.Array, step, momentum: jax.Array, *,
                 guidance_scale, sld: SLDConfig) -> Tuple[jax.Array, jax.Array]:
  """One step of SLD (module docstring): ``(guided output, new momentum)``, both float32.

  Args:
    uncond, text, concept: the model outputs under the unconditional, prompt and safety-concept contexts
      (same shape).
    step: the 0-based index of the step in the sampling loop (an int or a traced int scalar).
    momentum: the momentum state (``init_momentum`` before the first step).
    guidance_scale: the classifier-free guidance scale ``g`` (a number or a traced scalar).
    sld: the settings (static).
  """
  u = jnp.asarray(uncond, jnp.float32)
  c = jnp.asarray(text, jnp.float32)
  s = jnp.asarray(concept, jnp.float32)
  momentum = jnp.asarray(momentum, jnp.float32)
  text_minus_concept = c - s
  scale = jnp.minimum(jnp.abs(text_minus_concept) * sld.guidance_scale, 1.0)
  scale = jnp.where(text_minus_concept >= sld.threshold, 0.0, scale)
  safety = (s - u) * scale + sld.momentum_scale * momentum
  new_momentum = sld.mom_beta * momentum + (1.0 - sld.mom_beta) * safety
  guidance = c - u
  guidance = jnp.where(jnp.asarray(step) >= sld.warmup_steps, guidance - safety, guidance)
  return u + jnp.asarray(guidance_scale, jnp.float32) * guidance, new_momentum


def sample_sld(denoise: Callable[[Any, jax.Array, jax.Array, Any], jax.Array], params, latents: jax.Array,
               context, *, uncond_context, safety_context, sld: SLDConfig, schedule: NoiseSchedule,
               num_steps: int, guidance_scale, eta: float = 0.0, rng: Optional[jax.Array] = None,
               config: Optional[DDIMConfig] = None) -> jax.Array:
  """DDIM sampling from ``latents`` with SLD: ``diffusion.sample`` (same timesteps, step rule and, for
  ``eta > 0``, the same step noise from ``rng``) with ``sld_guidance`` in place of plain guidance.

  Each step runs ``denoise`` once on the batch ``[uncond; cond; safety]`` (``3B``). ``uncond_context`` and
  ``safety_context`` have the structure of ``context`` and a leading dimension ``B`` or 1 (broadcast).
  ``guidance_scale`` may be a Python number (must be > 1) or a traced scalar (then not checked). ``sld``,
  ``schedule``, ``num_steps``, ``eta`` and ``config`` are static. Returns the final latents, float32.
  """
  if not isinstance(sld, SLDConfig):
    raise TypeError(f"sld must be an SLDConfig, got {type(sld).__name__}")
  if isinstance(guidance_scale, numbers.Real) and not guidance_scale > 1.0:
    raise ValueError(f"SLD works on classifier-free guidance: guidance_scale = {guidance_scale} must be > 1")
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not eta >= 0:
    raise ValueError(f"eta = {eta!r} must be a number >= 0")
  eta = float(eta)
  if eta > 0 and rng is None:
    raise ValueError(f"eta = {eta} > 0 draws noise at every step: pass rng")
  config = DDIMConfig.from_schedule(schedule) if config is None else config
  timesteps = ddim_timesteps(schedule, num_steps)
  prev_timesteps = (timesteps - schedule.num_train_timesteps // int(num_steps)).astype(np.int32)
  n = len(timesteps)
  x = jnp.asarray(latents, jnp.float32)
  b = x.shape[0]
  keys = jax.random.split(rng, n) if eta > 0 else None

  def batch_of_three(u, c, s):
    for name, a in (("uncond_context", u), ("safety_context", s)):
      if a.shape[0] not in (1, b):
        raise ValueError(f"{name} has batch {a.shape[0]}; it must be 1 or the latents' batch {b}")
    if c.shape[0] != b:
      raise ValueError(f"context has batch {c.shape[0]} but the latents have {b}")
    expand = lambda a: jnp.broadcast_to(a, (b,) + a.shape[1:]).astype(c.dtype)
    return jnp.concatenate([expand(u), c, expand(s)], axis=0)

  contexts = jax.tree_util.tree_map(batch_of_three, uncond_context, context, safety_context)

  def body(carry, inputs):
    x, momentum = carry
    i, t, prev, key = inputs
    out = denoise(params, jnp.concatenate([x, x, x], axis=0), jnp.full((3 * b,), t, jnp.int32), contexts)
    out = jnp.asarray(out, jnp.float32)
    guided, momentum = sld_guidance(out[:b], out[b:2 * b], out[2 * b:], i, momentum,
                                    guidance_scale=guidance_scale, sld=sld)
    noise = None if key is None else jax.random.normal(key, x.shape, jnp.float32)
    step = ddim_step(schedule, guided, t, prev, x, eta=eta, noise=noise, config=config)
    return (step.prev_sample, momentum), None

  (final, _), _ = jax.lax.scan(body, (x, init_momentum(x)),
                               (jnp.arange(n, dtype=jnp.int32), jnp.asarray(timesteps),
                                jnp.asarray(prev_timesteps), keys))
  return final
