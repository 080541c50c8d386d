"""Gradient accumulation in the DPO-family step (``make_dpo_step(..., grad_accum_steps=k)``) and the official
SD1.5 recipes that use it (``configs/diffusion_dpo.py:sd15_official``, ``configs/duo.py:sd15_official``).

Equivalence: on the tiny UNet, 8 pairs (the chosen latents and prompts of ``test_dpo_steps``, rejected latents
drawn independently), one step over the 8 pairs as k = 4 micro-batches of 2 must give the update and the
metrics of one pass over the 8 (same rng, so the same t, noise and prompt dropout per pair). The optimiser is
plain SGD with learning rate 1, so the parameter change IS minus the gradient (AdamW's first step is about
lr * sign(g) and would hide gradient differences), and the LoRA B matrices start random (std 0.5, not zero), so
policy and reference differ and every pair has its own reward.

Tolerance: RTOL = 5e-5 of the largest update entry, and relative for each metric; a wrong draw, slice or
weight moves them by 1e-2 or more. Float32 sums in another order: the weight gradients sum over images and
positions (16 images at once against 4 per micro-batch, then 4 partial sums), and XLA's kernels for 4 and 16
images round differently, so each pair's errors and gradients move by about an ulp. Cancellation magnifies
that relative to the result: rewards are differences of errors (~0.1 of ~1.4), the gradient a sum of terms
of both signs, DUO's prior term a difference of two UNet outputs. Measured on CPU (updates / worst metric):
Diffusion-DPO 7.1e-6 / 7.1e-6, DUO 1.6e-5 / 5.6e-6, SC-DPO 8.1e-6 / 1.1e-5 (the test prints them). The data
keep cancellation moderate: the LoRA B matrices are random at std 0.5 (at 0.05 the rewards are ~5e-3 and the
reward margin moved 1.2e-4) and the rejected latents independent of the chosen ones (``test_dpo_steps``'s
pairs differ by a small pattern, their gradients nearly cancel and the update moved 2.6e-5, while the scan
matched the mean of four separately compiled 2-pair gradients to 8e-7: the difference is the UNet's rounding,
not the accumulation).

SC-DPO's Dynamic Focusing normalises its weights over the WHOLE batch under accumulation too (module docstring
of ``train/dpo_steps.py``), so it is held to the same tolerance. Normalising per micro-batch instead (measured
once on this test's data) moved the update by 52% of its largest entry, the gradient norm by 17% and the loss
by 2.4%: another objective, not rounding (``test_sc_dpo_focusing_is_normalised_over_the_whole_batch``).
"""
import functools
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sc_dpo_jax import losses
from sc_dpo_jax.train import dpo_inputs, dpo_steps, grad_accum, optim
from sc_dpo_jax.train import state as state_lib
from tests.train.test_dpo_steps import PAIRS, RNG, _world

pytestmark = pytest.mark.xdist_group("grad_accum")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = 4          # micro-batches of PAIRS / K = 2 pairs
RTOL = 5e-5    # of the largest |update| entry, and of each metric (float32 rounding: 5e-6 to 1.6e-5 measured)
# LLVM optimisations off: 40% less compile time for the tiny UNet's step; both programs of a comparison use it
FAST_COMPILE = {"xla_backend_optimization_level": 0}
LORA_B_SCALE = 0.5   # std of the random LoRA B entries: rewards well away from 0 (docstring)

# name -> (objective config, LoRA config)
RUNS = {
    # prompt dropout 0.5: some pairs lose their prompt, and the draw must follow the pair into its micro-batch
    "diffusion_dpo": (dict(method="diffusion_dpo", beta=2000.0, prompt_dropout=0.5),
                      dict(rank=4, alpha=4, targets="attention")),
    "duo": (dict(method="duo", beta=500.0, duo_lambda=1000.0), dict(rank=4, alpha=4, targets="self_attention")),
    "sc_dpo": (dict(method="sc_dpo", beta=2000.0, prompt_dropout=0.0, cost_margin_scale=1.0, focus_gamma=2.0),
               dict(rank=4, alpha=4, targets="attention")),
}


@functools.lru_cache(maxsize=None)
def _batch():
  """8 pairs: test_dpo_steps' chosen latents, prompts and costs; rejected latents independent of them."""
  _, _, _, batch, _ = _world()
  rng = np.random.RandomState(5)
  return dict(batch, latents_rejected=rng.randn(*batch["latents_rejected"].shape).astype(np.float32))


