"""The DPO-family train steps (train/dpo_steps.py) on a tiny UNet, with the optimiser and state they use.

Learning: 8 fixed pairs of 8x8x4 latents whose chosen and rejected images differ systematically (a shared
random part plus or minus a fixed wave pattern), random text states. Each method trains 30 steps (the fast suite trains only Diffusion-DPO; SC-DPO, DUO and
full fine-tuning learn under `make test-slow`, and the fast suite checks their metrics by tracing); the checks
are directions with margins (accuracy well above 0.5, loss well below its start), not exact numbers. Compiled
steps are shared through module-level caches: one program per method (compiling the tiny UNet's step takes
15-40 s of a CPU), so the file runs in about two minutes.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sc_dpo_jax import diffusion, models
from sc_dpo_jax.models import lora
from sc_dpo_jax.models.random_init import host_random_params
from sc_dpo_jax.train import dpo_inputs, dpo_steps, optim
from sc_dpo_jax.train import state as state_lib

# Under pytest-xdist, `--dist loadgroup` keeps this file in one worker, so the compiled steps are shared.
pytestmark = pytest.mark.xdist_group("dpo_steps")

PAIRS, TEXT_LEN, TEXT_DIM = 8, 4, 32
STEPS = 30
LAST = 5       # training metrics averaged over the last LAST steps (8 pairs each: 40 pair draws)
RNG = jax.random.PRNGKey(3)   # passed to every step; the step folds in state.step
# Evaluation: the 8 pairs x 4 copies under each of these keys = 128 fixed (pair, t, noise) draws. With a
# beta in the thousands one unlucky draw can weigh like ten (-log sigmoid is linear in a wrong margin), so the
# evaluation averages over several keys.
EVAL_RNGS = [jax.random.PRNGKey(k) for k in range(7, 11)]

# name -> (objective config, optimiser config, LoRA config or None)
RUNS = {
    "diffusion_dpo": (dict(method="diffusion_dpo", beta=2000.0),
                      dict(learning_rate=1e-3, schedule="constant_with_warmup", warmup_steps=3),
                      dict(rank=4, alpha=4, targets="attention")),
    "sc_dpo": (dict(method="sc_dpo", beta=5000.0, cost_margin_scale=1.0, focus_gamma=2.0),
               dict(learning_rate=1e-3), dict(rank=4, alpha=4, targets="attention")),
    "duo": (dict(method="duo", beta=500.0, duo_lambda=1000.0),
            dict(learning_rate=1e-3), dict(rank=4, alpha=4, targets="self_attention")),
    "full": (dict(method="diffusion_dpo", beta=5000.0), dict(learning_rate=1e-4), None),
}


@functools.lru_cache(maxsize=None)
def _world():
  unet = models.UNet2DConditionModel(models.tiny_config())
  params = host_random_params(unet, seed=0)
  rng = np.random.RandomState(0)
  shared = 0.5 * rng.randn(PAIRS, 8, 8, 4)
  xx = np.arange(8)[None, :, None]
  pattern = np.sin(xx * np.pi / 4)[..., None] * np.array([1.0, -1.0, 0.5, 0.0])   # [1, 8, 1, 4] -> [8, 8, 4]
  batch = dict(latents_chosen=(shared + pattern).astype(np.float32),
               latents_rejected=(shared - pattern).astype(np.float32),
               text_states=rng.randn(PAIRS, TEXT_LEN, TEXT_DIM).astype(np.float32),
               cost_chosen=np.full(PAIRS, -1.0, np.float32), cost_rejected=rng.uniform(0, 2, PAIRS).astype(np.float32))
  empty = rng.randn(1, TEXT_LEN, TEXT_DIM).astype(np.float32)
  return unet, diffusion.default_schedule(), params, batch, empty


def _fresh(name, params=None):
  """(state, frozen, step config) at step 0 for run ``name``."""
  unet, schedule, base, batch, empty = _world()
  objective, optim_config, lora_config = RUNS[name]
  tx, lr_schedule = optim.make_optimizer(dict(optim_config, weight_decay=0.0))
  state, frozen = state_lib.create_train_state(base if params is None else params, tx, lr_schedule,
                                               lora=lora_config, rng=jax.random.PRNGKey(1), empty_text=empty)
  return state, frozen, objective


@functools.lru_cache(maxsize=None)
def _run(name):
  """Trains run ``name`` for STEPS steps; returns what the tests inspect."""
  unet, schedule, params, batch, _ = _world()
  initial = jax.tree.map(np.array, params)
  state, frozen, objective = _fresh(name)
  step = dpo_steps.make_dpo_step(unet, schedule, objective)
  out = {"initial": initial, "step": step}
  if name == "diffusion_dpo":
    evaluate = dpo_steps.make_dpo_eval(unet, schedule, objective)
    eval_batch = {k: np.concatenate([v] * 4) for k, v in batch.items()}   # 32 draws of t and noise
    out["eval"] = evaluate
    out["before"] = _evaluate(evaluate, state, frozen, eval_batch)
  history = []
  for _ in range(STEPS):
    state, metrics = step(state, frozen, batch, RNG)
    history.append(metrics)
  out["history"] = jax.device_get(history)
  if name == "diffusion_dpo":
    out["after"] = _evaluate(evaluate, state, frozen, eval_batch)
  out["state"], out["frozen"] = state, frozen
  return out


def _evaluate(evaluate, state, frozen, batch):
  """Metrics averaged over the EVAL_RNGS draws."""
  runs = jax.device_get([evaluate(state, frozen, batch, key) for key in EVAL_RNGS])
  return {k: float(np.mean([m[k] for m in runs])) for k in runs[0]}


def _last(history, key):
  return float(np.mean([m[key] for m in history[-LAST:]]))


# --------------------------------------------------------------------------------------------- learning

def test_diffusion_dpo_learns_with_lora():
  run = _run("diffusion_dpo")
  before, after = run["before"], run["after"]
  # At step 0 the LoRA policy is the reference: every pair ties, the loss is log 2.
  assert before["implicit_accuracy"] == 0.0 and before["tie_fraction"] == 1.0
  np.testing.assert_allclose(before["loss"], math.log(2), rtol=1e-6)
  # On the same 128 fixed (pair, t, noise) draws after 30 steps:
  assert after["implicit_accuracy"] >= 0.8, after
  assert after["loss"] < math.log(2) - 0.15, after
  assert after["reward_margin"] > 0
  assert after["err_w"] < after["ref_err_w"]   # the chosen images became likelier
  history = run["history"]
  assert _last(history, "implicit_accuracy") >= 0.75
  assert _last(history, "loss") < history[0]["loss"] - 0.15


@pytest.mark.slow   # kept out of `make test` for time; `make test-slow` runs it
def test_sc_dpo_learns_with_lora():
  history = _run("sc_dpo")["history"]
  first = history[0]
  assert first["margin"] > 0.5   # the costs make the policy beat the reference by a safety gap
  assert first["margin_accuracy"] == 0.0   # z = inside - margin < 0 while policy == reference
  assert _last(history, "implicit_accuracy") >= 0.7
  assert _last(history, "margin_accuracy") >= 0.6
  # The focusing weights renormalise onto the hardest pairs as the others become easy, so their weighted
  # mean (``loss``) is not monotone; the per-pair objective -log sigmoid(z) is what must fall.
  assert _last(history, "loss_unweighted") < first["loss_unweighted"] - 0.5
  assert _last(history, "focus_weight_std") > 0.1 and _last(history, "focus_weight_max") > 1.5


@pytest.mark.slow   # kept out of `make test` for time; `make test-slow` runs it
def test_duo_learns_with_self_attention_lora():
  history = _run("duo")["history"]
  first = history[0]
  np.testing.assert_allclose(first["loss"], math.log(2), rtol=1e-3)
  assert first["loss_prior"] < 1e-10
  assert _last(history, "implicit_accuracy") >= 0.9
  assert _last(history, "loss_dpo") < 0.3
  assert _last(history, "loss") < 0.4
  # The prior term (pure noise, t = 999, empty prompt) keeps the policy near the reference there.
  assert 0 < _last(history, "loss_prior") < 1e-3


@pytest.mark.slow   # kept out of `make test` for time; `make test-slow` runs it
def test_full_finetuning_learns_against_a_frozen_copy():
  run = _run("full")
  history, state, frozen = run["history"], run["state"], run["frozen"]
  # policy and reference are equal copies (run by different parts of the program: rounding differs a little)
  np.testing.assert_allclose(history[0]["loss"], math.log(2), rtol=1e-3)
  assert _last(history, "implicit_accuracy") >= 0.75
  assert _last(history, "loss") < math.log(2) - 0.3
  jax.tree.map(np.testing.assert_array_equal, frozen[state_lib.REF_UNET], run["initial"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params,
                                       run["initial"]))
  assert max(moved) > 1e-4


# ------------------------------------------------------------------------------------- LoRA and reference

# The fast suite trains (and so compiles) only diffusion_dpo; the other methods run under `make test-slow`.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["diffusion_dpo", pytest.param("sc_dpo", marks=_SLOW),
                                  pytest.param("duo", marks=_SLOW)])
def test_lora_keeps_base_bit_identical(name):
  run = _run(name)
  jax.tree.map(np.testing.assert_array_equal, run["frozen"][state_lib.BASE_UNET], run["initial"])
  adapters = run["state"].params
  assert isinstance(adapters, lora.LoRA)
  b_values = [np.abs(np.asarray(v)).max() for k, v in jax.tree_util.tree_flatten_with_path(adapters)[0]
              if "lora_b" in jax.tree_util.keystr(k)]
  assert min(b_values) > 0   # every adapter was trained


def test_reference_ignores_the_adapters():
  run = _run("diffusion_dpo")
  before, after = run["before"], run["after"]
  # Same fixed noise before and after training: the reference errors are bit-identical, the policy's moved.
  for key in ("ref_err_w", "ref_err_l"):
    assert after[key] == before[key], key
  assert abs(after["err_w"] - before["err_w"]) > 1e-4
  frozen = run["frozen"]
  assert state_lib.reference_params(run["state"].params, frozen) is frozen[state_lib.BASE_UNET]


@pytest.mark.parametrize("name", ["diffusion_dpo", pytest.param("sc_dpo", marks=_SLOW),
                                  pytest.param("duo", marks=_SLOW), pytest.param("full", marks=_SLOW)])
def test_each_step_is_traced_once(name):
  assert _run(name)["step"].trace_count == 1, name
  if name == "diffusion_dpo":
    assert _run(name)["eval"].trace_count == 1


def _metric_shapes(name):
  """The metrics a step of run ``name`` returns, as shapes and dtypes (traced by eval_shape, not compiled)."""
  unet, schedule, _, batch, _ = _world()
  state, frozen, objective = _fresh(name)
  step = dpo_steps.make_dpo_step(unet, schedule, objective)
  _, metrics = jax.eval_shape(step.fn, state, frozen, batch, RNG)
  return metrics


def test_metrics_and_learning_rate():
  history = _run("diffusion_dpo")["history"]
  lrs = [float(m["learning_rate"]) for m in history]
  np.testing.assert_allclose(lrs[:5], [0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rtol=1e-6)   # warm-up of 3
  for m in history:
    assert np.isfinite(m["grad_norm"]) and m["grad_norm"] >= 0
  common = {"loss", "implicit_accuracy", "tie_fraction", "reward_w", "reward_l", "reward_margin", "err_w",
            "err_l", "ref_err_w", "ref_err_l", "grad_norm", "learning_rate"}
  assert common <= set(history[0])
  for m in history:
    assert all(np.shape(v) == () and np.asarray(v).dtype == np.float32 for v in m.values())
  extra = {"sc_dpo": {"margin", "margin_accuracy", "focus_weight_std", "cost_w", "cost_l"},
           "duo": {"loss_dpo", "loss_prior"}, "full": set()}
  for name, keys in extra.items():
    metrics = _metric_shapes(name)
    assert common | keys <= set(metrics), name
    assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values()), name


# ------------------------------------------------------------------------------------------------ noising

def _recover_noise(schedule, x_t, x0, t):
  a = np.sqrt(schedule.alphas_cumprod[t])[:, None, None, None]
  return (np.asarray(x_t) - a * x0) / np.sqrt(1 - a ** 2)


def test_dpo_noising_shares_t_and_noise_per_pair():
  _, schedule, _, batch, empty = _world()
  c = dpo_steps.resolve_config(dict(method="diffusion_dpo"))
  inputs = dpo_inputs.dpo_inputs(schedule, c, batch, {"empty_text": empty}, jax.random.PRNGKey(0), 0.0)
  t = np.asarray(inputs.t)
  np.testing.assert_array_equal(t[:PAIRS], t[PAIRS:])
  assert len(set(t[:PAIRS].tolist())) > 1   # but different pairs get different timesteps
  x0 = np.concatenate([batch["latents_chosen"], batch["latents_rejected"]])
  eps = _recover_noise(schedule, inputs.x, x0, t)
  np.testing.assert_allclose(eps[:PAIRS], eps[PAIRS:], atol=2e-4)
  np.testing.assert_allclose(np.asarray(inputs.target), eps, atol=2e-4)   # epsilon prediction
  np.testing.assert_array_equal(inputs.text, np.concatenate([batch["text_states"]] * 2))
  dropped = dpo_inputs.dpo_inputs(schedule, c, batch, {"empty_text": empty}, jax.random.PRNGKey(0), 1.0)
  np.testing.assert_array_equal(dropped.text, np.broadcast_to(empty, (2 * PAIRS, TEXT_LEN, TEXT_DIM)))
  half = dpo_inputs.dpo_inputs(schedule, c, batch, {"empty_text": empty}, jax.random.PRNGKey(0), 0.5)
  is_empty = np.all(np.asarray(half.text) == empty, axis=(1, 2))
  np.testing.assert_array_equal(is_empty[:PAIRS], is_empty[PAIRS:])   # a pair is dropped as a whole
  assert 0 < is_empty.sum() < 2 * PAIRS


def test_duo_noising_independent_t_shared_noise_and_prior_inputs():
  _, schedule, _, batch, empty = _world()
  c = dpo_steps.resolve_config(dict(method="duo"))
  inputs = dpo_inputs.duo_inputs(schedule, c, {k: batch[k] for k in ("latents_chosen", "latents_rejected")},
                                {"empty_text": empty}, jax.random.PRNGKey(0), 0.0)
  t = np.asarray(inputs.t)
  assert t.shape == (3 * PAIRS,)
  assert np.all((t[:2 * PAIRS] >= 0) & (t[:2 * PAIRS] < 750))
  assert np.any(t[:PAIRS] != t[PAIRS:2 * PAIRS])   # independent timesteps for x+ and x-
  np.testing.assert_array_equal(t[2 * PAIRS:], 999)
  x0 = np.concatenate([batch["latents_chosen"], batch["latents_rejected"]])
  eps = _recover_noise(schedule, inputs.x[:2 * PAIRS], x0, t[:2 * PAIRS])
  np.testing.assert_allclose(eps[:PAIRS], eps[PAIRS:], atol=2e-3)   # one noise per pair
  np.testing.assert_allclose(inputs.x[2 * PAIRS:], eps[:PAIRS], atol=2e-3)   # the prior input is that noise
  np.testing.assert_array_equal(inputs.text, np.broadcast_to(empty, (3 * PAIRS, TEXT_LEN, TEXT_DIM)))
  unsafe = dpo_steps.resolve_config(dict(method="duo", duo_prompts="unsafe"))    # both under the pair's prompt
  with_prompts = dpo_inputs.duo_inputs(schedule, unsafe, batch, {"empty_text": empty}, jax.random.PRNGKey(0), 0.0)
  np.testing.assert_array_equal(with_prompts.text[:PAIRS], batch["text_states"])
  np.testing.assert_array_equal(with_prompts.text[PAIRS:2 * PAIRS], batch["text_states"])
  np.testing.assert_array_equal(with_prompts.text[2 * PAIRS:], np.broadcast_to(empty, (PAIRS, TEXT_LEN, TEXT_DIM)))


def _chosen_text():
  """States of the chosen images' own prompts (DUO's safe prompts), unlike the pairs' text_states."""
  return np.random.RandomState(11).randn(PAIRS, TEXT_LEN, TEXT_DIM).astype(np.float32)


