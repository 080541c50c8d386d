"""What a diffusion trainer writes besides checkpoints: sample grids during the run, and at its end the last
grid, the aligned pipeline as a diffusers folder, and ``summary.json``.

    sample_grid(pipe, state, frozen, config, workdir, step, writer=run.writer)  # <workdir>/samples/step_NNNNNN.png
    summary = finish_run(run, pipe, state, frozen, summary, t_start)            # grid, export, summary.json
"""
from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp

from sc_dpo_jax import images as images_lib
from sc_dpo_jax import models, paths
from sc_dpo_jax.models import lora as lora_lib
from sc_dpo_jax.parallel import multihost


def policy_unet_params(state, frozen):
  """The aligned UNet's parameters: LoRA merged into the base, or the trained UNet itself."""
  if isinstance(state.params, lora_lib.LoRA):
    return lora_lib.merge_lora(frozen["unet"], state.params)
  return state.params


def sample_grid(pipe, state, frozen, config, workdir, step_index, writer=None):
  """``<workdir>/samples/step_NNNNNN.png``: the policy's images of ``train.eval_prompts`` (fixed seed, so grids
  of successive steps show what training changed); also TensorBoard's image tab when ``writer`` is given."""
  prompts = list(config.train.eval_prompts)
  if not prompts:
    return
  params = dict(pipe.params, unet=jax.device_get(policy_unet_params(state, frozen)))
  sampler = models.StableDiffusion(unet=pipe.unet, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                   tokenizer=pipe.tokenizer, schedule=pipe.schedule, params=params)
  images = sampler.generate(prompts, seed=config.seed, steps=int(config.train.sample_steps),
                            guidance=float(config.train.sample_guidance), progress=False)
  if jax.process_index() == 0:
    grid = images_lib.make_grid(images, columns=len(prompts))
    paths.write_bytes(paths.resolve(workdir) / "samples" / f"step_{step_index:06d}.png", images_lib.encode_png(grid))
    if writer is not None:
      writer.write_images(step_index, {"samples": grid})


def export_pipeline(pipe, state, frozen, folder: paths.PathLike) -> str:
  """Writes the aligned pipeline (LoRA merged) as a diffusers folder; returns its path."""
  params = jax.device_get(policy_unet_params(state, frozen))
  if jax.process_index() == 0:
    out = models.StableDiffusion(unet=pipe.unet.clone(dtype=jnp.float32), text_encoder=pipe.text_encoder,
                                 vae=pipe.vae, tokenizer=pipe.tokenizer, schedule=pipe.schedule,
                                 params=dict(pipe.params, unet=params), scheduler_class=pipe.scheduler_class)
    models.save_pipeline(folder, out)
  multihost.barrier("export")
  return str(paths.resolve(folder))


def finish_run(run, pipe, state, frozen, summary: Dict[str, Any], t_start: float) -> Dict[str, Any]:
  """The end the diffusion trainers share: unless a signal stopped the run, the last sample grid and the
  export (``train.export``); then ``run.close`` (checkpointer, metrics, ``summary.json``)."""
  if not run.stopped_by_signal:
    step = summary.get("final_step", summary.get("final_iteration"))
    sample_grid(pipe, state, frozen, run.config, run.workdir, step, writer=run.writer)
    if run.config.train.export:
      summary["export"] = export_pipeline(pipe, state, frozen, run.workdir / "export")
  return run.close(summary, t_start)
