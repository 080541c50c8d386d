"""The DPO-family training loop (Diffusion-DPO, SC-DPO, DUO): data, sharded state, step, checkpoints, export.

    python -m sc_dpo_jax.main --config=configs/diffusion_dpo.py:tiny --workdir=workdir/dpo

What :func:`train_dpo` does, in order:

1. **Mesh** from ``config.mesh`` (``parallel.make_mesh``) over all processes' devices.
2. **Models**: the pipeline folder ``config.model.path`` (or, ``model.tiny``, a random tiny pipeline made in
   memory and written to ``<workdir>/base_model``), in the compute dtype ``model.dtype``.
3. **Data**: ``data.train`` (or a synthetic pair set in ``<workdir>/data``) through ``data.pipeline``, each
   process reading its shard with ``data.batch_size / process_count`` pairs per step; images are encoded by
   the frozen VAE and prompts by the frozen text encoder inside the step, unless the records carry latents or
   text states.
4. **State**: ``parallel.sharded_train_state`` creates the train state and the frozen models already sharded
   by the logical-axis rules; the step (``train.dpo_steps`` inside the NaN guard ``train.guard``) is jitted
   with explicit shardings and compiled ahead of time once; its FLOP count gives TFLOP/s per device.
5. **Resume**: the latest checkpoint in ``<workdir>/checkpoints`` (state, rng, data position) if any.
6. **Loop**: a progress bar (pairs/s, loss); every ``train.log_every`` steps the mean metrics to
   ``metrics.jsonl`` and TensorBoard (with throughput, TFLOP/s per device, skipped updates, bad records);
   sample grids of ``train.eval_prompts`` every ``train.sample_every`` steps and at the end
   (``<workdir>/samples/step_NNNNNN.png``); an asynchronous checkpoint every ``train.checkpoint_every``
   steps; SIGTERM/SIGINT finish the step, save and return (a restart resumes); ``max_nonfinite_in_a_row``
   skipped updates in a row stop the run with an explanation.
7. **Export** (``train.export``): the aligned pipeline (LoRA merged) as a diffusers folder in
   ``<workdir>/export``.

Returns a summary dict (also ``<workdir>/summary.json``).
"""
from __future__ import annotations

import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from sc_dpo_jax import images as images_lib
from sc_dpo_jax import models, parallel, paths, profiling
from sc_dpo_jax.data import device as device_lib
from sc_dpo_jax.data import latents as latents_lib
from sc_dpo_jax.data import pipeline as data_pipeline
from sc_dpo_jax.data import records, schema, synthetic
from sc_dpo_jax.models import lora as lora_lib
from sc_dpo_jax.train import dpo_steps, guard, harness, optim
from sc_dpo_jax.train.preemption import StopSignal


# -- models and data --------------------------------------------------------------------------------------------


def load_models(config: ml_collections.ConfigDict, workdir: str) -> models.StableDiffusion:
  """The pipeline the run starts from (see the module docstring)."""
  dtype = jnp.dtype(config.model.dtype)
  if config.model.tiny and config.model.path:
    raise ValueError(f"config.model.tiny = True (a :tiny variant: a random tiny model) and config.model.path = "
                     f"{config.model.path!r} are both set, and a tiny run would ignore the path. To train that "
                     f"model use a full-size variant (e.g. configs/diffusion_dpo.py:sd15) with --config.model.path, "
                     f"or keep the tiny variant's other settings and add --config.model.tiny=False")
  if config.model.tiny:
    from sc_dpo_jax.models import tiny  # pylint: disable=g-import-not-at-top
    pipe = tiny.tiny_pipeline(config.seed, dtype=dtype)
    folder = paths.resolve(workdir) / "base_model"
    if jax.process_index() == 0 and not (folder / "model_index.json").exists():
      models.save_pipeline(folder, pipe)
  else:
    if not config.model.path:
      raise ValueError("config.model.path is empty: set --config.model.path to a diffusers Stable Diffusion "
                       "folder (or use the :tiny variant)")
    pipe = models.load_pipeline(config.model.path, dtype=dtype, attention=config.model.attention)
  if config.model.remat_policy:
    pipe.unet = pipe.unet.clone(remat_policy=config.model.remat_policy)
  if config.model.tiny:  # load_pipeline resolved and checked a loaded model's attention (models.attention.resolve)
    pipe.unet = models.unet_with_attention(pipe.unet, config.model.attention)
  return pipe