def test_duo_prompt_modes_put_each_images_prompt_in_the_unet_batch():
  """UNet text batch for [x+_t; x-_t; eps]: "empty" (official default) [empty; empty; empty]; "given" (official
  --given_prompt) [text_states_chosen; text_states; empty]; "unsafe" [text_states; text_states; empty]. The mode
  changes the text rows only (same x and t); prompt dropout empties both images' prompts of a dropped pair."""
  _, schedule, _, batch, empty = _world()
  frozen, key = {"empty_text": empty}, jax.random.PRNGKey(0)
  chosen, text = _chosen_text(), batch["text_states"]
  full = dict(batch, text_states_chosen=chosen)
  e = np.broadcast_to(empty, (PAIRS, TEXT_LEN, TEXT_DIM))
  want = {"empty": (e, e), "given": (chosen, text), "unsafe": (text, text)}   # (x+ rows, x- rows)
  assert dpo_steps.resolve_config(dict(method="duo")).duo_prompts == "empty"
  out = {}
  for mode, (plus, minus) in want.items():
    c = dpo_steps.resolve_config(dict(method="duo", duo_prompts=mode))
    out[mode] = dpo_inputs.duo_inputs(schedule, c, full, frozen, key, 0.0)
    np.testing.assert_array_equal(out[mode].text, np.concatenate([plus, minus, e]), err_msg=mode)
    for field in ("x", "t", "target"):
      np.testing.assert_array_equal(getattr(out[mode], field), getattr(out["empty"], field), err_msg=field)
  # "empty" needs no prompt states at all
  bare = {k: batch[k] for k in ("latents_chosen", "latents_rejected")}
  c = dpo_steps.resolve_config(dict(method="duo"))
  np.testing.assert_array_equal(dpo_inputs.duo_inputs(schedule, c, bare, frozen, key, 0.5).text, out["empty"].text)

  for mode, (plus, minus) in want.items():      # prompt dropout 0.5, per pair
    c = dpo_steps.resolve_config(dict(method="duo", duo_prompts=mode, prompt_dropout=0.5))
    dropped = dpo_inputs.duo_inputs(schedule, c, full, frozen, key, 0.5)
    drop = np.asarray(dpo_inputs.draw_noise(schedule, c, key, PAIRS, batch["latents_chosen"].shape[1:], 0.5).drop)
    if mode == "empty":
      assert not drop.any()                     # nothing to drop
    else:
      assert 0 < drop.sum() < PAIRS, drop
    d = drop[:, None, None]
    np.testing.assert_array_equal(dropped.text, np.concatenate([np.where(d, e, plus), np.where(d, e, minus), e]),
                                  err_msg=mode)