def _state(name):
  """(state, frozen) with SGD(1) and LoRA B random (policy != reference)."""
  _, _, params, _, empty = _world()
  tx, lr_schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  state, frozen = state_lib.create_train_state(params, tx, lr_schedule, lora=RUNS[name][1],
                                               rng=jax.random.PRNGKey(1), empty_text=empty)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state.params)
  keys = iter(jax.random.split(jax.random.PRNGKey(2), len(leaves)))
  values = [LORA_B_SCALE * jax.random.normal(next(keys), v.shape, v.dtype) if "lora_b" in jax.tree_util.keystr(p)
            else v
            for p, v in leaves]
  params = jax.tree_util.tree_unflatten(treedef, values)
  return state.replace(params=params, opt_state=tx.init(params)), frozen


def _prepare(frozen, raw, rng):
  """A deterministic prepare function on raw fields (records its micro-batch sizes when traced)."""
  del frozen, rng
  _prepare.sizes.append(raw["raw_chosen"].shape[0])
  return {"latents_chosen": raw["raw_chosen"] * 0.5, "latents_rejected": raw["raw_rejected"] * 0.5,
          "text_states": raw["text_states"]}


_prepare.sizes = []


@functools.lru_cache(maxsize=None)
def _compare(name):
  """One step of run ``name`` as one pass and as K micro-batches; the differences and timings."""
  unet, schedule, _, _, _ = _world()
  batch = _batch()
  objective = RUNS[name][0]
  if name != "sc_dpo":
    batch = {k: v for k, v in batch.items() if k not in ("cost_chosen", "cost_rejected")}
  out = {"seconds": {}}
  results = {}
  for k in (1, K):
    state, frozen = _state(name)
    before = jax.device_get(state.params)
    step_batch, prepare = batch, None
    if name == "diffusion_dpo" and k == K:   # the accumulated step also runs a prepare function per micro-batch
      step_batch = {"raw_chosen": batch["latents_chosen"] * 2.0, "raw_rejected": batch["latents_rejected"] * 2.0,
                    "text_states": batch["text_states"]}
      prepare = _prepare
    step = dpo_steps.make_dpo_step(unet, schedule, objective, grad_accum_steps=k, prepare=prepare)
    t0 = time.time()
    compiled = step.jitted.lower(state, frozen, step_batch, RNG).compile(compiler_options=FAST_COMPILE)
    new_state, metrics = jax.block_until_ready(compiled(state, frozen, step_batch, RNG))
    out["seconds"][k] = round(time.time() - t0, 1)
    update = jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(new_state.params), before)
    results[k] = (update, jax.device_get(metrics))
  (update_1, metrics_1), (update_k, metrics_k) = results[1], results[K]
  scale = max(float(np.abs(u).max()) for u in jax.tree.leaves(update_1))
  out["scale"] = scale
  out["update_rel"] = max(float(np.abs(a - b).max()) for a, b in
                          zip(jax.tree.leaves(update_1), jax.tree.leaves(update_k))) / scale
  out["metrics_1"], out["metrics_k"] = metrics_1, metrics_k
  out["metric_rel"] = {key: abs(float(metrics_k[key]) - float(metrics_1[key])) / max(abs(float(metrics_1[key])), 1e-6)
                       for key in metrics_1}
  print(f"{name}: one pass {out['seconds'][1]} s, {K} micro-batches {out['seconds'][K]} s (compile included); "
        f"max |update difference| / max |update| = {out['update_rel']:.2e}; max metric relative difference "
        f"{max(out['metric_rel'].values()):.2e} ({max(out['metric_rel'], key=out['metric_rel'].get)})")
  return out


def _check_equivalent(out):
  assert out["scale"] > 1e-6   # the step moved the adapters
  assert out["update_rel"] < RTOL, out["update_rel"]
  assert set(out["metrics_1"]) == set(out["metrics_k"])
  bad = {k: v for k, v in out["metric_rel"].items() if v >= RTOL}
  assert not bad, bad


