"""The ShieldDiff-style RL trainer: DDPO with importance sampling and PPO clipping, sampled on-line from prompts.

    python -m sc_dpo_jax.main --config=configs/shielddiff_rl.py:tiny --workdir=workdir/rl

What follows published code and what is ours (METHODS.md, "ShieldDiff-style RL"): sampling with trajectories,
the per-prompt advantages, the clipped importance-sampling loss, AdamW and LoRA follow DDPO's official code
(``train.ddpo``, ``train.advantages``, ``losses.ddpo``). ShieldDiff (arXiv 2410.05309) is known here only by
its abstract; its reward as a weighted sum of named terms, a CLIP-score quality term and a safety term (minus
the safety cost model's cost; NudeNet later), with our default weights, is this project's formulation.

What :func:`train_rl` does, in order (the same workdir layout as the DPO trainer, ``train.loop``):

1. **Mesh** from ``config.mesh``; **models** as ``train.base_model.load_models`` (``model.tiny``: a random tiny
   pipeline, written to ``<workdir>/base_model``).
2. **Prompts**: ``data.train`` (a dataset of kind "prompt", e.g. I2P prepared with ``data.prepare``) or, for
   ``tiny``, a synthetic set of harmful ("red ...", the toy world's unsafe concept) and safe prompts
   (``data.synthetic``) written to ``<workdir>/data/synthetic_prompts``. Each process reads ``rl.samples_per_iteration /
   rl.samples_per_prompt`` prompts per iteration and samples each ``rl.samples_per_prompt`` times. The
   records' negative prompt, seed and guidance are not used (sampling uses the empty prompt as the
   unconditional one, ``rl.guidance_scale`` and the run's rng, as DDPO does).
3. **Reward** (``reward.weights``, ``rewards.terms``): ``clip_score`` (``rewards.ClipScore`` with the CLIP
   in ``reward.clip_folder``) and ``safety_cost`` (``rewards.CostReward`` with the cost model in
   ``reward.cost_model_folder``) and ``nudity`` (NudeNet's nudity score, ``rewards.NudityReward``: higher is
   more nudity, so it takes a negative weight like the cost; off by default), combined by
   ``rewards.WeightedSum``; each term divided by its standard deviation over the iteration's samples before
   weighting (``reward.normalize``, ``train.advantages.normalised_reward``). ``reward.clip_text``: the CLIP
   term scores each image against its prompt (``"prompt"``) or the prompt's safe rewrite (``"rewrite"``, the
   records' ``prompt_chosen``; ours). ``tiny`` without those folders
   uses a random tiny CLIP pair and a random cost adapter on its vision tower: PLUMBING ONLY, the rewards mean
   nothing. The reward runs on the host, on each
   process's own images; prompts and rewards of all processes are gathered (``parallel.multihost``).
4. **State**: ``sharded_state.sharded_train_state`` (LoRA adapters by default, ``lora.enabled=False`` trains the
   full UNet; DDPO has no reference model, so none is kept), the text encoder and VAE frozen beside it. Two
   programs are compiled ahead of time: the sampler (text encoding, DDIM with trajectories and
   log-probabilities, VAE decoding; ``train.ddpo.make_ddpo_sampler``) and the update (one minibatch, in the
   NaN guard ``train.guard``; ``train.ddpo.make_ddpo_update``). Trajectory arrays ``[S(+1), B, ...]`` are
   sharded on their batch axis (dim 1), everything per sample on dim 0.
5. **Resume**: the latest checkpoint in ``<workdir>/checkpoints``: train state, rng, data position, and the
   per-prompt reward buffers (``PerPromptAdvantages``, the checkpoint's ``extra`` item), so a resumed run
   continues exactly as an uninterrupted one.
6. **Loop**, per iteration: sample ``rl.samples_per_iteration`` images per process from the current policy
   (with ``rl.rewrite_samples`` > 0, that many of each prompt's samples under its safe rewrite, the records'
   ``prompt_chosen``, credited to the prompt; ``rewrite/*`` metrics compare them with the policy's), score
   them, gather prompts and reward terms of all processes, advantages per prompt (``rl.advantages``: DDPO's
   per-prompt buffers, or each prompt's group of samples in this iteration), then ``rl.inner_epochs`` times:
   shuffle the samples and make ``rl.updates_per_iteration`` optimiser updates on minibatches
   (from the second on, the importance ratio and the clipping act). Every ``train.log_every`` iterations the mean
   metrics go to ``metrics.jsonl`` and TensorBoard: the reward and each term (``reward/<term>``), the
   update's loss, ``approx_kl``, ``clipfrac``, ``kl_reference`` (with ``rl.kl_weight`` > 0), advantage
   statistics, gradient norm, images/s and the time of each phase. Sample grids of ``train.eval_prompts`` every ``train.sample_every`` iterations and at the end;
   an Orbax checkpoint every ``train.checkpoint_every`` iterations; SIGTERM/SIGINT finish the iteration,
   save and return.
7. **Export** (``train.export``): the aligned pipeline (LoRA merged) as a diffusers folder in
   ``<workdir>/export``.

Returns a summary dict (also ``<workdir>/summary.json``). Checkpoint and metric steps count iterations;
``optimizer_steps`` counts the updates applied (skipped non-finite updates excluded).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from sc_dpo_jax import parallel
from sc_dpo_jax.data import device as device_lib
from sc_dpo_jax.data import pipeline as data_pipeline
from sc_dpo_jax.data import schema, synthetic
from sc_dpo_jax.parallel import multihost
from sc_dpo_jax.rewards import terms
from sc_dpo_jax.train import ddpo, guard, harness, optim, outputs, sharded_state, sources
from sc_dpo_jax.train import state as state_lib
from sc_dpo_jax.train import advantages as advantages_lib
from sc_dpo_jax.train.advantages import PerPromptAdvantages
from sc_dpo_jax.train.base_model import load_models

METHOD = "shielddiff_rl"
CLIP_TEXTS = ("prompt", "rewrite")   # reward.clip_text: what the CLIP term scores images against
EXTRA_ADVANTAGES = "advantages"

# -- prompts ------------------------------------------------------------------------------------------------------


def prompts_per_process(config: ml_collections.ConfigDict) -> int:
  """Prompts each process reads per iteration; checks the batch keys of ``config.rl`` (errors name them)."""
  r = config.rl
  samples, per_prompt, updates = int(r.samples_per_iteration), int(r.samples_per_prompt), int(r.updates_per_iteration)
  if samples < 1 or per_prompt < 1 or updates < 1 or int(r.inner_epochs) < 1:
    raise ValueError(f"config.rl.samples_per_iteration ({samples}), samples_per_prompt ({per_prompt}), "
                     f"updates_per_iteration ({updates}) and inner_epochs ({r.inner_epochs}) must be >= 1")
  if r.advantages not in advantages_lib.ADVANTAGES:
    raise ValueError(f"config.rl.advantages = {r.advantages!r}; choose one of {advantages_lib.ADVANTAGES}")
  if r.advantages == "group" and per_prompt < 2:
    raise ValueError(f"config.rl.advantages = 'group' compares the samples of each prompt: it needs "
                     f"config.rl.samples_per_prompt >= 2 (got {per_prompt})")
  if config.reward.normalize not in advantages_lib.NORMALIZE:
    raise ValueError(f"config.reward.normalize = {config.reward.normalize!r}; choose one of "
                     f"{advantages_lib.NORMALIZE}")
  advantages_lib.negative_weight(r.negative_advantage_weight)
  if config.reward.clip_text not in CLIP_TEXTS:
    raise ValueError(f"config.reward.clip_text = {config.reward.clip_text!r}; choose one of {CLIP_TEXTS}")
  if samples % per_prompt:
    raise ValueError(f"config.rl.samples_per_iteration = {samples} is not a multiple of "
                     f"config.rl.samples_per_prompt = {per_prompt}")
  rewrite = int(r.rewrite_samples)
  if not 0 <= rewrite < per_prompt:
    raise ValueError(f"config.rl.rewrite_samples = {rewrite}: of each prompt's config.rl.samples_per_prompt = "
                     f"{per_prompt} samples, how many are drawn under its safe rewrite; it must be in "
                     f"[0, {per_prompt - 1}] (at least one sample of each prompt is the policy's own)")
  if (samples * jax.process_count()) % updates:
    raise ValueError(f"config.rl.samples_per_iteration = {samples} x {jax.process_count()} processes is not "
                     f"divisible into config.rl.updates_per_iteration = {updates} minibatches")
  return samples // per_prompt


def open_prompts(config: ml_collections.ConfigDict, workdir: str, pipe) -> data_pipeline.DataIterator:
  """This process's iterator over the prompt dataset ``data.train`` (or the synthetic prompts of a tiny run)."""
  d = config.data
  source = sources.open_train_source(
      config, workdir, kind=schema.PROMPT, name="synthetic_prompts",
      write_synthetic=lambda folder: synthetic.write_synthetic_prompts(folder,
                                                                       num_prompts=int(d.synthetic_prompts)),
      what="a prompt dataset folder (python -m sc_dpo_jax.data.prepare makes one from an I2P-style CSV or a text "
           "file)", trainer="the RL trainer samples its own images and needs a prompt dataset")
  if int(config.rl.rewrite_samples) and not source.spec.has_chosen_prompt:
    raise ValueError(f"config.rl.rewrite_samples = {config.rl.rewrite_samples} draws samples under each prompt's "
                     f"safe rewrite, but the prompt dataset {config.data.train or source.name} has none (the field "
                     f"'prompt_chosen', record spec has_chosen_prompt; data.curate.write_prompts(..., rewrites=...) "
                     f"writes it). Set --config.rl.rewrite_samples=0 or give a dataset with rewrites")
  if config.reward.clip_text == "rewrite" and float(config.reward.weights.get("clip_score", 0.0)) and \
      not source.spec.has_chosen_prompt:
    raise ValueError(f"config.reward.clip_text = 'rewrite' scores the CLIP term against each prompt's safe rewrite, "
                     f"but the prompt dataset {config.data.train or source.name} has none (the field "
                     f"'prompt_chosen'). Set --config.reward.clip_text=prompt or give a dataset with rewrites")
  return data_pipeline.DataIterator(
      source, batch_size=prompts_per_process(config), seed=config.seed, shuffle_buffer=int(d.shuffle_buffer),
      skip_bad_records=bool(d.skip_bad_records), tokenizer=pipe.tokenizer)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The checks that need no model, run before loading one (a Stable Diffusion load takes a while): batch
  sizes, reward terms, and the folders a non-tiny run requires (errors name the key)."""
  prompts_per_process(config)
  weights = terms.reward_weights(config)
  if config.model.tiny:
    return
  r = config.reward
  if "clip_score" in weights and not r.clip_folder:
    raise ValueError("config.reward.clip_folder is empty: set it to a CLIPModel folder (both towers with "
                     "projections and the tokenizer files), or set reward.weights.clip_score to 0")
  if "safety_cost" in weights and not r.cost_model_folder:
    raise ValueError("config.reward.cost_model_folder is empty: set it to a safety cost model folder, or set "
                     "reward.weights.safety_cost to 0")
  if not config.data.train:
    raise ValueError("config.data.train is empty: set --config.data.train to a prompt dataset folder")


# -- the two programs ---------------------------------------------------------------------------------------------


def ddpo_config(config: ml_collections.ConfigDict) -> ddpo.DDPOConfig:
  """``config.rl``'s DDPO knobs as ``train.ddpo.DDPOConfig`` (its checks, e.g. eta > 0, run when used)."""
  r = config.rl
  for key in ("num_steps", "guidance_scale"):
    if r[key] is None:
      raise ValueError(f"config.rl.{key} is None: set it (the toy demo fills it from config.sampling)")
  return ddpo.DDPOConfig(num_steps=int(r.num_steps), eta=float(r.eta), guidance_scale=float(r.guidance_scale),
                         clip_range=float(r.clip_range), adv_clip=float(r.adv_clip),
                         timestep_fraction=float(r.timestep_fraction), kl_weight=float(r.get("kl_weight", 0.0)))