def test_duo_prompt_mode_errors_name_the_key_and_the_missing_field():
  _, schedule, _, batch, empty = _world()
  frozen, key = {"empty_text": empty}, jax.random.PRNGKey(0)
  for bad in ("both", "", True, None):
    with pytest.raises(ValueError, match=r"config.objective.duo_prompts = .*choose one of \('empty', 'given', "
                                         r"'unsafe'\)"):
      dpo_steps.resolve_config(dict(method="duo", duo_prompts=bad))
  with pytest.raises(KeyError, match=r"'duo_use_prompts' is now 'duo_prompts'.*True was 'unsafe'"):
    dpo_steps.resolve_config(dict(method="duo", duo_use_prompts=True))
  c = dpo_steps.resolve_config(dict(method="duo"))
  c.duo_prompts = "Given"                       # set after resolving: the inputs check it too
  with pytest.raises(ValueError, match=r"config.objective.duo_prompts = 'Given'"):
    dpo_inputs.duo_inputs(schedule, c, batch, frozen, key, 0.0)
  given = dpo_steps.resolve_config(dict(method="duo", duo_prompts="given"))
  with pytest.raises(KeyError, match=r"duo_prompts = 'given'.*has no 'text_states_chosen'.*prompt_chosen.*"
                                     r"sc_dpo_jax.data.build_duo_pairs"):
    dpo_inputs.duo_inputs(schedule, given, batch, frozen, key, 0.0)
  with pytest.raises(ValueError, match=r"batch\['text_states_chosen'\] \(8, 4, 16\) must be \[8, L, D\]"):
    dpo_inputs.duo_inputs(schedule, given, dict(batch, text_states_chosen=_chosen_text()[..., :16]), frozen, key,
                          0.0)
  state, frozen_state, _ = _fresh("duo")          # through the jitted step (traced, not compiled)
  with pytest.raises(KeyError, match=r"has no 'text_states_chosen'"):
    _trace(dict(RUNS["duo"][0], duo_prompts="given"), state, frozen_state, batch)
  _trace(dict(RUNS["duo"][0], duo_prompts="given"), state, frozen_state,
         dict(batch, text_states_chosen=_chosen_text()))