def open_data(config: ml_collections.ConfigDict, workdir: str, pipe) -> data_pipeline.DataIterator:
  """This process's iterator over ``data.train`` (or the synthetic pairs of a tiny run)."""
  d = config.data
  global_batch = int(d.batch_size)
  if global_batch % jax.process_count():
    raise ValueError(f"config.data.batch_size = {global_batch} is not divisible by the {jax.process_count()} "
                     f"processes")
  if d.train:
    source = records.open_source(d.train, split=d.split)
  elif config.model.tiny:
    if paths.is_uri(workdir):
      raise ValueError(f"config.data.train is empty, so this tiny run would write synthetic pairs into "
                       f"{workdir}/data, but the record writer writes local folders only: set "
                       f"--config.data.train to a dataset folder, or use a local workdir")
    folder = str(paths.resolve(workdir) / "data" / "synthetic_pairs")
    if jax.process_index() == 0:
      synthetic.write_synthetic_pairs(folder, num_pairs=int(d.synthetic_pairs), resolution=pipe.default_size,
                                      seed=config.seed)
    barrier("synthetic data")
    source = records.open_source(folder)
  else:
    raise ValueError("config.data.train is empty: set --config.data.train to a pair dataset folder "
                     "(python -m sc_dpo_jax.data.prepare / data.precompute make them)")
  if source.spec.kind != schema.PAIR:
    raise ValueError(f"{d.train}: a {source.spec.kind} dataset; the DPO trainer needs pairs")
  needs_text = source.spec.text_states_shape is None
  return data_pipeline.DataIterator(
      source, batch_size=global_batch // jax.process_count(), seed=config.seed,
      resolution=(int(d.resolution) or pipe.default_size) if source.spec.image_format == schema.IMAGE else None,
      random_flip=bool(d.random_flip), latents=d.latents, shuffle_buffer=int(d.shuffle_buffer),
      skip_bad_records=bool(d.skip_bad_records), tokenizer=pipe.tokenizer if needs_text else None)


