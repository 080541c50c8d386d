"""The UNet inputs of the DPO family's step: each method's noising, timesteps and prompts (``train.dpo_steps``).

    noise = draw_noise(schedule, c, rng, pairs, latent_shape, dropout)   # t, eps, prompt dropout of B pairs
    inputs = dpo_inputs(schedule, c, batch, frozen, rng, dropout, noise)  # Diffusion-DPO, SC-DPO: [w; l]
    inputs = duo_inputs(schedule, c, batch, frozen, rng, dropout, noise)  # DUO: [x+_t; x-_t; eps]

``c`` is a resolved objective config (``dpo_steps.resolve_config``). What each method draws and why is in
``train.dpo_steps``'s docstring (METHODS.md); the draws are made for the whole batch at once, so gradient
accumulation (``train.grad_accum``) splits them and gives every pair the same ``t`` and noise for any ``k``.
Missing or misshapen batch fields fail naming the field and the keys the batch has.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from sc_dpo_jax import diffusion
from sc_dpo_jax.train import state as state_lib


def timestep_range(schedule, c) -> Tuple[int, int]:
  """``[min_timestep, max_timestep)`` of a resolved config, checked against the schedule."""
  n = schedule.num_train_timesteps
  lo, hi = int(c.min_timestep), n if c.max_timestep is None else int(c.max_timestep)
  if hi > n:
    raise ValueError(f"config.max_timestep = {hi} exceeds the schedule's {n} training timesteps")
  if not 0 <= lo < hi:
    raise ValueError(f"config.min_timestep ({lo}) and max_timestep ({hi}, exclusive) must satisfy 0 <= min < max")
  return lo, hi


DUO_PROMPTS = ("empty", "given", "unsafe")   # config.objective.duo_prompts: see duo_inputs


def check_duo_prompts(value) -> str:
  """``config.objective.duo_prompts``, checked: one of :data:`DUO_PROMPTS`."""
  if not isinstance(value, str) or value not in DUO_PROMPTS:
    raise ValueError(f"config.objective.duo_prompts = {value!r}; choose one of {DUO_PROMPTS} (the images' "
                     f"prompts in DUO: 'empty' both, the official default; 'given' each its own, x+ prompt_chosen "
                     f"and x- prompt, the official --given_prompt; 'unsafe' both the pair's prompt)")
  return value


def require(mapping: Mapping, key: str, what: str, method: str) -> Any:
  if key not in mapping:
    raise KeyError(f"{method}: batch[{key!r}] is missing ({what}); the batch has keys {sorted(mapping)}")
  return mapping[key]


def _pair_latents(batch: Mapping, method: str) -> Tuple[jax.Array, jax.Array]:
  chosen = require(batch, "latents_chosen", "chosen latents [B, h, w, c]", method)
  rejected = require(batch, "latents_rejected", "rejected latents [B, h, w, c]", method)
  if chosen.ndim != 4 or chosen.shape != rejected.shape:
    raise ValueError(f"{method}: batch['latents_chosen'] {chosen.shape} and batch['latents_rejected'] "
                     f"{rejected.shape} must both be NHWC [B, h, w, c] of one shape")
  return chosen.astype(jnp.float32), rejected.astype(jnp.float32)


def _empty_text(frozen: Mapping, batch_size: int, purpose: str) -> jax.Array:
  empty = state_lib.require(frozen, state_lib.EMPTY_TEXT, f"the [1, L, D] empty-prompt states ({purpose})")
  if empty.ndim != 3 or empty.shape[0] != 1:
    raise ValueError(f"frozen['empty_text'] must be [1, L, D], got {empty.shape}")
  return jnp.broadcast_to(empty, (batch_size,) + empty.shape[1:])


def _prompts(batch: Mapping, frozen: Mapping, drop: jax.Array, dropout: float, method: str,
             key: str = "text_states") -> jax.Array:
  """The batch's text states ``batch[key]`` with the prompt of each pair where ``drop`` ([B] bool, drawn with
  probability ``dropout``) replaced by the empty prompt."""
  text = require(batch, key, "prompt states [B, L, D]", method)
  if text.ndim != 3:
    raise ValueError(f"{method}: batch[{key!r}] must be [B, L, D], got {text.shape}")
  if dropout <= 0:
    return text
  empty = _empty_text(frozen, 1, "prompt dropout")
  if empty.shape[1:] != text.shape[1:]:
    raise ValueError(f"{method}: batch[{key!r}] {text.shape} and frozen['empty_text'] {empty.shape} "
                     f"differ in length or width; prompt dropout needs the same [L, D]")
  empty = jnp.broadcast_to(empty, text.shape).astype(text.dtype)
  return jnp.where(drop[:, None, None], empty, text)


def missing_chosen_prompt(what: str, missing: str = "'text_states_chosen' (the states of the records' "
                          "'prompt_chosen')") -> str:
  """Why DUO's ``duo_prompts = "given"`` cannot run on ``what`` (a batch or dataset without the chosen
  images' own prompts: ``missing``), and what to do."""
  return (f"duo: config.objective.duo_prompts = 'given' conditions the safe image x+ on its own prompt, but "
          f"{what} has no {missing}. The dataset needs the field prompt_chosen (record spec "
          f"has_chosen_prompt): DUO pairs written by `python -m sc_dpo_jax.data.build_duo_pairs` "
          f"(data.curate.build_duo_pairs) have it, and a latent dataset precomputed from such pairs "
          f"(data.precompute) carries its text states; or choose duo_prompts = 'empty' (the official default) "
          f"or 'unsafe'")