def test_timestep_range_applies_to_every_method_and_is_checked():
  _, schedule, _, batch, empty = _world()
  frozen = {"empty_text": empty}
  for method, fn in (("diffusion_dpo", dpo_inputs.dpo_inputs), ("sc_dpo", dpo_inputs.dpo_inputs),
                     ("duo", dpo_inputs.duo_inputs)):
    c = dpo_steps.resolve_config(dict(method=method, min_timestep=600, max_timestep=603))
    t = np.asarray(fn(schedule, c, batch, frozen, jax.random.PRNGKey(1), 0.0).t)[:2 * PAIRS]
    assert set(t.tolist()) <= {600, 601, 602} and len(set(t.tolist())) > 1, (method, t)
  assert dpo_steps.resolve_config(dict(method="diffusion_dpo")).max_timestep is None   # all of [0, T)
  assert dpo_steps.resolve_config(dict(method="duo")).max_timestep == 750
  with pytest.raises(ValueError, match="min_timestep \\(700\\) and max_timestep \\(700"):
    dpo_steps.resolve_config(dict(method="sc_dpo", min_timestep=700, max_timestep=700))
  c = dpo_steps.resolve_config(dict(method="diffusion_dpo", max_timestep=1001))
  with pytest.raises(ValueError, match="max_timestep = 1001 exceeds the schedule's 1000"):
    dpo_inputs.dpo_inputs(schedule, c, batch, frozen, jax.random.PRNGKey(1), 0.0)