def barrier(name: str):
  """Waits for every process (a no-op with one), so what process 0 wrote exists before the others read it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def make_prepare(pipe, spec: schema.RecordSpec, method: str):
  """``(frozen, batch, rng) -> step batch``: latents (VAE inside the step for images, sampling for moments)
  and text states (the text encoder inside the step unless the records hold them) for ``dpo_steps``."""
  vae, text_encoder = pipe.vae, pipe.text_encoder

  def latents(frozen, batch, which, rng):
    if f"image_{which}" in batch:
      x = batch[f"image_{which}"].astype(jnp.float32) / 127.5 - 1.0
      return models.encode_to_latents(vae, frozen["vae"], x, rng)
    if f"moments_{which}" in batch:
      return latents_lib.sample_latents(batch[f"moments_{which}"], rng, scaling_factor=spec.latent_scaling_factor,
                                        shift_factor=spec.latent_shift_factor)
    return batch[f"latents_{which}"]

  def prepare(frozen, batch, rng):
    rng_w, rng_l = jax.random.split(rng)
    latents_w = latents(frozen, batch, "chosen", rng_w)
    if "nonfinite_probe" in batch:
      latents_w = latents_w + batch["nonfinite_probe"][:, None, None, None].astype(latents_w.dtype)
    out = {"latents_w": latents_w, "latents_l": latents(frozen, batch, "rejected", rng_l)}
    if "text_states" in batch:
      out["text_states"] = batch["text_states"]
    else:
      out["text_states"] = text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"]).last_hidden_state
    if method == "sc_dpo":
      if "cost_chosen" not in batch:
        raise ValueError("SC-DPO needs the safety costs of both images in the records (cost_chosen, cost_rejected)")
      out["cost_w"], out["cost_l"] = batch["cost_chosen"], batch["cost_rejected"]
    return out

  return prepare


def make_train_step(pipe, spec, objective, *, grad_accum_steps: int = 1, data_parallel: int = 1):
  """The pure step ``(state, frozen, batch, rng) -> (state, metrics)`` the loop jits: batch preparation (VAE and
  text encoder, run per micro-batch inside ``dpo_steps`` so that ``grad_accum_steps`` micro-batches keep one
  micro-batch's activations in memory), the method's update, and the NaN guard."""
  prepare = make_prepare(pipe, spec, objective.method)
  return guard.skip_nonfinite(dpo_steps.make_dpo_step(
      pipe.unet, pipe.schedule, objective, grad_accum_steps=grad_accum_steps, data_parallel=data_parallel,
      prepare=prepare).fn)


# -- the run ------------------------------------------------------------------------------------------------------


def train_dpo(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  t_start = time.time()
  c = config
  workdir = paths.resolve(workdir)
  objective = dpo_steps.resolve_config(c.objective)
  mesh = parallel.make_mesh(c.mesh.to_dict())
  data_parallel = int(mesh.shape["data"] * mesh.shape["fsdp"])
  accum = int(c.train.grad_accum_steps)
  dpo_steps.check_batch_split(int(c.data.batch_size), accum, data_parallel)    # fails before models load
  logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
  pipe = load_models(c, workdir)
  it = open_data(c, workdir, pipe)
  spec = it.spec

  total_batch = int(c.data.batch_size)
  tx, lr_schedule = optim.make_optimizer(c.optim, total_batch_size=total_batch, beta=float(objective.beta))
  logging.info("optimizer: %s", optim.describe(c.optim, total_batch_size=total_batch, beta=float(objective.beta)))
  rng = jax.random.PRNGKey(c.seed)
  empty_text = np.asarray(pipe.encode_prompts([""]))
  extra = {}
  rules = None
  if spec.image_format == schema.IMAGE:
    plan = parallel.plan_shardings(pipe.params["vae"], mesh, rules, specs=parallel.module_logical_specs(pipe.vae),
                                   min_shard_size=c.min_shard_size)
    extra["vae"] = (pipe.params["vae"], plan.shardings)
  if spec.text_states_shape is None:
    plan = parallel.plan_shardings(pipe.params["text_encoder"], mesh, rules,
                                   specs=parallel.module_logical_specs(pipe.text_encoder),
                                   min_shard_size=c.min_shard_size)
    extra["text_encoder"] = (pipe.params["text_encoder"], plan.shardings)
  lora = ({k: c.lora[k] for k in ("rank", "alpha", "targets")} if c.lora.enabled else None)
  ref_dtype = None if lora else jnp.dtype(c.model.ref_dtype)
  state, frozen, shardings = parallel.sharded_train_state(
      pipe.params["unet"], tx, lr_schedule, mesh=mesh, param_specs=parallel.module_logical_specs(pipe.unet),
      rules=rules, min_shard_size=c.min_shard_size, lora=lora, rng=jax.random.fold_in(rng, 1),
      ref_dtype=ref_dtype, empty_text=empty_text, frozen_extra=extra)
  step = parallel.make_sharded_step(
      make_train_step(pipe, spec, objective, grad_accum_steps=accum, data_parallel=data_parallel), shardings)

  # Resume.
  ckpt = harness.open_checkpoints(c, workdir)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings.state)
  restored = harness.resume(ckpt, c, abstract_state=abstract, rng=rng)
  if restored is not None:
    state, rng = restored.state, restored.rng
    if restored.data_state is not None:
      it.restore(restored.data_state)
  start_step = int(state.step)
  config_json = harness.config_dict(c)

  # Compile ahead of time, once.
  first = next(it)
  batch = device_lib.global_batch(_with_probe(first), mesh)
  t0 = time.time()
  compiled = step.jitted.lower(state, frozen, batch, rng).compile()
  compile_s = time.time() - t0
  flops = profiling.compiled_flops(compiled)
  logging.info("step compiled in %.1f s; %s FLOP per step per device", compile_s, f"{flops:.3g}" if flops else "?")

  writer = harness.open_metrics(c, workdir, start_step)
  counter = guard.NonFiniteCounter(int(c.train.max_nonfinite_in_a_row))
  inject = set(int(s) for s in c.train.inject_nonfinite_at)
  steps = int(c.train.steps)
  summary: Dict[str, Any] = {"workdir": str(workdir), "method": objective.method,
                             "start_step": start_step, "compile_s": round(compile_s, 2)}
  window = []
  window_start = time.time()
  window_steps = 0
  stopped_by_signal = False
  bar = tqdm(total=steps, initial=start_step, desc=objective.method, disable=not c.train.progress or
             jax.process_index() != 0, unit="step")
  with StopSignal() as stop, harness.saves_finished(ckpt, writer):
    pending = None       # the previous step's metrics, read one step late so dispatch runs ahead
    step_index = start_step
    host_batch = first
    while step_index < steps:
      batch = device_lib.global_batch(_with_probe(host_batch, poison=step_index in inject), mesh)
      state, metrics = compiled(state, frozen, batch, rng)
      if pending is not None:
        _finish(pending, counter, window)
      pending = (step_index, metrics)
      step_index += 1
      window_steps += 1
      bar.update(1)
      last = step_index == steps
      stopped_by_signal = stop.requested(step_index)
      if step_index % int(c.train.log_every) == 0 or last or stopped_by_signal:     # a stop keeps its window
        _finish(pending, counter, window)
        pending = None
        elapsed = time.time() - window_start
        means = {k: float(np.mean([m[k] for m in window])) for k in window[0]} if window else {}
        means.update({"pairs_per_s": window_steps * total_batch / elapsed, "step_time_s": elapsed / window_steps,
                      "skipped_updates_total": counter.total, **it.metrics()})
        if flops:
          means["tflops_per_device"] = flops * window_steps / elapsed / 1e12
        writer.write(step_index, means)
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", pairs_s=f"{means['pairs_per_s']:.1f}")
        window, window_start, window_steps = [], time.time(), 0
      if c.train.sample_every and step_index % int(c.train.sample_every) == 0 and not last:
        sample_grid(pipe, state, frozen, c, workdir, step_index, writer=writer)
      if step_index % int(c.train.checkpoint_every) == 0 or last or stopped_by_signal:
        ckpt.save(step_index, state=state, rng=rng, data_state=it.state(), config=config_json)
      if stopped_by_signal:
        logging.warning("stopped by a signal after step %d; checkpoint saved, rerun to resume", step_index)
        break
      if not last:
        host_batch = next(it)
    if pending is not None:
      _finish(pending, counter, window)
  bar.close()
  ckpt.wait()
  summary.update({"final_step": step_index, "stopped_by_signal": stopped_by_signal, **harness.stop_fields(stop),
                  "skipped_updates": counter.total, "bad_records": it.bad_records})
  return finish_run(pipe, state, frozen, c, workdir, step_index, ckpt=ckpt, writer=writer, summary=summary,
                    t_start=t_start, stopped_by_signal=stopped_by_signal)


def finish_run(pipe, state, frozen, config, workdir, step, *, ckpt, writer, summary, t_start, stopped_by_signal):
  """The end every trainer shares: unless a signal stopped the run, the last sample grid and the export; then
  close the checkpointer and the metrics, and write ``summary.json`` (process 0)."""
  workdir = paths.resolve(workdir)
  if not stopped_by_signal:
    sample_grid(pipe, state, frozen, config, workdir, step, writer=writer)
    if config.train.export:
      summary["export"] = export_pipeline(pipe, state, frozen, workdir / "export")
  ckpt.close()
  writer.close()
  summary["wall_s"] = round(time.time() - t_start, 2)
  if jax.process_index() == 0:
    paths.write_json(workdir / "summary.json", summary)
  return summary


def _with_probe(batch, poison: bool = False):
  """``batch`` plus ``nonfinite_probe`` (zeros, or NaN for ``train.inject_nonfinite_at``), which the step adds
  to the chosen latents: the way tests and users check the NaN guard on the real compiled step."""
  rows = len(next(iter(batch.values())))
  return dict(batch, nonfinite_probe=np.full((rows,), np.nan if poison else 0.0, np.float32))


def _finish(pending, counter: guard.NonFiniteCounter, window):
  index, metrics = pending
  host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
  counter.update(index, host)
  window.append(host)


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
  barrier("export")
  return str(paths.resolve(folder))