class Noise(NamedTuple):
  """The random draws of one update, one row per pair (leading axis ``B``, split with the batch into
  micro-batches, so pair ``i`` gets the same draws whatever the accumulation; :func:`draw_noise`)."""
  t: jax.Array      # [B] (Diffusion-DPO, SC-DPO: shared by w and l) or [B, 2] (DUO: t of x+, t of x-)
  eps: jax.Array    # [B, h, w, c] float32, shared by both images of the pair
  drop: jax.Array   # [B] bool: the pair's prompt replaced by the empty prompt (all False without dropout)


def draw_noise(schedule, c, rng: jax.Array, pairs: int, latent_shape: Tuple[int, ...], dropout: float) -> Noise:
  """The draws of ``pairs`` pairs from ``rng`` (``c`` a resolved config; ``latent_shape`` = ``(h, w, c)``).

  One ``jax.random`` call per quantity over the whole batch, so a batch of ``k * b`` pairs draws exactly what
  one step without accumulation draws, and the step slices it: ``k_t, k_eps, k_drop = split(rng, 3)``;
  ``t = randint(k_t, [B], lo, hi)`` (DUO: ``[2B]``, the first ``B`` for x+, kept as the columns of ``[B, 2]``);
  ``eps = normal(k_eps, [B, h, w, c])``; ``drop = bernoulli(k_drop, dropout, [B])`` (only when ``dropout > 0``).
  """
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  lo, hi = timestep_range(schedule, c)
  if c.method == "duo" and c.duo_prompts == "empty":
    dropout = 0.0   # DUO under the empty prompt has nothing to drop
  if c.method == "duo":
    t = jax.random.randint(k_t, (2 * pairs,), lo, hi)
    t = jnp.stack([t[:pairs], t[pairs:]], axis=1)
  else:
    t = jax.random.randint(k_t, (pairs,), lo, hi)
  eps = jax.random.normal(k_eps, (pairs,) + tuple(latent_shape), jnp.float32)
  drop = (jax.random.bernoulli(k_drop, dropout, (pairs,)) if dropout > 0 else jnp.zeros((pairs,), jnp.bool_))
  return Noise(t, eps, drop)


def _noise(schedule, c, latents: jax.Array, rng, dropout: float, noise: Optional[Noise]) -> Noise:
  if noise is None:
    return draw_noise(schedule, c, rng, latents.shape[0], latents.shape[1:], dropout)
  if noise.eps.shape != latents.shape:
    raise ValueError(f"{c.method}: the noise {noise.eps.shape} does not match the latents {latents.shape}")
  return noise