def test_duo_lambda_rule():
  c = dpo_steps.resolve_config(dict(method="duo", beta=500.0))
  assert dpo_steps.duo_lambda(c) == 1e6 * 500 / 100
  assert dpo_steps.duo_lambda(dpo_steps.resolve_config(dict(method="duo", duo_lambda=3.0))) == 3.0


# ------------------------------------------------------------------------------------------------- errors

def _trace(objective, state, frozen, batch):
  unet, schedule, *_ = _world()
  step = dpo_steps.make_dpo_step(unet, schedule, objective)
  return jax.eval_shape(step.fn, state, frozen, batch, RNG)   # traces, never compiles


def test_errors_name_the_missing_piece():
  _, _, _, batch, _ = _world()
  with pytest.raises(KeyError, match="'beta_dpo'"):
    dpo_steps.resolve_config(dict(method="diffusion_dpo", beta_dpo=1.0))
  with pytest.raises(ValueError, match="'ddpo'.*choose one of"):
    dpo_steps.resolve_config(dict(method="ddpo"))
  with pytest.raises(ValueError, match="prompt_dropout"):
    dpo_steps.resolve_config(dict(prompt_dropout=1.5))
  state, frozen, _ = _fresh("sc_dpo")
  no_cost = {k: v for k, v in batch.items() if k != "cost_chosen"}
  with pytest.raises(KeyError, match=r"sc_dpo: batch\['cost_chosen'\] is missing"):
    _trace(RUNS["sc_dpo"][0], state, frozen, no_cost)
  with pytest.raises(KeyError, match=r"frozen\['empty_text'\] is missing"):
    _trace(RUNS["duo"][0], state, {k: v for k, v in frozen.items() if k != "empty_text"}, batch)
  full_state, full_frozen, _ = _fresh("full")
  with pytest.raises(KeyError, match=r"frozen\['ref_unet'\] is missing"):
    _trace(RUNS["full"][0], full_state, {"empty_text": full_frozen["empty_text"]}, batch)
  with pytest.raises(ValueError, match="NHWC"):
    _trace(RUNS["diffusion_dpo"][0], state, frozen, dict(batch, latents_rejected=batch["latents_rejected"][:, :4]))


