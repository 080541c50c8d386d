"""The DPO-family training loop (Diffusion-DPO, SC-DPO, DUO): data, sharded state, step, checkpoints, export.

    python -m sc_dpo_jax.main --config=configs/diffusion_dpo.py:tiny --workdir=workdir/dpo

What :func:`train_dpo` does, in order:

1. **Mesh** from ``config.mesh`` (``parallel.make_mesh``) over all processes' devices.
2. **Models** (``train.base_model``): the pipeline folder ``config.model.path`` (or, ``model.tiny``, a random
   tiny pipeline made in memory and written to ``<workdir>/base_model``), in the compute dtype ``model.dtype``.
3. **Data** (``train.sources``): ``data.train`` (or a synthetic pair set in ``<workdir>/data``) through
   ``data.pipeline``, each process reading its shard with ``data.batch_size / process_count`` pairs per step;
   images are encoded by the frozen VAE and prompts by the frozen text encoder inside the step, unless the
   records carry latents or text states.
4. **State**: ``sharded_state.sharded_train_state`` creates the train state and the frozen models already sharded
   by the logical-axis rules; the step (``train.dpo_steps`` inside the NaN guard ``train.guard``) is jitted
   with explicit shardings and compiled ahead of time once; its FLOP count gives TFLOP/s per device.
5. **Resume** (``train.harness.Run``, the skeleton every trainer shares): the latest checkpoint in
   ``<workdir>/checkpoints`` (state, rng, data position) if any.
6. **Loop**: a progress bar (pairs/s, loss); every ``train.log_every`` steps the mean metrics to
   ``metrics.jsonl`` and TensorBoard (with throughput, TFLOP/s per device, skipped updates, bad records);
   sample grids of ``train.eval_prompts`` every ``train.sample_every`` steps and at the end
   (``<workdir>/samples/step_NNNNNN.png``); an asynchronous checkpoint every ``train.checkpoint_every``
   steps; SIGTERM/SIGINT finish the step, save and return (a restart resumes); ``max_nonfinite_in_a_row``
   skipped updates in a row stop the run with an explanation.
7. **Export** (``train.export``, ``train.outputs``): the aligned pipeline (LoRA merged) as a diffusers folder
   in ``<workdir>/export``.

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

from sc_dpo_jax import models, parallel, paths, profiling
from sc_dpo_jax.data import device as device_lib
from sc_dpo_jax.data import latents as latents_lib
from sc_dpo_jax.data import pipeline as data_pipeline
from sc_dpo_jax.data import schema, synthetic
from sc_dpo_jax.train import dpo_inputs, dpo_steps, grad_accum, guard, harness, optim, outputs, sharded_state
from sc_dpo_jax.train import sources
from sc_dpo_jax.train.base_model import load_models


# -- data and step -----------------------------------------------------------------------------------------------


def open_data(config: ml_collections.ConfigDict, workdir: str, pipe) -> data_pipeline.DataIterator:
  """This process's iterator over ``data.train`` (or the synthetic pairs of a tiny run)."""
  d = config.data
  global_batch = int(d.batch_size)
  if global_batch % jax.process_count():
    raise ValueError(f"config.data.batch_size = {global_batch} is not divisible by the {jax.process_count()} "
                     f"processes")

  def write_synthetic(folder):
    synthetic.write_synthetic_pairs(folder, num_pairs=int(d.synthetic_pairs), resolution=pipe.default_size,
                                    seed=config.seed)

  source = sources.open_train_source(
      config, workdir, kind=schema.PAIR, name="synthetic_pairs", write_synthetic=write_synthetic,
      what="a pair dataset folder (python -m sc_dpo_jax.data.prepare / data.precompute make them)",
      trainer="the DPO trainer needs pairs")
  needs_text = source.spec.text_states_shape is None
  return data_pipeline.DataIterator(
      source, batch_size=global_batch // jax.process_count(), seed=config.seed,
      resolution=(int(d.resolution) or pipe.default_size) if source.spec.image_format == schema.IMAGE else None,
      random_flip=bool(d.random_flip), latents=d.latents, shuffle_buffer=int(d.shuffle_buffer),
      skip_bad_records=bool(d.skip_bad_records), tokenizer=pipe.tokenizer if needs_text else None)