def make_sample_step(pipe, config: ddpo.DDPOConfig):
  """``(state, frozen, batch, rng) -> (Samples, text states)``: the prompts' ``input_ids`` encoded by the frozen
  text encoder, initial noise drawn from ``rng``, and the policy's DDIM trajectories (``train.ddpo``). With
  ``batch["behaviour_ids"]`` (rewrite exploration) the trajectories are drawn under those texts and the
  log-probabilities are the policy's under ``input_ids``."""
  sampler = ddpo.make_ddpo_sampler(pipe.unet, pipe.vae, pipe.schedule, config)
  text_encoder = pipe.text_encoder
  size = int(pipe.unet.config.sample_size)
  latent_shape = (size, size, int(pipe.unet.config.in_channels))

  def sample(state, frozen, batch, rng):
    ids = batch["input_ids"]
    text = text_encoder.apply({"params": frozen["text_encoder"]}, ids).last_hidden_state
    noise_rng, step_rng = jax.random.split(rng)
    latents = jax.random.normal(noise_rng, (ids.shape[0],) + latent_shape, jnp.float32)
    uncond = frozen[state_lib.EMPTY_TEXT].astype(text.dtype)
    behaviour = None
    if "behaviour_ids" in batch:
      behaviour = text_encoder.apply({"params": frozen["text_encoder"]}, batch["behaviour_ids"]).last_hidden_state
    return sampler(state, frozen, latents, text, uncond, step_rng, behaviour_text=behaviour), text

  return sample