def test_full_finetuning_accepts_a_bfloat16_reference():
  unet, schedule, params, batch, empty = _world()
  tx, lr_schedule = optim.make_optimizer(None)
  state, frozen = state_lib.create_train_state(params, tx, lr_schedule, ref_dtype=jnp.bfloat16, empty_text=empty)
  assert {x.dtype for x in jax.tree.leaves(frozen["ref_unet"])} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  # the state, the reference and the caller's tree are three sets of buffers (the state is donated)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  _, metrics = _trace(RUNS["full"][0], state, frozen, batch)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32


# --------------------------------------------------------------------------------- optimiser and state

def test_learning_rate_rules():
  assert optim.peak_learning_rate(dict(learning_rate=1e-8, lr_rule="per_sample"), total_batch_size=2048) == \
      pytest.approx(2.048e-5)
  assert optim.peak_learning_rate(dict(learning_rate=3e-4, lr_rule="duo"), beta=500.0) == pytest.approx(6e-5)
  assert optim.peak_learning_rate(dict(learning_rate=3e-4)) == 3e-4
  with pytest.raises(ValueError, match=r"unknown optim.lr_rule 'linear'.*\('fixed', 'per_sample', 'duo'\)"):
    optim.peak_learning_rate(dict(lr_rule="linear"))
  with pytest.raises(ValueError, match="total_batch_size"):
    optim.peak_learning_rate(dict(lr_rule="per_sample"))
  with pytest.raises(ValueError, match="beta > 0"):
    optim.peak_learning_rate(dict(lr_rule="duo"), beta=0.0)
  with pytest.raises(KeyError, match="'lr'"):
    optim.make_optimizer(dict(lr=1e-4))
  with pytest.raises(ValueError, match="'sgd'"):
    optim.make_optimizer(dict(optimizer="sgd"))
  with pytest.raises(ValueError, match="'linear_decay'"):
    optim.make_optimizer(dict(schedule="linear_decay"))
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_optimizer(dict(schedule="cosine", warmup_steps=10, total_steps=10))
  text = optim.describe(dict(learning_rate=1e-8, lr_rule="per_sample", schedule="constant_with_warmup",
                             warmup_steps=500), total_batch_size=2048)
  assert "2.05e-05" in text and "per_sample" in text and "warmup 500" in text


