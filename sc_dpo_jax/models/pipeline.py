"""A Stable Diffusion checkpoint folder as one object: load, generate, edit (SDEdit), save.

::

    pipe = models.load_pipeline("path/to/stable-diffusion")   # model_index.json, unet/, vae/, text_encoder/,
                                                              # tokenizer/, scheduler/
    images = pipe.generate(["a photo of a cat"], seed=0, steps=50, guidance=7.5)   # uint8 NHWC
    models.save_pipeline("out/sd", pipe)                       # diffusers.StableDiffusionPipeline reads it

Sampling is DDIM (``diffusion.sampling``) whatever scheduler class the folder names: its betas, prediction type,
timestep spacing and offsets are used. Every model runs through ``apply`` with its parameters passed to a
jitted function (never closed over); compiled programs are cached per (batch, size, steps, eta, guidance on/off,
safety guidance off or its numeric settings).
The folder's ``safety_checker``/``feature_extractor`` components are not loaded (this project measures safety
with its own detectors) and are written as absent. Folders may be local or ``gs://`` URIs (``models.storage``): a
trainer's export lands in a bucket workdir and loads back from it.

``generate(..., safety="medium")`` samples with Safe Latent Diffusion (``diffusion.safe_guidance``: a preset
name or an ``SLDConfig``), diffusers' ``StableDiffusionPipelineSafe`` guidance: every step runs the UNet on
[negative prompt, prompt, safety concept] in one batch. It needs guidance > 1; ``edit`` does not offer it.

``generate(..., projection=ProjectionConfig(concepts=("nudity", ...)))`` samples with the SAFREE-style prompt
projection (``diffusion.prompt_projection``): inside the jitted sampler the prompt's trigger tokens are projected
away from the concepts' subspace (the concepts' token ids are an input: other concepts of the same count reuse
the program); the unconditional context is not touched. It combines with ``safety=`` (SLD then samples on the
projected prompt) when ``steps_fraction`` is 1; ``edit`` does not offer it. ``project_prompts`` shows what it
does to given prompts (trigger tokens, distances, projected states).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from sc_dpo_jax import diffusion
from sc_dpo_jax.diffusion import prompt_projection, safe_guidance
from sc_dpo_jax.diffusion.prompt_projection import ProjectionConfig
from sc_dpo_jax.models import clip_io, io, storage, tokenizer as tokenizer_lib, vae_io, weights
from sc_dpo_jax.models.clip import CLIPTextModel
from sc_dpo_jax.models.tokenizer import Tokenizer
from sc_dpo_jax.models.unet import UNet2DConditionModel
from sc_dpo_jax.models.vae import AutoencoderKL, decode_latents, encode_to_latents

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Components a Stable Diffusion folder may name that we do not load (they must then be absent or are skipped).
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


@dataclasses.dataclass
class StableDiffusion:
  """The modules, their parameters, the tokenizer and the noise schedule of one checkpoint."""
  unet: UNet2DConditionModel
  text_encoder: CLIPTextModel
  vae: AutoencoderKL
  tokenizer: Tokenizer
  schedule: diffusion.NoiseSchedule
  params: Dict[str, Any]          # {"unet": ..., "text_encoder": ..., "vae": ...}
  scheduler_class: str = "DDIMScheduler"

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    return int(self.unet.config.sample_size) * self.vae_scale_factor

  # ------------------------------------------------------------------------------------------------ text
  def encode_prompts(self, prompts: Union[str, Sequence[str]]) -> jax.Array:
    """Text states ``[B, L, D]`` the UNet is conditioned on."""
    ids = self.tokenizer(prompts)
    return _encode_text(self.text_encoder, self.params["text_encoder"], ids)

  def project_prompts(self, prompts: Union[str, Sequence[str]],
                      projection: ProjectionConfig) -> prompt_projection.ProjectedPrompt:
    """What ``generate(..., projection=projection)`` conditions ``prompts`` on: a ``ProjectedPrompt`` of numpy
    arrays (projected and original states ``[B, L, D]``, trigger mask, distances ``d_i`` and real-token mask
    ``[B, L]``). ``steps_fraction`` plays no part here."""
    projection = _check_projection(projection)
    ids = self.tokenizer(prompts)
    fn = _projection_fn(self.text_encoder, *self._special_ids())
    out = fn(self.params["text_encoder"], ids, self.tokenizer(list(projection.concepts)),
             jnp.float32(projection.alpha), jnp.float32(projection.strength))
    return prompt_projection.ProjectedPrompt(*(np.asarray(a) for a in out))

  # ------------------------------------------------------------------------------------------ generation
  def generate(self, prompts: Union[str, Sequence[str]], *, seed: int = 0, steps: int = 50,
               guidance: float = 7.5, eta: float = 0.0, negative_prompt: Union[None, str, Sequence[str]] = None,
               height: Optional[int] = None, width: Optional[int] = None, latents=None,
               batch_size: int = 8, output: str = "uint8", progress: bool = True,
               safety: Union[None, str, safe_guidance.SLDConfig] = None,
               projection: Optional[ProjectionConfig] = None) -> np.ndarray:
    """Images for ``prompts``: uint8 ``[N, H, W, 3]`` (``output="float"``: float32 in [0, 1]).

    Image ``i`` starts from noise drawn with ``fold_in(PRNGKey(seed), i)``, so it does not depend on the
    batch size (with ``eta > 0`` the step noise is drawn per batch). ``latents`` (NHWC ``[N, h, w, C]``) replace
    the drawn initial noise, e.g. to reproduce another implementation's run.

    ``safety``: Safe Latent Diffusion (``diffusion.safe_guidance``): ``None`` (off), a preset name
    (``"weak"``, ``"medium"``, ``"strong"``, ``"max"``) or an ``SLDConfig``; it needs ``guidance > 1``.

    ``projection``: SAFREE-style prompt projection (``diffusion.prompt_projection``): ``None`` (off) or a
    ``ProjectionConfig``; the prompts' trigger tokens are projected away from its concepts for the first
    ``projection.projected_steps(steps)`` steps. With ``safety`` too, SLD samples on the projected prompt; that
    combination needs ``steps_fraction = 1``.
    """
    prompts, negatives = self._prompts(prompts, negative_prompt)
    _check_sampling(steps, guidance, eta)
    safety = safe_guidance.resolve(safety)
    if safety is not None and not guidance > 1.0:
      raise ValueError(f"safety guidance (SLD) acts through classifier-free guidance: it needs guidance > 1, "
                       f"got guidance = {guidance}")
    if projection is not None:
      projection = _check_projection(projection)
      if safety is not None and projection.projected_steps(steps) < steps:
        raise NotImplementedError(
            f"projection with steps_fraction = {projection.steps_fraction} (< 1: projected for "
            f"{projection.projected_steps(steps)} of {steps} steps) cannot be combined with safety guidance "
            "(SLD); use steps_fraction = 1 with safety, or projection alone")
    shape = self._latent_shape(height, width)
    key = jax.random.PRNGKey(seed)
    if latents is None:
      latents = self.initial_noise(seed, range(len(prompts)), height=height, width=width)
    elif tuple(np.shape(latents)) != (len(prompts),) + shape:
      raise ValueError(f"latents have shape {np.shape(latents)}; expected {(len(prompts),) + shape} "
                       "(NHWC, one per prompt)")
    return self._run_batches(prompts, negatives, np.asarray(latents, np.float32), None, key, steps=steps,
                             guidance=guidance, eta=eta, strength=None, batch_size=batch_size, output=output,
                             progress=progress, safety=safety, projection=projection)

  def initial_noise(self, seed: int, indices: Sequence[int], *, height: Optional[int] = None,
                    width: Optional[int] = None) -> np.ndarray:
    """The initial latents ``generate`` draws for images ``indices`` with ``seed``: float32 ``[N, h, w, C]``,
    row ``n`` ``normal(fold_in(PRNGKey(seed), indices[n]))``. Pass them as ``latents`` to draw other prompts
    from the same noise (e.g. a prompt and its safe rewrite, for pairs that differ only in the concept)."""
    indices = list(indices)
    return initial_noise([seed] * len(indices), indices, self._latent_shape(height, width))

  def edit(self, images, prompts: Union[str, Sequence[str]], *, strength: float = 0.75, seed: int = 0,
           steps: int = 50, guidance: float = 7.5, eta: float = 0.0,
           negative_prompt: Union[None, str, Sequence[str]] = None, batch_size: int = 8, output: str = "uint8",
           progress: bool = True, safety=None, projection=None) -> np.ndarray:
    """SDEdit (img2img): noise ``images`` (uint8 or float in [0, 1], NHWC) to ``strength`` of the way and
    denoise them under ``prompts``. Same outputs as ``generate``. Safe Latent Diffusion (``safety``) and the
    prompt projection (``projection``) are only offered by ``generate``."""
    if safety is not None:
      raise NotImplementedError(f"edit (SDEdit) does not support safety guidance (safety={safety!r}); SLD is "
                                "available in generate(..., safety=...)")
    if projection is not None:
      raise NotImplementedError(f"edit (SDEdit) does not support the prompt projection (projection="
                                f"{projection!r}); it is available in generate(..., projection=...)")
    prompts, negatives = self._prompts(prompts, negative_prompt)
    _check_sampling(steps, guidance, eta)
    if not 0.0 < strength <= 1.0:
      raise ValueError(f"strength must be in (0, 1], got {strength}")
    images = _to_unit_float(images)
    if images.shape[0] != len(prompts):
      raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts; give one prompt per image")
    f = self.vae_scale_factor
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the VAE factor {f}")
    return self._run_batches(prompts, negatives, None, images, jax.random.PRNGKey(seed), steps=steps,
                             guidance=guidance, eta=eta, strength=strength, batch_size=batch_size,
                             output=output, progress=progress)

  # ------------------------------------------------------------------------------------------- internals
  def _prompts(self, prompts, negative_prompt):
    prompts = tokenizer_lib._as_list(prompts)  # pylint: disable=protected-access
    if negative_prompt is None:
      negatives = [""] * len(prompts)
    else:
      negatives = tokenizer_lib._as_list(negative_prompt)  # pylint: disable=protected-access
      if len(negatives) == 1:
        negatives = negatives * len(prompts)
      if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one or as many")
    return prompts, negatives

  def _special_ids(self):
    """``(pad_id, eos_id)`` of the tokenizer: what the prompt projection removes tokens with and stops at."""
    hf = self.tokenizer.hf
    if hf.eos_token_id is None:
      raise ValueError(f"{self.tokenizer.source}: the tokenizer has no EOS token; the prompt projection needs one")
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    return int(pad), int(hf.eos_token_id)

  def _latent_shape(self, height, width):
    height, width = height or self.default_size, width or self.default_size
    f = self.vae_scale_factor
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    return (height // f, width // f, int(self.unet.config.in_channels))

  def _run_batches(self, prompts, negatives, latents, images, key, *, steps, guidance, eta, strength,
                   batch_size, output, progress, safety=None, projection=None):
    if output not in ("uint8", "float"):
      raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # The program reads SLD's numbers, not its concept (whose token ids are an input): key it on the numbers.
    sld_key = None if safety is None else dataclasses.replace(safety, concept=safe_guidance.DEFAULT_SAFETY_CONCEPT)
    # Likewise the projection's program reads the number of concepts and of projected steps; the concepts'
    # token ids, alpha and strength are inputs.
    proj_key = None
    if projection is not None:
      proj_key = _ProjectionProgram(len(projection.concepts), projection.projected_steps(steps),
                                    *self._special_ids())
    fn = _sampler(self.text_encoder, self.unet, self.vae, self.schedule, steps=int(steps), eta=float(eta),
                  use_guidance=guidance > 1.0, strength=None if images is None else float(strength),
                  safety=sld_key, **({} if proj_key is None else {"projection": proj_key}))
    extra = () if safety is None else (self.tokenizer([safety.concept]),)
    if projection is not None:
      extra += (self.tokenizer(list(projection.concepts)), jnp.float32(projection.alpha),
                jnp.float32(projection.strength))
    out = []
    starts = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not progress or
                                   len(starts) == 1)):
      sl = slice(start, start + batch_size)
      ids, neg_ids = self.tokenizer(prompts[sl]), self.tokenizer(negatives[sl])
      init = latents[sl] if latents is not None else images[sl]
      n = len(init)
      if len(starts) > 1 and n < batch_size:   # one program for every batch: pad the last one, then drop it
        ids, neg_ids, init = (np.concatenate([a, np.repeat(a[-1:], batch_size - n, axis=0)])
                              for a in (np.asarray(ids), np.asarray(neg_ids), np.asarray(init)))
      batch = fn(self.params, ids, neg_ids, init, jnp.float32(guidance), jax.random.fold_in(key, b), *extra)
      out.append(np.asarray(batch)[:n])
    result = np.concatenate(out)
    if output == "uint8":
      result = np.round(result * 255).astype(np.uint8)
    return result


@functools.lru_cache(maxsize=8)
def _noise_fn(shape):
  return jax.jit(jax.vmap(lambda key, i: jax.random.normal(jax.random.fold_in(key, i), shape)))


def initial_noise(seeds: Sequence[int], indices: Sequence[int], shape) -> np.ndarray:
  """float32 ``[N, *shape]``: row ``n`` is ``normal(fold_in(PRNGKey(seeds[n]), indices[n]))``, the initial noise
  ``StableDiffusion.generate`` draws for image ``indices[n]`` with ``seed=seeds[n]``."""
  if len(seeds) != len(indices):
    raise ValueError(f"{len(seeds)} seeds for {len(indices)} noise indices; give one per image")
  keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds]) if len(seeds) else jnp.zeros((0, 2), jnp.uint32)
  idx = jnp.asarray(np.asarray(indices, np.int64).astype(np.uint32))
  return np.asarray(_noise_fn(tuple(shape))(keys, idx), np.float32)


def _check_sampling(steps, guidance, eta):
  if int(steps) != steps or steps < 1:
    raise ValueError(f"steps must be a positive integer, got {steps}")
  if guidance < 0:
    raise ValueError(f"guidance scale must be >= 0, got {guidance}")
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")


def _to_unit_float(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC RGB [N, H, W, 3], got shape {images.shape}")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  images = images.astype(np.float32)
  if images.min() < 0 or images.max() > 1:
    raise ValueError(f"float images must lie in [0, 1]; got values in [{images.min()}, {images.max()}]")
  return images


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(text_encoder, params, ids):
  return text_encoder.apply({"params": params}, ids).last_hidden_state


def _check_projection(projection) -> ProjectionConfig:
  if not isinstance(projection, ProjectionConfig):
    raise TypeError(f"projection must be None or a diffusion.prompt_projection.ProjectionConfig, got "
                    f"{type(projection).__name__}")
  return projection


class _ProjectionProgram(NamedTuple):
  """What a sampler with the prompt projection is compiled for (the rest are inputs)."""
  num_concepts: int
  projected_steps: int
  pad_id: int
  eos_id: int


@functools.lru_cache(maxsize=8)
def _projection_fn(text_encoder, pad_id, eos_id):
  """A jitted ``(text params, ids, concept_ids, alpha, strength) -> ProjectedPrompt``."""

  def fn(params, ids, concept_ids, alpha, strength):
    encode = lambda i: text_encoder.apply({"params": params}, i).last_hidden_state
    return prompt_projection.projected_context(encode, ids, concept_ids, pad_id=pad_id, eos_id=eos_id,
                                               alpha=alpha, strength=strength)

  return jax.jit(fn)


@functools.lru_cache(maxsize=32)
def _sampler(text_encoder, unet, vae, schedule, *, steps, eta, use_guidance, strength, safety=None,
             projection=None):
  """A jitted ``(params, ids, neg_ids, init, guidance, rng) -> images in [0, 1]`` for fixed static settings.

  ``init`` is the initial noise (``strength`` None: text to image) or the images in [0, 1] to edit (SDEdit
  with ``strength``). With ``safety`` (an ``SLDConfig``; text to image with guidance only) the function takes
  the safety concept's token ids ``[1, L]`` as a seventh argument and samples with Safe Latent Diffusion.
  With ``projection`` (a ``_ProjectionProgram``; text to image only) it takes, after those, the projection
  concepts' token ids ``[K, L]``, alpha and strength (float32 scalars), and conditions the first
  ``projection.projected_steps`` steps on the projected prompt (``diffusion.prompt_projection``)."""

  def denoise(unet_params, x, t, context):
    return unet.apply({"params": unet_params}, x, t, context)

  if projection is not None:
    return _projected_sampler(text_encoder, vae, schedule, denoise, steps=steps, eta=eta,
                              use_guidance=use_guidance, strength=strength, safety=safety, projection=projection)

  if safety is not None:
    if strength is not None or not use_guidance:
      raise ValueError("safety guidance (SLD) is only for text to image with guidance > 1")

    def run_sld(params, ids, neg_ids, init, guidance, rng, concept_ids):
      encode = lambda i: text_encoder.apply({"params": params["text_encoder"]}, i).last_hidden_state
      _, rng = jax.random.split(rng)   # as ``run``: the same step noise with and without SLD
      latents = safe_guidance.sample_sld(
          denoise, params["unet"], init, encode(ids), uncond_context=encode(neg_ids),
          safety_context=encode(concept_ids), sld=safety, schedule=schedule, num_steps=steps,
          guidance_scale=guidance, eta=eta, rng=rng)
      images = decode_latents(vae, params["vae"], latents)
      return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)

    return jax.jit(run_sld)

  def run(params, ids, neg_ids, init, guidance, rng):
    context = text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    uncond = None
    if use_guidance:
      uncond = text_encoder.apply({"params": params["text_encoder"]}, neg_ids).last_hidden_state
    enc_rng, rng = jax.random.split(rng)
    kwargs = dict(schedule=schedule, num_steps=steps, eta=eta,
                  guidance_scale=guidance if use_guidance else 1.0,
                  uncond_context=uncond, rng=rng)
    if strength is None:
      latents = diffusion.sample(denoise, params["unet"], init, context, **kwargs)
    else:
      init_latents = encode_to_latents(vae, params["vae"], init * 2.0 - 1.0, enc_rng)
      latents = diffusion.sdedit(denoise, params["unet"], init_latents, context, strength=strength,
                                 **kwargs)
    images = decode_latents(vae, params["vae"], latents)
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)

  return jax.jit(run)


def _projected_sampler(text_encoder, vae, schedule, denoise, *, steps, eta, use_guidance, strength, safety,
                       projection):
  """``_sampler`` with the prompt projection (see there)."""
  if strength is not None:
    raise ValueError("the prompt projection is only for text to image (not SDEdit)")
  if safety is not None and projection.projected_steps < steps:
    raise ValueError("the prompt projection combines with SLD only when it projects every step")

  def run(params, ids, neg_ids, init, guidance, rng, *extra):
    sld_ids, (concept_ids, alpha, proj_strength) = (extra[0], extra[1:]) if safety is not None else (None, extra)
    encode = lambda i: text_encoder.apply({"params": params["text_encoder"]}, i).last_hidden_state
    projected = prompt_projection.projected_context(encode, ids, concept_ids, pad_id=projection.pad_id,
                                                    eos_id=projection.eos_id, alpha=alpha,
                                                    strength=proj_strength)
    uncond = encode(neg_ids) if use_guidance else None
    _, rng = jax.random.split(rng)   # as ``run``: the same step noise with and without the projection
    if safety is not None:
      latents = safe_guidance.sample_sld(
          denoise, params["unet"], init, projected.context, uncond_context=uncond,
          safety_context=encode(sld_ids), sld=safety, schedule=schedule, num_steps=steps,
          guidance_scale=guidance, eta=eta, rng=rng)
    else:
      kwargs = dict(schedule=schedule, num_steps=steps, eta=eta,
                    guidance_scale=guidance if use_guidance else 1.0, uncond_context=uncond, rng=rng)
      if projection.projected_steps >= steps:
        latents = diffusion.sample(denoise, params["unet"], init, projected.context, **kwargs)
      else:
        latents = prompt_projection.sample_switching(denoise, params["unet"], init, projected.context,
                                                     projected.original, switch_step=projection.projected_steps,
                                                     **kwargs)
    images = decode_latents(vae, params["vae"], latents)
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)

  return jax.jit(run)


# ------------------------------------------------------------------------------------------------- folders
def load_pipeline(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "reference",
                  allow_pickle: bool = False) -> StableDiffusion:
  """Reads a diffusers Stable Diffusion folder (SD1.x/2.x layout, see the module docstring), local or ``gs://``.

  ``attention`` (``models.attention.IMPLEMENTATIONS``) is resolved per model as it loads (``attention.resolve``):
  ``"auto"`` picks cuDNN where the model's heads and ``dtype`` allow it on this platform and XLA elsewhere (the SD
  VAE's 512-wide head always gets XLA); ``"cudnn"`` runs the UNet and text encoder on cuDNN, the VAE as ``"auto"``,
  and fails here, naming the fix, where cuDNN cannot run.
  """
  index_path = storage.join(folder, "model_index.json")
  if not storage.is_file(index_path):
    raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: {index_path} does not exist")
  index = io.read_json(index_path)
  name = index.get("_class_name")
  if name not in SUPPORTED_PIPELINES:
    raise ValueError(f"{index_path}: _class_name {name!r} is not supported; this loader reads "
                     f"{SUPPORTED_PIPELINES}")
  for component in REQUIRED_COMPONENTS:
    if not isinstance(index.get(component), list) or index[component][0] is None:
      raise ValueError(f"{index_path}: component {component!r} is missing")
  for key, value in index.items():
    if key.startswith("_") or key in REQUIRED_COMPONENTS or key == "requires_safety_checker":
      continue
    if key not in IGNORED_COMPONENTS:
      raise ValueError(f"{index_path}: unknown component {key!r} = {value}")
    if isinstance(value, list) and value[0] is not None:
      logging.info("%s: not loading component %r (%s)", folder, key, value)
  kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, allow_pickle=allow_pickle)
  unet, unet_params = io.load_unet(storage.join(folder, "unet"), **kw)
  text_encoder, text_params = clip_io.load_clip_text(storage.join(folder, "text_encoder"), **kw)
  # cuDNN attention takes heads up to 256 wide; the SD VAE's single mid-block head is 512 wide.
  vae_kw = dict(kw, attention="auto" if attention == "cudnn" else attention)
  vae, vae_params = vae_io.load_vae(storage.join(folder, "vae"), **vae_kw)
  schedule_path = storage.join(folder, "scheduler", "scheduler_config.json")
  schedule = diffusion.NoiseSchedule.from_config(io.read_json(schedule_path), source=schedule_path)
  if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
    raise ValueError(f"{folder}: text_encoder hidden_size {text_encoder.config.hidden_size} != unet "
                     f"cross_attention_dim {unet.config.cross_attention_dim}")
  return StableDiffusion(unet=unet, text_encoder=text_encoder, vae=vae,
                         tokenizer=tokenizer_lib.load_tokenizer(storage.join(folder, "tokenizer")),
                         schedule=schedule,
                         params={"unet": unet_params, "text_encoder": text_params, "vae": vae_params},
                         scheduler_class=index["scheduler"][1])


def save_pipeline(folder: str, pipe: StableDiffusion, *, dtype=None) -> None:
  """Writes a folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` and ``load_pipeline`` read, local
  or ``gs://`` (``models.storage``); its ``tokenizer/`` loads in every transformers version we support
  (``Tokenizer.save``)."""
  storage.makedirs(folder)
  io.save_unet(storage.join(folder, "unet"), pipe.unet, pipe.params["unet"], dtype=dtype)
  clip_io.save_clip_text(storage.join(folder, "text_encoder"), pipe.text_encoder, pipe.params["text_encoder"])
  vae_io.save_vae(storage.join(folder, "vae"), pipe.vae, pipe.params["vae"], dtype=dtype)
  pipe.tokenizer.save(storage.join(folder, "tokenizer"))
  with storage.staged(storage.join(folder, "scheduler")) as scheduler_dir:
    diffusion.save_schedule(scheduler_dir, pipe.schedule, pipe.scheduler_class)
  text_class = "CLIPTextModelWithProjection" if pipe.text_encoder.with_projection else "CLIPTextModel"
  index = {
      "_class_name": "StableDiffusionPipeline",
      "_diffusers_version": weights.library_version("diffusers"),
      "feature_extractor": [None, None],
      "requires_safety_checker": False,
      "safety_checker": [None, None],
      "scheduler": ["diffusers", pipe.scheduler_class],
      "text_encoder": ["transformers", text_class],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  }
  storage.write_json(storage.join(folder, "model_index.json"), index)