class Inputs(NamedTuple):
  """One method's UNet batch (``x``, ``t``, ``text``, concatenated) and what the loss needs."""
  x: jax.Array
  t: jax.Array
  text: jax.Array
  target: jax.Array   # training targets of the 2B pair images
  pairs: int          # B


def dpo_inputs(schedule, c, batch, frozen, rng, dropout: float, noise: Optional[Noise] = None) -> Inputs:
  """Diffusion-DPO / SC-DPO: one t and one eps per pair, shared by w and l; UNet batch [w; l].

  ``c`` is a resolved config (``dpo_steps.resolve_config``); ``dropout`` the prompt-dropout probability; ``noise``
  the pairs' draws (None: :func:`draw_noise` from ``rng``).
  """
  chosen, rejected = _pair_latents(batch, c.method)
  b = chosen.shape[0]
  t, eps, drop = _noise(schedule, c, chosen, rng, dropout, noise)
  x0, t2, eps2 = jnp.concatenate([chosen, rejected]), jnp.concatenate([t, t]), jnp.concatenate([eps, eps])
  text = _prompts(batch, frozen, drop, dropout, c.method)
  return Inputs(diffusion.add_noise(schedule, x0, eps2, t2), t2, jnp.concatenate([text, text]),
                 diffusion.training_target(schedule, x0, eps2, t2), b)


def duo_inputs(schedule, c, batch, frozen, rng, dropout: float, noise: Optional[Noise] = None) -> Inputs:
  """DUO: one eps per pair, independent t per image; then the prior inputs (eps at t = T - 1, empty prompt).
  UNet batch [x+_t; x-_t; eps] under the text states (``c.duo_prompts``; a dropped pair's prompts are empty):

  * ``"empty"`` (official default): ``[empty; empty; empty]``;
  * ``"given"`` (official ``--given_prompt``): ``[text_states_chosen; text_states; empty]``, each image under its
    own prompt (x+ the safe ``prompt_chosen``, x- the unsafe ``prompt``);
  * ``"unsafe"``: ``[text_states; text_states; empty]``, both images under the pair's (unsafe) ``prompt``.

  Arguments as :func:`dpo_inputs`."""
  safe, unsafe = _pair_latents(batch, c.method)
  b = safe.shape[0]
  t_pair, eps, drop = _noise(schedule, c, safe, rng, dropout, noise)
  t = jnp.concatenate([t_pair[:, 0], t_pair[:, 1]])
  x0, eps2 = jnp.concatenate([safe, unsafe]), jnp.concatenate([eps, eps])
  empty = _empty_text(frozen, b, "DUO conditions on the empty prompt")
  mode = check_duo_prompts(c.duo_prompts)
  if mode == "empty":
    texts = jnp.concatenate([empty, empty, empty])
  else:
    if mode == "given" and "text_states_chosen" not in batch:
      raise KeyError(missing_chosen_prompt(f"the batch (keys {sorted(batch)})"))
    text = _prompts(batch, frozen, drop, dropout, c.method)
    chosen = _prompts(batch, frozen, drop, dropout, c.method, "text_states_chosen") if mode == "given" else text
    for key, states in (("text_states", text), ("text_states_chosen", chosen)):
      if states.shape[1:] != empty.shape[1:] or states.shape[0] != b:
        raise ValueError(f"duo: batch[{key!r}] {states.shape} must be [{b}, L, D] with the [L, D] "
                         f"{empty.shape[1:]} of frozen['empty_text'] (they go through the UNet as one batch)")
    texts = jnp.concatenate([chosen.astype(text.dtype), text, empty.astype(text.dtype)])
  prior_t = jnp.full((b,), schedule.num_train_timesteps - 1, t.dtype)
  x = jnp.concatenate([diffusion.add_noise(schedule, x0, eps2, t), eps])
  return Inputs(x, jnp.concatenate([t, prior_t]), texts, diffusion.training_target(schedule, x0, eps2, t), b)