def test_schedules():
  _, warm = optim.make_optimizer(dict(learning_rate=1.0, schedule="constant_with_warmup", warmup_steps=4))
  np.testing.assert_allclose([warm(i) for i in range(7)], [0, 0.25, 0.5, 0.75, 1, 1, 1], atol=1e-7)
  _, cos = optim.make_optimizer(dict(learning_rate=1.0, schedule="cosine", warmup_steps=2, total_steps=12,
                                     end_lr_fraction=0.1))
  np.testing.assert_allclose([cos(0), cos(1), cos(2), cos(7), cos(12), cos(20)], [0, 0.5, 1, 0.55, 0.1, 0.1],
                             atol=1e-6)
  _, const = optim.make_optimizer(dict(learning_rate=0.3))
  assert float(const(123)) == pytest.approx(0.3)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizers_step_and_clip(name):
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  grads = {"w": jnp.full((4, 3), 10.0), "b": jnp.full((3,), -10.0)}
  tx, schedule = optim.make_optimizer(dict(optimizer=name, learning_rate=0.1, grad_clip=1.0))
  state = state_lib.TrainState.create(params=params, tx=tx, lr_schedule=schedule)
  assert len(state.opt_state) == 2   # clip_by_global_norm, then the optimiser
  new = state.apply_gradients(grads)
  assert int(new.step) == 1 and float(new.learning_rate()) == pytest.approx(0.1)
  assert float(new.params["w"][0, 0]) < 1.0 and float(new.params["b"][0]) > 0.0   # moved against the gradient
  unclipped, _ = optim.make_optimizer(dict(optimizer=name, grad_clip=0))
  assert len(unclipped.init(params)) == 1
  # clipping happens first: the optimiser sees grads of global norm 1
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-6)


