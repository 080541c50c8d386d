"""DDPO-style RL (ShieldDiff's setting): sample with trajectories, score, normalise per prompt, clipped update.

One iteration (``train.rl_loop`` runs them) follows DDPO's official code (kvablack/ddpo-pytorch):

1. **Sample** (``make_ddpo_sampler``): the current policy draws images with DDIM (``eta`` > 0 so every
   transition has a density, classifier-free guidance), keeping every latent and each transition's
   log-probability (``diffusion.sample(..., return_trajectory=True)``); the VAE decodes to uint8. Optionally
   some samples are drawn under another text (rewrite exploration, ours; the log-probabilities stay the
   policy's, see ``make_ddpo_sampler``).
2. **Reward** (host side): ``reward(images_uint8, prompts) -> (rewards, info)`` (``sc_dpo_jax.rewards``).
3. **Advantages**: ``train.advantages.PerPromptAdvantages`` (per-prompt buffers of the last 16 rewards).
4. **Update** (``make_ddpo_update``): for each sample, a random permutation of its transitions; the first
   ``ceil(timestep_fraction * S)`` are trained. At each trained transition the log-probability of the stored
   ``x_{t-1}`` is recomputed under the current parameters (the guided model output, ``ddim_step``'s Gaussian,
   ``ddim_log_prob``) and ``losses.ddpo.ppo_clip_loss`` compares it with the sampling-time one. Gradients are
   averaged over the trained transitions (the official code accumulates them) and applied in ONE optimiser
   update; the scan over transitions keeps one transition's activations in memory at a time.
   With ``kl_weight`` > 0 each transition's loss adds the KL to the reference model's step (DPOK).

The sampler and the update are pure functions; their caller jits each once (``train.rl_loop``: with explicit
shardings, the update's state donated, the update inside the NaN guard). The policy is
``state.params`` (full UNet) or the base UNet with LoRA adapters (``train.state.policy_params``); frozen
parameters come in ``frozen`` (keys ``"unet"``/``"ref_unet"`` as ``train.state``, plus ``"vae"`` for decoding).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sc_dpo_jax import diffusion
from sc_dpo_jax.losses.ddpo import ppo_clip_loss
from sc_dpo_jax.models.vae import decode_latents
from sc_dpo_jax.train.state import TrainState, policy_params, reference_params, require

VAE = "vae"


class DDPOConfig(NamedTuple):
  """The RL knobs (METHODS.md defaults: 50 DDIM steps, eta 1, guidance 5, clip 1e-4, advantages ±5)."""
  num_steps: int = 50
  eta: float = 1.0
  guidance_scale: float = 5.0
  clip_range: float = 1e-4
  adv_clip: float = 5.0
  timestep_fraction: float = 1.0
  kl_weight: float = 0.0       # DPOK's KL to the reference (0: DDPO's loss alone)


class Samples(NamedTuple):
  """One sampled batch, as the update consumes it."""
  latents: jax.Array          # [S + 1, B, h, w, c]
  timesteps: jax.Array        # [S]
  prev_timesteps: jax.Array   # [S]
  log_probs: jax.Array        # [S, B]
  images: jax.Array           # [B, H, W, 3] uint8


def _denoiser(unet):
  def denoise(params, x, t, context):
    return unet.apply({"params": params}, x, t, context)
  return denoise


def _transition(guided, schedule, ddim_config, eta, params, x, t, prev, text, uncond):
  """The guided model's DDIM Gaussian ``p(x_{t-1} | x)`` at ``params`` (``mean``, ``std``), for each sample."""
  out = guided(params, x, t, text, uncond_context=uncond)
  return diffusion.ddim_step(schedule, out, t, prev, x, eta=eta, config=ddim_config)


def _transition_log_prob(guided, schedule, ddim_config, eta, params, x, x_next, t, prev, text, uncond):
  """``log p(x_next | x)`` under the guided policy at ``params``, for one transition of each sample ``[B]``."""
  step = _transition(guided, schedule, ddim_config, eta, params, x, t, prev, text, uncond)
  return diffusion.ddim_log_prob(x_next, step.mean, step.std)


def gaussian_kl(mean_p, mean_q, std) -> jax.Array:
  """``KL(N(mean_p, std^2) || N(mean_q, std^2))`` per sample ``[B]``, averaged over the latent's elements as
  ``diffusion.ddim_log_prob`` averages its log-density (so the two are in the same units): the mean of
  ``(mean_p - mean_q)^2 / (2 std^2)``. The two DDIM steps of one transition share their ``std`` (scalar, ``[B]``
  or broadcastable to the sample)."""
  std = jnp.asarray(std, jnp.float32)
  if std.ndim == 1 and mean_p.ndim > 1:
    std = std.reshape(std.shape + (1,) * (mean_p.ndim - 1))
  kl = jnp.square((mean_p - mean_q).astype(jnp.float32)) / (2 * jnp.square(std))
  return jnp.mean(kl, axis=tuple(range(1, mean_p.ndim)))


