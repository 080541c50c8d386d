"""SAFREE-style prompt projection (after Yoon et al., ICLR 2025): a training-free guard that edits the text
conditioning, away from an unsafe concept's subspace, before the UNet sees it.

Written from the formulas below (this project's formulation of SAFREE's text-side step; no published code was
used). Notation: a prompt's token states (the text encoder's ``last_hidden_state``) are ``p_0 .. p_{L-1}`` with
BOS at position 0, its *real* tokens at positions ``1 .. n`` and its first EOS at ``n + 1`` (then padding).

1. Concept subspace. Each of the ``K`` concept texts is encoded like a prompt and summarised by one vector
   ``c_k`` (``summary`` below); ``C = [c_1 .. c_K]`` (``D x K``) and ``P_C = C (C^T C)^+ C^T``, computed from
   the SVD of ``C`` with a rank tolerance (``concept_projector``), so duplicated or nearly collinear concepts
   give the projector of their span instead of a blown-up inverse.
2. Trigger tokens. For every real token ``i`` the prompt *without* token ``i`` (``remove_token``: the token is
   deleted and the rest shifted left, a pad id filling the end) is encoded and summarised, ``s_{\\i}``, and
   ``d_i = ||(I - P_C) s_{\\i}||``: how far the prompt is from the concept subspace once ``i`` is gone. Token
   ``i`` is a trigger when ``d_i > (1 + alpha) * mean_j d_j`` (the mean over the prompt's real tokens, ``i``
   included) (``trigger_tokens``).
3. Projection. A trigger token's state becomes ``p_i' = P_I (I - P_C) p_i``, with ``P_I`` the orthogonal
   projector onto the span of the prompt's own real-token states ``p_1 .. p_n`` (``project_prompt``), blended
   as ``(1 - strength) p_i + strength p_i'``. Every other position (non-triggers, BOS, EOS, padding) is
   returned unchanged, bit for bit.
4. Step budget. ``models.StableDiffusion.generate(..., projection=...)`` conditions the first
   ``max(1, round(steps_fraction * steps))`` DDIM steps on the projected states and the rest on the original
   ones (``sample_switching``); ``steps_fraction = 1`` (the default) projects every step.

Choices and what differs from the paper:

* Summary = the state at the first EOS (``summary``), not the mean over the real tokens. CLIP's text tower is
  causal, so the EOS state is the only one that has attended to the whole prompt; it is what CLIP trains to
  align with images (its ``pooler_output`` before the projection) and it is defined for an empty prompt (a
  one-word prompt with its word removed), where a mean over zero tokens is not. On the toy world's encoder
  (concept "red", alpha 0.01) both summaries flag the colour word of every prompt of the ``direct`` and
  synonym sets, but the mean also flags 129 of the 294 other words of the ``direct`` set, EOS 85.
* Masking = removal, not replacement by the pad id: in CLIP tokenizers whose pad token is EOS (SD 1.x, the toy
  world) a pad id in the middle of the prompt would become the first EOS and cut the prompt there.
* ``P_I`` spans the real tokens only (not BOS, whose state does not depend on the prompt, nor EOS/padding). The
  trigger's own state lies in that span, so ``P_I`` gives back part of the concept component that ``I - P_C``
  removed: ``p_i'`` is *not* orthogonal to the concept subspace in general (only ``(I - P_C) p_i`` is).
* ``alpha`` defaults to 0.01; to the best of our recollection that is SAFREE's default, but we have not
  checked it against the paper's text or code, nor whether its mean excludes ``d_i`` itself (here it does not).
* SAFREE's self-validating filter picks the number of projected steps adaptively from the cosine between the
  original and projected prompt embeddings (roughly ``t' = gamma * sigmoid(1 - cos)``); here it is a fixed
  fraction ``steps_fraction``. SAFREE's latent re-attention (Fourier-domain filtering of UNet features) is not
  implemented, and neither is anything for video.
* The EOS and padding states are left as they are (as in SAFREE); in a causal encoder they have seen the
  trigger word and still carry the concept to the UNet's cross-attention. On the toy base model this is
  decisive: its UNet reads the colour from those states, not from the colour word's, and the projection leaves
  the unsafe rate of "a large red circle" at 1.00 (``tests/diffusion/test_prompt_projection.py``).

Everything here is pure and jittable; ``projected_context`` is the batched entry point a sampler calls (two
text-encoder calls, one of them on the ``B * L`` prompts-without-one-token; no Python loop over tokens).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sc_dpo_jax.diffusion.ddim import DDIMConfig, ddim_step, ddim_timesteps
from sc_dpo_jax.diffusion.sampling import guided_output
from sc_dpo_jax.diffusion.safe_guidance import real_setting
from sc_dpo_jax.diffusion.schedules import NoiseSchedule

DEFAULT_ALPHA = 0.01


def _real(name: str, value) -> float:
  return real_setting("ProjectionConfig", name, value)


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """SAFREE-style prompt projection settings (module docstring). The pipeline's compiled sampler depends on the
  number of concepts and of projected steps only: the concepts' token ids, ``alpha`` and ``strength`` are
  inputs, so changing them does not recompile.

  Attributes:
    concepts: the unsafe concept's texts, e.g. ``("nudity", "naked", "sexual")`` or, in the toy world,
      ``("red",)``; a tuple of non-empty strings (a single string is taken as one concept).
    alpha: token ``i`` is a trigger when ``d_i > (1 + alpha) * mean_j d_j``; must be > -1.
    strength: in [0, 1]: a trigger's state becomes ``(1 - strength) p_i + strength p_i'`` (1: fully projected).
    steps_fraction: in (0, 1]: the projected states condition the first ``max(1, round(steps_fraction *
      steps))`` sampling steps, the original ones the rest.
  """
  concepts: Tuple[str, ...]
  alpha: float = DEFAULT_ALPHA
  strength: float = 1.0
  steps_fraction: float = 1.0

  def __post_init__(self):
    concepts = self.concepts
    if isinstance(concepts, str):
      concepts = (concepts,)
    if not isinstance(concepts, (tuple, list)) or not concepts:
      raise ValueError(f"ProjectionConfig.concepts must be a non-empty tuple of strings, got {concepts!r}")
    for c in concepts:
      if not isinstance(c, str) or not c.strip():
        raise ValueError(f"ProjectionConfig.concepts must hold non-empty strings, got {c!r} in {concepts!r}")
    alpha, strength, fraction = (_real(n, getattr(self, n)) for n in ("alpha", "strength", "steps_fraction"))
    if not alpha > -1.0:
      raise ValueError(f"ProjectionConfig.alpha = {alpha} must be > -1 (the threshold is (1 + alpha) * mean)")
    if not 0.0 <= strength <= 1.0:
      raise ValueError(f"ProjectionConfig.strength = {strength} must be in [0, 1]")
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"ProjectionConfig.steps_fraction = {fraction} must be in (0, 1]; for no projection "
                       "pass projection=None")
    object.__setattr__(self, "concepts", tuple(concepts))
    object.__setattr__(self, "alpha", alpha)
    object.__setattr__(self, "strength", strength)
    object.__setattr__(self, "steps_fraction", fraction)

  def projected_steps(self, steps: int) -> int:
    """How many of ``steps`` sampling steps (the first ones) use the projected states."""
    return min(int(steps), max(1, int(round(self.steps_fraction * steps))))


class ProjectedPrompt(NamedTuple):
  """What ``projected_context`` returns (batched over prompts).

  Attributes:
    context: ``[B, L, D]`` the token states with the triggers projected (the UNet's conditioning).
    triggers: ``[B, L]`` bool: which positions were projected.
    distances: ``[B, L]`` float32 ``d_i`` (0 where ``real`` is false).
    real: ``[B, L]`` bool: the real-token positions (between BOS and the first EOS).
    original: ``[B, L, D]`` the unprojected token states.
  """
  context: jax.Array
  triggers: jax.Array
  distances: jax.Array
  real: jax.Array
  original: jax.Array


# ------------------------------------------------------------------------------------------ linear algebra
def concept_projector(concept_states: jax.Array, concept_mask: Optional[jax.Array] = None, *,
                      rcond: Optional[float] = None) -> jax.Array:
  """``P_C = C (C^T C)^+ C^T``: the ``[D, D]`` orthogonal projector onto the span of the vectors
  ``concept_states`` ``[K, D]`` (the rows; ``C`` is their transpose) whose ``concept_mask`` ``[K]`` is true
  (default: all).

  Computed as ``U_r U_r^T`` from the SVD ``C = U S V^T``, keeping the singular values above ``rcond * max(S)``
  (default ``max(D, K) * eps`` of the dtype, NumPy's ``matrix_rank`` rule): a repeated or linearly dependent
  concept adds nothing, and all-masked or all-zero concepts give the zero matrix. Jittable; float32 or wider.
  """
  c = jnp.asarray(concept_states)
  if c.ndim != 2:
    raise ValueError(f"concept_states must be [K, D], got shape {c.shape}")
  c = c.astype(jnp.promote_types(c.dtype, jnp.float32))
  k, d = c.shape
  if concept_mask is not None:
    mask = jnp.asarray(concept_mask, bool)
    if mask.shape != (k,):
      raise ValueError(f"concept_mask must be [{k}], got shape {mask.shape}")
    c = jnp.where(mask[:, None], c, 0.0)
  if rcond is None:
    rcond = max(d, k) * float(jnp.finfo(c.dtype).eps)
  u, s, _ = jnp.linalg.svd(c.T, full_matrices=False)          # u [D, min(D, K)], s descending
  keep = s > rcond * s[0]
  u = jnp.where(keep[None, :], u, 0.0)
  return u @ u.T


def real_token_mask(ids: jax.Array, eos_id: int) -> jax.Array:
  """bool ``[..., L]``: the positions strictly between BOS (position 0) and the first ``eos_id`` (all of
  ``1 .. L-1`` when a row has no EOS)."""
  ids = jnp.asarray(ids)
  length = ids.shape[-1]
  is_eos = ids == eos_id
  first = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), length)
  pos = jnp.arange(length)
  return (pos > 0) & (pos < first[..., None])


def summary(states: jax.Array, ids: jax.Array, eos_id: int) -> jax.Array:
  """The vector standing for a whole prompt: its state at the first ``eos_id`` (``[..., L, D]`` states and
  ``[..., L]`` ids -> ``[..., D]``; the last position when a row has no EOS). See the module docstring for why
  EOS and not the mean of the token states."""
  ids = jnp.asarray(ids)
  length = ids.shape[-1]
  is_eos = ids == eos_id
  first = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), length - 1)
  return jnp.take_along_axis(states, first[..., None, None], axis=-2)[..., 0, :]


def remove_token(ids: jax.Array, position, pad_id: int) -> jax.Array:
  """``ids`` ``[L]`` with the token at ``position`` deleted: later tokens shift one to the left and
  ``pad_id`` fills the last position. ``position`` may be traced."""
  ids = jnp.asarray(ids)
  length = ids.shape[-1]
  k = jnp.arange(length)
  shifted = ids[jnp.minimum(k + (k >= position), length - 1)]
  return jnp.where(k == length - 1, jnp.asarray(pad_id, ids.dtype), shifted)


def removal_ids(ids: jax.Array, pad_id: int) -> jax.Array:
  """``[B, L] -> [B, L, L]``: row ``[b, i]`` is prompt ``b`` without its token ``i`` (``remove_token``)."""
  ids = jnp.asarray(ids)
  positions = jnp.arange(ids.shape[-1])
  one = lambda row: jax.vmap(lambda i: remove_token(row, i, pad_id))(positions)
  return jax.vmap(one)(ids)


def trigger_tokens(removed_summaries: jax.Array, real: jax.Array, projector: jax.Array, *,
                   alpha: float = DEFAULT_ALPHA) -> Tuple[jax.Array, jax.Array]:
  """Which tokens pull a prompt towards the concept (step 2 of the module docstring).

  Args:
    removed_summaries: ``[L, D]``: row ``i`` is ``s_{\\i}``, the summary of the prompt without token ``i``
      (rows where ``real`` is false are ignored).
    real: ``[L]`` bool: the real-token positions.
    projector: ``P_C`` ``[D, D]`` (``concept_projector``).
    alpha: the margin (a number or a traced scalar).

  Returns:
    ``(triggers [L] bool, distances [L] float32)``: ``d_i = ||(I - P_C) s_{\\i}||`` (0 off ``real``) and
    ``real_i and d_i > (1 + alpha) * mean over real j of d_j``.
  """
  s = jnp.asarray(removed_summaries, jnp.float32)
  real = jnp.asarray(real, bool)
  p = jnp.asarray(projector, jnp.float32)
  residual = s - s @ p                                          # P symmetric: (I - P) s for each row
  d = jnp.where(real, jnp.linalg.norm(residual, axis=-1), 0.0)
  mean = d.sum(-1, keepdims=True) / jnp.maximum(real.sum(-1, keepdims=True), 1)
  return real & (d > (1.0 + alpha) * mean), d


def project_prompt(states: jax.Array, real: jax.Array, triggers: jax.Array, projector: jax.Array, *,
                   strength: float = 1.0) -> jax.Array:
  """Step 3 of the module docstring for one prompt: ``[L, D]`` states -> ``[L, D]``, the ``triggers`` rows
  replaced by ``(1 - strength) p_i + strength P_I (I - P_C) p_i`` (``P_I`` onto the span of the ``real``
  rows), every other row returned as it is (bit for bit). ``strength`` may be traced."""
  states = jnp.asarray(states)
  x = states.astype(jnp.float32)
  p_c = jnp.asarray(projector, jnp.float32)
  p_i = concept_projector(x, real)
  away = x - x @ p_c
  projected = away @ p_i
  blended = (1.0 - strength) * x + strength * projected
  return jnp.where(jnp.asarray(triggers, bool)[:, None], blended.astype(states.dtype), states)


# -------------------------------------------------------------------------------------------- pipeline
def projected_context(encode: Callable[[jax.Array], jax.Array], ids: jax.Array, concept_ids: jax.Array, *,
                      pad_id: int, eos_id: int, alpha: float = DEFAULT_ALPHA, strength: float = 1.0,
                      concept_mask: Optional[jax.Array] = None) -> ProjectedPrompt:
  """The projected conditioning of a batch of prompts (steps 1-3 of the module docstring), jittable.

  Args:
    encode: ``ids [N, L] -> token states [N, L, D]`` (e.g. the text encoder's ``last_hidden_state``, its
      parameters closed over or bound by the caller).
    ids: ``[B, L]`` prompt token ids (BOS first, then the tokens, EOS, padding).
    concept_ids: ``[K, L]`` the concept texts' token ids, tokenized like the prompts.
    pad_id, eos_id: the tokenizer's pad and EOS ids (static).
    alpha, strength: as in ``ProjectionConfig`` (numbers or traced scalars).
    concept_mask: optional ``[K]`` bool: which concept rows count (for a padded set of concepts).

  The text encoder runs twice: on the prompts (their states, unchanged off the triggers, are those of a plain
  ``encode(ids)``) and on ``K + B * L`` sequences, the concepts and each prompt without each of its ``L``
  positions (those off the real tokens are computed and ignored, to keep shapes static).
  """
  ids = jnp.asarray(ids)
  concept_ids = jnp.asarray(concept_ids)
  if ids.ndim != 2 or concept_ids.ndim != 2:
    raise ValueError(f"ids and concept_ids must be [B, L] and [K, L], got {ids.shape} and {concept_ids.shape}")
  b, length = ids.shape
  removed = removal_ids(ids, pad_id).reshape(b * length, length)
  states = encode(ids)    # on its own: the same computation as the unprojected context's
  others = encode(jnp.concatenate([concept_ids.astype(ids.dtype), removed], axis=0))
  concept_states, removed_states = others[:concept_ids.shape[0]], others[concept_ids.shape[0]:]
  p_c = concept_projector(summary(concept_states, concept_ids, eos_id), concept_mask)
  removed_summary = summary(removed_states, removed, eos_id).reshape(b, length, -1)
  real = real_token_mask(ids, eos_id)
  triggers, distances = jax.vmap(lambda s, r: trigger_tokens(s, r, p_c, alpha=alpha))(removed_summary, real)
  context = jax.vmap(lambda x, r, t: project_prompt(x, r, t, p_c, strength=strength))(states, real, triggers)
  return ProjectedPrompt(context=context, triggers=triggers, distances=distances, real=real, original=states)


def sample_switching(denoise: Callable[[Any, jax.Array, jax.Array, Any], jax.Array], params,
                     latents: jax.Array, first_context, context, *, switch_step: int, schedule: NoiseSchedule,
                     num_steps: int, eta: float = 0.0, guidance_scale=1.0, uncond_context=None,
                     rng: Optional[jax.Array] = None, config: Optional[DDIMConfig] = None) -> jax.Array:
  """``diffusion.sample`` (same timesteps, step rule, guidance and, for ``eta > 0``, step noise from ``rng``)
  conditioned on ``first_context`` for the loop steps ``0 .. switch_step - 1`` and on ``context`` from step
  ``switch_step`` on. ``switch_step`` (static) in ``[0, num_steps]``; the two contexts have the same structure
  and shapes. Returns the final latents, float32."""
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not eta >= 0:
    raise ValueError(f"eta = {eta!r} must be a number >= 0")
  eta = float(eta)
  if eta > 0 and rng is None:
    raise ValueError(f"eta = {eta} > 0 draws noise at every step: pass rng")
  if not 0 <= int(switch_step) <= int(num_steps):
    raise ValueError(f"switch_step = {switch_step} must be in [0, num_steps = {num_steps}]")
  config = DDIMConfig.from_schedule(schedule) if config is None else config
  timesteps = ddim_timesteps(schedule, num_steps)
  prev_timesteps = (timesteps - schedule.num_train_timesteps // int(num_steps)).astype(np.int32)
  n = len(timesteps)
  x = jnp.asarray(latents, jnp.float32)
  b = x.shape[0]
  keys = jax.random.split(rng, n) if eta > 0 else None

  def body(x, inputs):
    i, t, prev, key = inputs
    ctx = jax.tree_util.tree_map(lambda a, c: jnp.where(i < switch_step, a, c), first_context, context)
    out = guided_output(denoise, params, x, jnp.full((b,), t, jnp.int32), ctx,
                        guidance_scale=guidance_scale, uncond_context=uncond_context)
    noise = None if key is None else jax.random.normal(key, x.shape, jnp.float32)
    step = ddim_step(schedule, out, t, prev, x, eta=eta, noise=noise, config=config)
    return step.prev_sample, None

  final, _ = jax.lax.scan(body, x, (jnp.arange(n, dtype=jnp.int32), jnp.asarray(timesteps),
                                    jnp.asarray(prev_timesteps), keys))
  return final