def test_create_train_state_with_lora():
  _, _, params, _, empty = _world()
  tx, schedule = optim.make_optimizer(None)
  state, frozen = state_lib.create_train_state(params, tx, schedule, lora=dict(rank=2, alpha=4),
                                               rng=jax.random.PRNGKey(0), empty_text=empty[0])
  assert state.is_lora and state.params.targets == "self_attention" and state.params.scale == 2.0
  assert frozen["unet"] is params and frozen["empty_text"].shape == (1, TEXT_LEN, TEXT_DIM)
  assert "ref_unet" not in frozen
  with pytest.raises(KeyError, match="'rnk'"):
    state_lib.create_train_state(params, tx, schedule, lora=dict(rnk=2, alpha=4), rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="needs rng"):
    state_lib.create_train_state(params, tx, schedule, lora=dict(rank=2, alpha=4))


def test_sc_dpo_retention_terms_in_the_step():
  """The step's SC-DPO loss is its preference loss plus retention_weight x R: "sft" is the mean chosen error
  (the step's own err_w metric); "preserve" needs the pairs' harmful_prompt flags and counts only clean pairs."""
  _, schedule, _, batch, _ = _world()
  state, frozen, objective = _fresh("sc_dpo")
  unet = _world()[0]
  rng = jax.random.PRNGKey(3)
  sft = dpo_steps.make_loss_fn(unet, schedule, dict(objective, retention="sft", retention_weight=10.0), train=False)
  loss, metrics = sft(state.params, frozen, batch, rng)
  assert float(metrics["retention"]) == pytest.approx(float(metrics["err_w"]), rel=1e-6)
  assert float(loss) == pytest.approx(float(metrics["loss_preference"]) + 10.0 * float(metrics["err_w"]), rel=1e-5)
  preserve = dpo_steps.make_loss_fn(unet, schedule, dict(objective, retention="preserve", retention_weight=100.0),
                                    train=False)
  with pytest.raises(KeyError, match="harmful_prompt"):
    preserve(state.params, frozen, batch, rng)
  flagged = dict(batch, harmful_prompt=(np.arange(PAIRS) % 2).astype(np.int32))
  loss, metrics = preserve(state.params, frozen, flagged, rng)
  r = float(metrics["retention"])
  assert r >= 0.0 and float(loss) == pytest.approx(float(metrics["loss_preference"]) + 100.0 * r, rel=1e-5)
  all_harmful = preserve(state.params, frozen, dict(batch, harmful_prompt=np.ones(PAIRS, np.int32)), rng)[1]
  assert float(all_harmful["retention"]) == 0.0
  # preserve_weight adds the same preservation term on top of SFT: loss = preference + 10 err_w + 50 P.
  both = dpo_steps.make_loss_fn(unet, schedule, dict(objective, retention="sft", retention_weight=10.0,
                                                     preserve_weight=50.0), train=False)
  with pytest.raises(KeyError, match="harmful_prompt"):
    both(state.params, frozen, batch, rng)
  loss, metrics = both(state.params, frozen, flagged, rng)
  assert float(metrics["preservation"]) == pytest.approx(r, rel=1e-6, abs=1e-12)
  assert float(loss) == pytest.approx(float(metrics["loss_preference"]) + 10.0 * float(metrics["err_w"])
                                      + 50.0 * r, rel=1e-5)
  with pytest.raises(ValueError, match="config.objective.preserve_weight = -1.0 must be >= 0"):
    dpo_steps.resolve_config(dict(objective, preserve_weight=-1.0))
  with pytest.raises(ValueError, match="config.objective.retention"):
    dpo_steps.resolve_config(dict(objective, retention="kl"))
  with pytest.raises(ValueError, match="config.objective.cost_transform"):
    dpo_steps.resolve_config(dict(objective, cost_transform="logit"))