def make_update_step(pipe, config: ddpo.DDPOConfig):
  """``(state, frozen, batch, rng) -> (state, metrics)``: one DDPO update on the minibatch ``batch["rows"]`` of
  the iteration's samples (trajectories ``[S(+1), B, ...]``, advantages and text ``[B, ...]``), in the NaN
  guard. Selecting rows inside the program keeps one compiled update for every minibatch."""
  update = ddpo.make_ddpo_update(pipe.unet, pipe.schedule, config)

  def step(state, frozen, batch, rng):
    rows = batch["rows"]
    text = batch["text"][rows]
    minibatch = {"latents": jnp.take(batch["latents"], rows, axis=1),
                 "log_probs": jnp.take(batch["log_probs"], rows, axis=1),
                 "timesteps": batch["timesteps"], "prev_timesteps": batch["prev_timesteps"],
                 "advantages": batch["advantages"][rows], "text": text,
                 "uncond_text": frozen[state_lib.EMPTY_TEXT].astype(text.dtype)}
    return update(state, frozen, minibatch, rng)

  return guard.skip_nonfinite(step)


def reward_texts(config: ml_collections.ConfigDict, parts: Mapping[str, Any], host: Mapping[str, Any],
                 samples_per_prompt: int) -> Optional[Dict[str, List[str]]]:
  """Per reward term, the texts it scores the samples against when not their prompts: with
  ``reward.clip_text = "rewrite"`` the CLIP term reads each prompt's safe rewrite (``host["prompt_chosen"]``,
  repeated for the prompt's ``samples_per_prompt`` samples as the prompts are). None: every term reads the
  prompts."""
  if config.reward.clip_text != "rewrite" or "clip_score" not in parts:
    return None
  return {"clip_score": [str(p) for p in host["prompt_chosen"] for _ in range(samples_per_prompt)]}