def make_prepare(pipe, spec: schema.RecordSpec, method: str):
  """``(frozen, batch, rng) -> step batch``: ``latents_chosen`` / ``latents_rejected`` (the VAE inside the step
  for images, sampling for ``moments_*``, as given for ``latents_*``), ``text_states`` (the text encoder inside
  the step unless the records hold them), ``text_states_chosen`` likewise (from ``text_states_chosen`` or
  ``input_ids_chosen``) where the records have the chosen image's own prompt ``prompt_chosen`` (read by DUO's
  ``duo_prompts = "given"``; under jit, a method that does not read them costs nothing) and, for SC-DPO,
  ``cost_chosen`` / ``cost_rejected``: the batch contract of ``dpo_steps``."""
  vae, text_encoder = pipe.vae, pipe.text_encoder

  def latents(frozen, batch, which, rng):
    if f"image_{which}" in batch:
      x = batch[f"image_{which}"].astype(jnp.float32) / 127.5 - 1.0
      return models.encode_to_latents(vae, frozen["vae"], x, rng)
    if f"moments_{which}" in batch:
      return latents_lib.sample_latents(batch[f"moments_{which}"], rng, scaling_factor=spec.latent_scaling_factor,
                                        shift_factor=spec.latent_shift_factor)
    return batch[f"latents_{which}"]

  def text_states(frozen, batch, suffix):
    if f"text_states{suffix}" in batch:
      return batch[f"text_states{suffix}"]
    return text_encoder.apply({"params": frozen["text_encoder"]}, batch[f"input_ids{suffix}"]).last_hidden_state

  def prepare(frozen, batch, rng):
    rng_chosen, rng_rejected = jax.random.split(rng)
    chosen = latents(frozen, batch, "chosen", rng_chosen)
    if "nonfinite_probe" in batch:
      chosen = chosen + batch["nonfinite_probe"][:, None, None, None].astype(chosen.dtype)
    out = {"latents_chosen": chosen, "latents_rejected": latents(frozen, batch, "rejected", rng_rejected)}
    out["text_states"] = text_states(frozen, batch, "")
    if "text_states_chosen" in batch or "input_ids_chosen" in batch:   # records with prompt_chosen
      out["text_states_chosen"] = text_states(frozen, batch, "_chosen")
    if method == "sc_dpo":
      if "cost_chosen" not in batch:
        raise ValueError("SC-DPO needs the safety costs of both images in the records (cost_chosen, cost_rejected)")
      out["cost_chosen"], out["cost_rejected"] = batch["cost_chosen"], batch["cost_rejected"]
      if "harmful_prompt" in batch:      # retention "preserve" keeps the outputs of the clean-prompt pairs
        out["harmful_prompt"] = batch["harmful_prompt"]
    return out

  return prepare


def make_train_step(pipe, spec, objective, *, grad_accum_steps: int = 1, data_parallel: int = 1):
  """The pure step ``(state, frozen, batch, rng) -> (state, metrics)`` the loop jits: batch preparation (VAE and
  text encoder, run per micro-batch inside ``dpo_steps`` so that ``grad_accum_steps`` micro-batches keep one
  micro-batch's activations in memory), the method's update, and the NaN guard."""
  prepare = make_prepare(pipe, spec, objective.method)
  return guard.skip_nonfinite(dpo_steps.dpo_step_fn(
      pipe.unet, pipe.schedule, objective, grad_accum_steps=grad_accum_steps, data_parallel=data_parallel,
      prepare=prepare))


# -- the run ------------------------------------------------------------------------------------------------------