def test_diffusion_dpo_accumulated_equals_one_pass_with_lora_and_per_micro_batch_prepare():
  _prepare.sizes.clear()
  out = _compare("diffusion_dpo")
  _check_equivalent(out)
  assert 0.0 < out["metrics_1"]["implicit_accuracy"] < 1.0   # pairs differ: the metrics are not trivial
  assert set(_prepare.sizes) == {PAIRS // K}   # prepare saw micro-batches only


@pytest.mark.parametrize("name", [pytest.param("duo", marks=pytest.mark.slow),       # make test-slow, for time;
                                  pytest.param("sc_dpo", marks=pytest.mark.slow)])   # Diffusion-DPO's stays
def test_accumulated_equals_one_pass(name):
  out = _compare(name)
  _check_equivalent(out)
  if name == "duo":
    assert out["metrics_1"]["loss_prior"] > 0
  else:
    assert out["metrics_1"]["focus_weight_std"] > 0.05   # the focusing weights are not all 1


def test_sc_dpo_focusing_is_normalised_over_the_whole_batch():
  """What per-micro-batch normalisation would change: the same pairs' weights, renormalised per 2 pairs."""
  rng = np.random.RandomState(0)
  z = jnp.asarray(rng.randn(PAIRS) * 2.0, jnp.float32)
  whole = np.asarray(losses.focusing_weights(z, 2.0))
  per_micro = np.concatenate([np.asarray(losses.focusing_weights(z[m::K], 2.0)) for m in range(K)])
  order = np.concatenate([np.arange(m, PAIRS, K) for m in range(K)])
  assert np.abs(per_micro - whole[order]).max() > 0.1   # not a rounding difference: another objective


def test_batch_split_errors_name_the_keys():
  assert grad_accum.check_batch_split(2048, 256, 1) == 8
  assert grad_accum.check_batch_split(2048, 16, 16) == 128
  with pytest.raises(ValueError, match=r"config.data.batch_size = 10 pairs is not divisible by "
                                       r"config.train.grad_accum_steps \(4\) x the data-parallel devices "
                                       r"\(config.mesh data x fsdp = 1\) = 4.*multiple of 4 \(e.g. 12\)"):
    grad_accum.check_batch_split(10, 4)
  with pytest.raises(ValueError, match=r"batch_size = 8 .*grad_accum_steps \(2\).*fsdp = 8\) = 16"):
    grad_accum.check_batch_split(8, 2, 8)
  with pytest.raises(ValueError, match=r"config.train.grad_accum_steps = 0 must be an integer >= 1"):
    grad_accum.check_batch_split(8, 0)
  unet, schedule, _, batch, _ = _world()
  with pytest.raises(ValueError, match=r"config.train.grad_accum_steps = 0"):
    dpo_steps.make_dpo_step(unet, schedule, RUNS["duo"][0], grad_accum_steps=0)
  state, frozen = _state("duo")
  for k, d in ((3, 1), (4, 4)):   # 8 pairs: not 3 micro-batches, not 4 micro-batches over 4 devices
    step = dpo_steps.dpo_step_fn(unet, schedule, RUNS["duo"][0], grad_accum_steps=k, data_parallel=d)
    with pytest.raises(ValueError, match=r"config.data.batch_size = 8 pairs is not divisible by "
                                         rf"config.train.grad_accum_steps \({k}\)"):
      jax.eval_shape(step, state, frozen, batch, RNG)   # traced, not compiled


def test_duo_given_prompts_follow_each_pair_into_its_micro_batch():
  """DUO with each image under its own prompt (duo_prompts="given") and prompt dropout: the inputs of each
  micro-batch (its rows of the batch and of the whole batch's draws, as ``accumulated_gradients`` slices them)
  are the one-pass inputs' rows of its pairs, text rows included; without the chosen prompts' states the
  accumulated step fails naming the field."""
  unet, schedule, _, _, empty = _world()
  chosen_text = np.random.RandomState(12).randn(*_batch()["text_states"].shape).astype(np.float32)
  batch = dict(_batch(), text_states_chosen=chosen_text)
  batch = {k: v for k, v in batch.items() if k not in ("cost_chosen", "cost_rejected")}
  c = dpo_steps.resolve_config(dict(RUNS["duo"][0], duo_prompts="given", prompt_dropout=0.5))
  frozen = {"empty_text": empty}
  noise = dpo_inputs.draw_noise(schedule, c, RNG, PAIRS, batch["latents_chosen"].shape[1:], 0.5)
  assert 0 < int(np.asarray(noise.drop).sum()) < PAIRS
  whole = dpo_inputs.duo_inputs(schedule, c, batch, frozen, RNG, 0.5, noise)
  micro, micro_noise = grad_accum.split_micro_batches(batch, K), grad_accum.split_micro_batches(noise, K)
  for m in range(K):
    part = dpo_inputs.duo_inputs(schedule, c, {k: v[m] for k, v in micro.items()}, frozen, RNG, 0.5,
                                 dpo_inputs.Noise(*(x[m] for x in micro_noise)))
    rows = np.arange(m, PAIRS, K)
    for j, block in enumerate(np.split(np.asarray(part.text), 3)):      # x+, x-, prior rows
      np.testing.assert_array_equal(block, np.asarray(whole.text)[j * PAIRS + rows], err_msg=f"{m}, {j}")
  state, frozen_state = _state("duo")
  step = dpo_steps.dpo_step_fn(unet, schedule, c, grad_accum_steps=K)
  with pytest.raises(KeyError, match=r"has no 'text_states_chosen'.*prompt_chosen"):
    jax.eval_shape(step, state, frozen_state, {k: v for k, v in batch.items() if k != "text_states_chosen"}, RNG)


def test_sc_dpo_retention_with_focusing_is_refused_under_accumulation():
  """Accumulation weighs SC-DPO's micro-batches by their focusing mass: exact for the preference term, not for
  the retention term, so the combination is refused (naming the keys) instead of training something else."""
  unet, schedule, _, _, _ = _world()
  objective = dict(RUNS["sc_dpo"][0], retention="sft", retention_weight=10.0)
  with pytest.raises(ValueError, match=r"retention terms \('sft'.*focus_gamma = 2.0.*grad_accum_steps = 4"):
    dpo_steps.dpo_step_fn(unet, schedule, objective, grad_accum_steps=K)
  with pytest.raises(ValueError, match=r"preserve_weight 5.0\) with Dynamic Focusing"):   # preservation alone too
    dpo_steps.dpo_step_fn(unet, schedule, dict(RUNS["sc_dpo"][0], preserve_weight=5.0), grad_accum_steps=K)
  dpo_steps.dpo_step_fn(unet, schedule, objective, grad_accum_steps=1)                  # one pass: fine
  dpo_steps.dpo_step_fn(unet, schedule, dict(objective, focus_gamma=0.0), grad_accum_steps=K)   # equal masses


def test_micro_batches_are_strided():
  x = np.arange(12)
  np.testing.assert_array_equal(grad_accum.split_micro_batches({"x": x}, 3)["x"], [[0, 3, 6, 9], [1, 4, 7, 10],
                                                                                   [2, 5, 8, 11]])


# ------------------------------------------------------------------------------------------ official recipes

def _config(file, variant):
  spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(file)[:-3]}", os.path.join(ROOT, file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(variant)