def _rewrite_stats(reward: np.ndarray, advantages: np.ndarray, rewrite_rows: np.ndarray) -> Dict[str, float]:
  """How the samples drawn under the rewrites compare with the policy's own: reward gap and mean advantages."""
  return {"rewrite/reward_gap": float(reward[rewrite_rows].mean() - reward[~rewrite_rows].mean()),
          "rewrite/advantage_mean": float(advantages[rewrite_rows].mean()),
          "rewrite/policy_advantage_mean": float(advantages[~rewrite_rows].mean())}


def _dim1(sharding: NamedSharding) -> NamedSharding:
  """``sharding`` (batch on dim 0) moved to dim 1, for trajectory arrays ``[S, B, ...]``."""
  return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# -- the run ------------------------------------------------------------------------------------------------------


def train_rl(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  t_start = time.time()
  c = config
  check_config(c)
  ddpo_cfg = ddpo_config(c)
  mesh = parallel.make_mesh(c.mesh.to_dict())
  logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
  pipe = load_models(c, workdir)
  it = open_prompts(c, workdir, pipe)
  samples_per_prompt = int(c.rl.samples_per_prompt)
  global_samples = int(c.rl.samples_per_iteration) * jax.process_count()
  updates = int(c.rl.updates_per_iteration)
  minibatch = global_samples // updates
  reward_fn = terms.make_reward(c, pipe)
  weights = {name: weight for name, (weight, _) in reward_fn.parts.items()}
  group_mode = c.rl.advantages == "group"
  rewrite_samples = int(c.rl.rewrite_samples)
  negative_weight = advantages_lib.negative_weight(c.rl.negative_advantage_weight)
  # Rewrite exploration: the last rewrite_samples of each prompt's samples_per_prompt rows are drawn under the
  # prompt's safe rewrite (samples are laid out prompt by prompt, on every process alike).
  rewrite_rows = (np.arange(global_samples) % samples_per_prompt) >= samples_per_prompt - rewrite_samples
  tracker = PerPromptAdvantages(buffer_size=int(c.rl.advantage_buffer), min_count=int(c.rl.advantage_min_count))

  tx, lr_schedule = optim.make_optimizer(c.optim, total_batch_size=minibatch)     # samples per update
  logging.info("optimizer: %s", optim.describe(c.optim, total_batch_size=minibatch))
  rng = jax.random.PRNGKey(c.seed)
  empty_text = np.asarray(pipe.encode_prompts([""]))
  extra = {}
  rules = parallel.rules_from_config(c.mesh_rules)
  for name, module in (("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
    plan = parallel.plan_shardings(pipe.params[name], mesh, rules, specs=parallel.module_logical_specs(module),
                                   min_shard_size=c.min_shard_size)
    extra[name] = (pipe.params[name], plan.shardings)
  lora = ({k: c.lora[k] for k in ("rank", "alpha", "targets")} if c.lora.enabled else None)
  state, frozen, shardings = sharded_state.sharded_train_state(
      pipe.params["unet"], tx, lr_schedule, mesh=mesh, param_specs=parallel.module_logical_specs(pipe.unet),
      rules=rules, min_shard_size=c.min_shard_size, lora=lora, rng=jax.random.fold_in(rng, 1), empty_text=empty_text,
      frozen_extra=extra)
  # Full fine-tuning: DDPO has no reference model to keep, unless the KL to it is trained (rl.kl_weight > 0).
  if state_lib.REF_UNET in frozen and not ddpo_cfg.kl_weight > 0:
    del frozen[state_lib.REF_UNET]
    shardings = shardings._replace(frozen={k: v for k, v in shardings.frozen.items() if k != state_lib.REF_UNET})

  rep = parallel.replicated(mesh)
  per_sample = shardings.batch
  trajectory = _dim1(per_sample)
  samples_sh = ddpo.Samples(latents=trajectory, timesteps=rep, prev_timesteps=rep, log_probs=trajectory,
                            images=per_sample)
  sample_batch_sh = {"input_ids": per_sample, **({"behaviour_ids": per_sample} if rewrite_samples else {})}
  sample_step = parallel.Step(parallel.with_batch_constraints(make_sample_step(pipe, ddpo_cfg), mesh),
                              dict(in_shardings=(shardings.state, shardings.frozen, sample_batch_sh, rep),
                                   out_shardings=(samples_sh, per_sample)))
  update_batch_sh = {"latents": trajectory, "log_probs": trajectory, "timesteps": rep, "prev_timesteps": rep,
                     "advantages": per_sample, "text": per_sample, "rows": rep}
  update_step = parallel.make_sharded_step(make_update_step(pipe, ddpo_cfg), shardings, batch_sharding=update_batch_sh)

  # Resume.
  iterations = int(c.train.iterations)
  run = harness.Run(c, workdir, name="rl", unit="it", total=iterations)
  restored = run.resume(abstract_state=_abstract(state, shardings.state), rng=rng)
  start = 0
  resumed: Dict[str, Any] = {}
  if restored is not None:
    if not restored.extra or EXTRA_ADVANTAGES not in restored.extra:
      raise ValueError(f"{run.ckpt.directory}/{restored.step} holds no per-prompt reward buffers (the 'extra' item "
                       f"{EXTRA_ADVANTAGES!r}): it was not written by the RL trainer; use another workdir")
    state, rng, start = restored.state, restored.rng, restored.step
    if restored.data_state is not None:
      it.restore(restored.data_state)
    tracker.load_state_dict(restored.extra[EXTRA_ADVANTAGES])
    resumed = {"iteration": start, "optimizer_steps": int(state.step), **tracker.stats(),
               "buffered_rewards": sum(len(v) for v in restored.extra[EXTRA_ADVANTAGES]["buffers"].values())}
    logging.info("resumed from iteration %d (%s): %s", start, run.ckpt.directory, resumed)
  config_json = harness.config_dict(c)

  # Compile both programs ahead of time, once.
  first = next(it)

  def sample_inputs(host):
    prompts = [p for p in host["prompt"] for _ in range(samples_per_prompt)]
    ids = np.repeat(np.asarray(host["input_ids"]), samples_per_prompt, axis=0)
    batch = {"input_ids": ids}
    if rewrite_samples:
      local = rewrite_rows[:len(ids)]
      batch["behaviour_ids"] = np.where(local[:, None], np.repeat(np.asarray(host["input_ids_chosen"]),
                                                                  samples_per_prompt, axis=0), ids)
    return prompts, device_lib.global_batch(batch, mesh)

  t0 = time.time()
  _, batch = sample_inputs(first)
  compiled_sample = sample_step.jitted.lower(state, frozen, batch, rng).compile()
  samples_abs, text_abs = compiled_sample.out_info
  update_abs = {"latents": samples_abs.latents, "log_probs": samples_abs.log_probs,
                "timesteps": samples_abs.timesteps, "prev_timesteps": samples_abs.prev_timesteps,
                "advantages": jax.ShapeDtypeStruct((global_samples,), jnp.float32), "text": text_abs,
                "rows": jax.ShapeDtypeStruct((minibatch,), jnp.int32)}
  update_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=update_batch_sh[k]) for k, v in update_abs.items()}
  compiled_update = update_step.jitted.lower(state, frozen, update_abs, rng).compile()
  compile_s = time.time() - t0
  logging.info("sampler and update compiled in %.1f s", compile_s)

  summary: Dict[str, Any] = {"workdir": str(workdir), "method": METHOD, "start_iteration": start,
                             "reward": {n: w for n, (w, _) in reward_fn.parts.items()},
                             "compile_s": round(compile_s, 2)}
  if resumed:
    summary["resumed"] = resumed
  run.open(start)
  process = jax.process_index()
  final = start
  with run:
    host = first
    for iteration in run.indices(start):
      t0 = time.time()
      prompts, batch = sample_inputs(host)
      key = jax.random.fold_in(rng, iteration)
      sample_key, update_key = jax.random.split(key)
      samples, text = compiled_sample(state, frozen, batch, sample_key)
      images = multihost.local_rows(samples.images, mesh)
      t1 = time.time()
      _, info = reward_fn(images, prompts,
                          texts=reward_texts(c, reward_fn.parts, host, samples_per_prompt))
      all_prompts, gathered = multihost.gather(prompts, info)
      # The reward of the global batch, each term scaled (reward.normalize), then the advantages (rl.advantages).
      reward, scales = advantages_lib.normalised_reward(gathered, weights, str(c.reward.normalize))
      if group_mode:
        advantages, advantage_stats = advantages_lib.group_advantages(all_prompts, reward)
      else:
        advantages, advantage_stats = tracker(all_prompts, reward), {}
      if negative_weight != 1.0:
        advantages = advantages_lib.weigh_negative(advantages, negative_weight)
      n = len(prompts)
      local_advantages = advantages[process * n:(process + 1) * n]
      t2 = time.time()
      update_batch = {"latents": samples.latents, "log_probs": samples.log_probs, "timesteps": samples.timesteps,
                      "prev_timesteps": samples.prev_timesteps, "text": text,
                      "advantages": jax.make_array_from_process_local_data(per_sample, local_advantages)}
      pending = []
      for epoch in range(int(c.rl.inner_epochs)):
        order = np.random.default_rng([int(c.seed), iteration, epoch]).permutation(global_samples).astype(np.int32)
        for u in range(updates):
          rows = parallel.shard_tree(order[u * minibatch:(u + 1) * minibatch], rep)
          state, metrics = compiled_update(state, frozen, dict(update_batch, rows=rows),
                                           jax.random.fold_in(update_key, epoch * updates + u))
          pending.append(metrics)
      # Every update's metrics, counted by the NaN guard (raises after K skipped in a row).
      update_metrics = [harness.read_metrics(iteration * len(pending) + index, metrics, run.counter)
                        for index, metrics in enumerate(pending)]
      t3 = time.time()
      means = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
      means.update({"reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
                    **{f"reward/{k}": float(np.mean(v)) for k, v in gathered.items()},
                    **{f"reward/{k}_scale": v for k, v in scales.items()},
                    **{f"advantages/{k}": v for k, v in advantage_stats.items()},
                    "advantages/min": float(advantages.min()), "advantages/max": float(advantages.max()),
                    **(_rewrite_stats(reward, advantages, rewrite_rows) if rewrite_samples else {}),
                    **{f"advantages/{k}": v for k, v in tracker.stats().items()},
                    "images_per_s": global_samples / (t3 - t0), "time/sample_s": t1 - t0,
                    "time/reward_s": t2 - t1, "time/update_s": t3 - t2})
      run.window.add_host(means)
      due = run.tick(iteration + 1)
      final = due.index
      if due.log:
        logged, _, _ = run.window.means()
        logged.update({"optimizer_steps": int(state.step), "skipped_updates_total": run.counter.total,
                       **it.metrics()})
        run.log(due.index, logged, reward=f"{logged['reward_mean']:.4f}", images_s=f"{logged['images_per_s']:.1f}")
      if due.sample:
        outputs.sample_grid(pipe, state, frozen, c, workdir, due.index, writer=run.writer)
      if due.checkpoint:
        run.ckpt.save(due.index, state=state, rng=rng, data_state=it.state(), config=config_json,
                      extra={EXTRA_ADVANTAGES: tracker.state_dict()})
      if due.stop:
        run.stopped(due.index)
        break
      if not due.last:
        host = next(it)
  summary.update({"final_iteration": final, "optimizer_steps": int(state.step), **run.end(),
                  "bad_records": it.bad_records, "advantages": tracker.stats()})
  return outputs.finish_run(run, pipe, state, frozen, summary, t_start)