def train_dpo(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  t_start = time.time()
  c = config
  workdir = paths.resolve(workdir)
  objective = dpo_steps.resolve_config(c.objective)
  mesh = parallel.make_mesh(c.mesh.to_dict())
  data_parallel = int(mesh.shape["data"] * mesh.shape["fsdp"])
  accum = int(c.train.grad_accum_steps)
  grad_accum.check_batch_split(int(c.data.batch_size), accum, data_parallel)    # fails before models load
  logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
  pipe = load_models(c, workdir)
  it = open_data(c, workdir, pipe)
  spec = it.spec
  if objective.method == "duo" and objective.duo_prompts == "given" and not spec.has_chosen_prompt:
    raise ValueError(dpo_inputs.missing_chosen_prompt(
        f"the training pairs ({c.data.train or 'the synthetic pairs of a tiny run'})",
        "'prompt_chosen' (its record spec has no has_chosen_prompt)"))

  if (objective.method == "sc_dpo" and (objective.retention == "preserve" or float(objective.preserve_weight) > 0)
      and not spec.has_harmful_prompt):
    raise ValueError(f"config.objective.retention = 'preserve' (or preserve_weight > 0) keeps the outputs of the "
                     f"clean-prompt pairs, but "
                     f"the records of config.data.train = {c.data.train or it.source.name!r} have no "
                     f"harmful_prompt field; use retention 'sft' or a dataset that marks harmful prompts")
  total_batch = int(c.data.batch_size)
  tx, lr_schedule = optim.make_optimizer(c.optim, total_batch_size=total_batch, beta=float(objective.beta))
  logging.info("optimizer: %s", optim.describe(c.optim, total_batch_size=total_batch, beta=float(objective.beta)))
  rng = jax.random.PRNGKey(c.seed)
  empty_text = np.asarray(pipe.encode_prompts([""]))
  extra = {}
  rules = parallel.rules_from_config(c.mesh_rules)
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
  state, frozen, shardings = sharded_state.sharded_train_state(
      pipe.params["unet"], tx, lr_schedule, mesh=mesh, param_specs=parallel.module_logical_specs(pipe.unet),
      rules=rules, min_shard_size=c.min_shard_size, lora=lora, rng=jax.random.fold_in(rng, 1),
      ref_dtype=ref_dtype, empty_text=empty_text, frozen_extra=extra)
  step = parallel.make_sharded_step(
      make_train_step(pipe, spec, objective, grad_accum_steps=accum, data_parallel=data_parallel), shardings)

  # Resume.
  run = harness.Run(c, workdir, name=objective.method, unit="step", total=int(c.train.steps))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings.state)
  restored = run.resume(abstract_state=abstract, rng=rng)
  if restored is not None:
    state, rng = restored.state, restored.rng
    if restored.data_state is not None:
      it.restore(restored.data_state)
  start_step = int(state.step)
  config_json = harness.config_dict(c)

  # Compile ahead of time, once.
  inject = set(int(s) for s in c.train.inject_nonfinite_at)
  probe = bool(inject)       # the NaN guard's test input rides in the batches only when asked for
  first = next(it)
  batch = device_lib.global_batch(_with_probe(first) if probe else first, mesh)
  t0 = time.time()
  compiled = step.jitted.lower(state, frozen, batch, rng).compile()
  compile_s = time.time() - t0
  flops = profiling.compiled_flops(compiled)
  logging.info("step compiled in %.1f s; %s FLOP per step per device", compile_s, f"{flops:.3g}" if flops else "?")

  summary: Dict[str, Any] = {"workdir": str(workdir), "method": objective.method,
                             "start_step": start_step, "compile_s": round(compile_s, 2)}
  run.open(start_step)
  final_step = start_step
  with run:
    host_batch = first
    for index in run.indices(start_step):
      host = _with_probe(host_batch, poison=index in inject) if probe else host_batch
      batch = device_lib.global_batch(host, mesh)
      state, metrics = compiled(state, frozen, batch, rng)
      run.window.add(index, metrics)
      due = run.tick(index + 1)
      final_step = due.index
      if due.log:
        means, steps, elapsed = run.window.means()
        means.update({"pairs_per_s": steps * total_batch / elapsed, "step_time_s": elapsed / steps,
                      "skipped_updates_total": run.counter.total, **it.metrics()})
        if flops:
          means["tflops_per_device"] = flops * steps / elapsed / 1e12
        run.log(due.index, means, loss=f"{means.get('loss', float('nan')):.4f}",
                pairs_s=f"{means['pairs_per_s']:.1f}")
      if due.sample:
        outputs.sample_grid(pipe, state, frozen, c, workdir, due.index, writer=run.writer)
      if due.checkpoint:
        run.ckpt.save(due.index, state=state, rng=rng, data_state=it.state(), config=config_json)
      if due.stop:
        run.stopped(due.index)
        break
      if not due.last:
        host_batch = next(it)
  summary.update({"final_step": final_step, **run.end(), "bad_records": it.bad_records})
  return outputs.finish_run(run, pipe, state, frozen, summary, t_start)


def _with_probe(batch, poison: bool = False):
  """``batch`` plus ``nonfinite_probe`` (zeros, or NaN for ``train.inject_nonfinite_at``), which the step adds
  to the chosen latents: the way tests and users check the NaN guard on the real compiled step."""
  rows = len(next(iter(batch.values())))
  return dict(batch, nonfinite_probe=np.full((rows,), np.nan if poison else 0.0, np.float32))