def make_ddpo_sampler(unet, vae, schedule, config: DDPOConfig) -> Callable[..., Samples]:
  """The pure ``sampler(state, frozen, latents, text, uncond_text, rng, behaviour_text=None) -> Samples``.

  Without ``behaviour_text`` the current policy draws the samples and the log-probabilities are the
  sampling-time ones (DDPO). With it (rewrite exploration, this project's formulation: ``rl.rewrite_samples``),
  the trajectories are drawn under ``behaviour_text`` (e.g. each harmful prompt's safe rewrite, per sample)
  and ``log_probs`` are the POLICY's, under ``text``: a second pass over the stored transitions recomputes
  them, so the first update's importance ratio is 1 for every sample as in plain DDPO, and a sample with a
  positive advantage pulls the policy at ``text`` toward the trajectory drawn under the rewrite.
  """
  if not config.eta > 0:
    raise ValueError(f"DDPO needs eta > 0 (a deterministic DDIM step has no log-probability), got {config.eta}")
  denoise = _denoiser(unet)
  ddim_config = diffusion.DDIMConfig.from_schedule(schedule)
  guided = functools.partial(diffusion.guided_output, denoise, guidance_scale=config.guidance_scale)

  def sampler(state: TrainState, frozen: Mapping, latents, text, uncond_text, rng,
              behaviour_text=None) -> Samples:
    params = policy_params(state.params, frozen)
    uncond = uncond_text if config.guidance_scale > 1 else None
    traj = diffusion.sample(denoise, params, latents, text if behaviour_text is None else behaviour_text,
                            schedule=schedule, num_steps=config.num_steps, eta=config.eta,
                            guidance_scale=config.guidance_scale, uncond_context=uncond, rng=rng,
                            return_trajectory=True)
    log_probs = traj.log_probs
    if behaviour_text is not None:
      def policy_log_prob(_, j):
        return None, _transition_log_prob(guided, schedule, ddim_config, config.eta, params, traj.latents[j],
                                          traj.latents[j + 1], traj.timesteps[j], traj.prev_timesteps[j], text,
                                          uncond)
      _, log_probs = jax.lax.scan(policy_log_prob, None, jnp.arange(traj.timesteps.shape[0]))
    images = decode_latents(vae, require(frozen, VAE, "the VAE parameters (to decode samples)"), traj.final)
    images = jnp.round(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)
    return Samples(traj.latents, traj.timesteps, traj.prev_timesteps, log_probs, images)

  return sampler


def make_ddpo_update(unet, schedule, config: DDPOConfig):
  """The pure ``update(state, frozen, batch, rng) -> (state, metrics)`` (one optimiser update).

  ``batch``: ``latents [S+1, B, ...]``, ``timesteps [S]``, ``prev_timesteps [S]``, ``log_probs [S, B]``
  (from the sampler), ``advantages [B]``, ``text [B, L, D]``, ``uncond_text [1 or B, L, D]``.

  With ``config.kl_weight`` > 0 (DPOK, Fan et al. 2023) each trained transition adds ``kl_weight`` times the KL
  from the policy's DDIM Gaussian at the stored ``x_t`` to the reference model's (``train.state.reference_params``:
  the base under LoRA, ``frozen["ref_unet"]`` for full fine-tuning), averaged over the samples: the per-step
  terms of DPOK's upper bound on the KL between the two models' trajectory distributions. It pulls back every
  change the advantages do not ask for (e.g. on safe prompts, whose samples all score alike). Metric
  ``kl_reference``: that KL, averaged over the trained transitions.
  """
  if not 0 < config.timestep_fraction <= 1:
    raise ValueError(f"timestep_fraction must be in (0, 1], got {config.timestep_fraction}")
  if not config.kl_weight >= 0:
    raise ValueError(f"kl_weight must be >= 0, got {config.kl_weight}")
  denoise = _denoiser(unet)
  ddim_config = diffusion.DDIMConfig.from_schedule(schedule)
  guided = functools.partial(diffusion.guided_output, denoise, guidance_scale=config.guidance_scale)

  def update(state: TrainState, frozen: Mapping, batch: Mapping[str, jax.Array], rng):
    latents, log_probs = batch["latents"], batch["log_probs"]
    num_steps, b = log_probs.shape
    trained = max(1, math.ceil(config.timestep_fraction * num_steps))
    # Each sample trains on its own random subset of transitions, as the official code permutes per sample.
    order = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(jax.random.split(rng, b))[:, :trained]
    rows = jnp.arange(b)
    uncond = batch["uncond_text"] if config.guidance_scale > 1 else None

    def transition_loss(trainable, j):
      idx = order[:, j]
      x, x_next = latents[idx, rows], latents[idx + 1, rows]
      t, prev = batch["timesteps"][idx], batch["prev_timesteps"][idx]
      step = _transition(guided, schedule, ddim_config, config.eta, policy_params(trainable, frozen), x, t, prev,
                         batch["text"], uncond)
      logp = diffusion.ddim_log_prob(x_next, step.mean, step.std)
      loss, metrics = ppo_clip_loss(logp, log_probs[idx, rows], batch["advantages"], clip_range=config.clip_range,
                                    adv_clip=config.adv_clip)
      if config.kl_weight > 0:
        ref = _transition(guided, schedule, ddim_config, config.eta,
                          jax.lax.stop_gradient(reference_params(trainable, frozen)), x, t, prev, batch["text"],
                          uncond)
        kl = jnp.mean(gaussian_kl(step.mean, ref.mean, step.std))
        loss = loss + config.kl_weight * kl
        metrics = dict(metrics, loss=loss, ppo_loss=metrics["loss"], kl_reference=kl)
      return loss, metrics

    grad_fn = jax.value_and_grad(transition_loss, has_aux=True)

    def body(carry, j):
      grads_sum = carry
      (_, metrics), grads = grad_fn(state.params, j)
      return jax.tree.map(jnp.add, grads_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads_sum, metrics = jax.lax.scan(body, zeros, jnp.arange(trained))
    grads = jax.tree.map(lambda g: g / trained, grads_sum)
    metrics = {k: jnp.mean(v) for k, v in metrics.items()}
    metrics["grad_norm"] = optax.global_norm(grads).astype(jnp.float32)
    metrics["learning_rate"] = state.learning_rate()
    return state.apply_gradients(grads), metrics

  return update