def test_diffusion_dpo_sd15_official_recipe():
  module, c = _config("configs/diffusion_dpo.py", "sd15_official")
  assert c.objective.method == "diffusion_dpo" and c.objective.beta == 5000.0
  assert c.objective.prompt_dropout == 0.2 and c.objective.max_timestep is None   # t uniform in [0, 1000)
  assert c.data.batch_size == 2048 and c.train.grad_accum_steps == 256
  assert grad_accum.check_batch_split(c.data.batch_size, c.train.grad_accum_steps, 1) == 8   # 8 pairs on one GPU
  assert c.data.resolution == 512 and c.data.random_flip
  assert not c.lora.enabled   # the full UNet
  assert c.train.steps == 2000
  o = c.optim
  assert (o.optimizer, o.b1, o.b2, o.weight_decay, o.grad_clip) == ("adamw", 0.9, 0.999, 1e-2, 1.0)
  assert (o.schedule, o.warmup_steps, o.lr_rule, o.learning_rate) == ("constant_with_warmup", 500, "per_sample", 1e-8)
  peak = optim.peak_learning_rate(o, total_batch_size=c.data.batch_size, beta=c.objective.beta)
  assert peak == pytest.approx(2.048e-5, rel=1e-12)
  _, schedule = optim.make_optimizer(o, total_batch_size=c.data.batch_size)
  assert float(schedule(0)) == 0.0 and float(schedule(250)) == pytest.approx(1.024e-5) and \
      float(schedule(1999)) == pytest.approx(2.048e-5)
  assert c.model.architecture == "sd15" and not c.model.tiny
  assert "--config=configs/diffusion_dpo.py:sd15_official" in module.__doc__ and "launch/tpu_pod.sh" in module.__doc__


def test_duo_sd15_official_recipe():
  module, c = _config("configs/duo.py", "sd15_official")
  obj = c.objective
  assert obj.method == "duo" and obj.beta == 500.0 and (obj.min_timestep, obj.max_timestep) == (0, 750)
  assert dpo_steps.duo_lambda(obj) == 1e6 * 500.0 / 100 and obj.duo_prompts == "empty"   # official default
  assert c.lora.enabled and (c.lora.rank, c.lora.alpha, c.lora.targets) == (32, 32, "self_attention")
  assert c.data.batch_size == 4 and c.train.grad_accum_steps == 1 and c.train.steps == 1000
  o = c.optim
  assert (o.optimizer, o.weight_decay, o.grad_clip, o.schedule, o.warmup_steps) == ("adamw", 1e-2, 1.0,
                                                                                     "constant", 0)
  assert optim.peak_learning_rate(o, total_batch_size=4, beta=obj.beta) == pytest.approx(3e-4 * 100 / 500)
  assert c.model.architecture == "sd15"
  assert "--config=configs/duo.py:sd15_official" in module.__doc__ and "launch/tpu_pod.sh" in module.__doc__


def test_default_configs_do_not_accumulate():
  for file in ("configs/diffusion_dpo.py", "configs/sc_dpo.py", "configs/duo.py"):
    for variant in ("tiny", "sd15", "sd21"):
      assert _config(file, variant)[1].train.grad_accum_steps == 1, (file, variant)
  _, sc = _config("configs/sc_dpo.py", "sd15_official")   # Diffusion-DPO's recipe with the SC-DPO loss
  assert sc.objective.method == "sc_dpo" and sc.data.batch_size == 2048 and sc.train.grad_accum_steps == 256
