"""The losses of ``sc_dpo_jax.losses`` against independent NumPy float64 computations of METHODS.md's formulas,
and the properties METHODS.md asks for (SC-DPO reduces to Diffusion-DPO, Dynamic Focusing weights, DUO's
beta = 0 fallback, PPO clipping, stability).

Inputs are drawn in float32 and the NumPy reference computes in float64 from those same values, so the
comparison measures only the losses' own float32 arithmetic: measured max |ours - numpy| is 3.1e-7 over the
losses and metrics (values of order 1; tolerance 1e-6). Errors are drawn as the reference's plus a small policy shift (as in
training, where policy and reference are close) so that with beta = 5000 the arguments of the sigmoid are of
order one and every branch of the formulas is exercised.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax import losses
from sc_dpo_jax.losses import cost_loss, diffusion_dpo_loss, duo_loss, focusing_weights, ppo_clip_loss, sc_dpo_loss

TOL = 1e-6
B = 16


# ------------------------------------------------------------------------------------------- references
def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _f64(*arrays):
  return [np.asarray(a, np.float64) for a in arrays]


def _errors(seed, batch=B, shift=1e-3):
  """float32 (err_w, err_l, ref_err_w, ref_err_l): references ~ U(0.05, 0.3), policy = reference + shift."""
  rng = np.random.RandomState(seed)
  ref_w, ref_l = rng.uniform(0.05, 0.3, (2, batch))
  err_w = ref_w + shift * rng.randn(batch)
  err_l = ref_l + shift * rng.randn(batch)
  return [np.asarray(a, np.float32) for a in (err_w, err_l, ref_w, ref_l)]


def _np_dpo(err_w, err_l, ref_w, ref_l, beta):
  err_w, err_l, ref_w, ref_l = _f64(err_w, err_l, ref_w, ref_l)
  delta = (err_w - ref_w) - (err_l - ref_l)
  inside = -(beta / 2) * delta
  return inside, float(np.mean(-_log_sigmoid(inside)))


def _np_sc_dpo(err_w, err_l, ref_w, ref_l, cost_w, cost_l, beta, gamma_c, gamma_f, transform="probability"):
  inside, _ = _np_dpo(err_w, err_l, ref_w, ref_l, beta)
  cost_w, cost_l = _f64(cost_w, cost_l)
  if transform == "probability":     # the cost model's probability of harm, sigmoid(cost)
    cost_w, cost_l = 1.0 / (1.0 + np.exp(-cost_w)), 1.0 / (1.0 + np.exp(-cost_l))
  margin = gamma_c * np.maximum(cost_l - cost_w, 0.0)
  z = inside - margin
  w = (1.0 - 1.0 / (1.0 + np.exp(-z))) ** gamma_f
  w = w / w.mean()
  return z, w, margin, float(np.mean(w * -_log_sigmoid(z)))


def _close(got, expected, what, tol=TOL):
  diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))))
  assert diff <= tol, (what, diff)


def _check_metrics(metrics):
  for name, value in metrics.items():
    assert value.shape == () and value.dtype == jnp.float32, (name, value.shape, value.dtype)


# --------------------------------------------------------------------------------------- Diffusion-DPO
def test_diffusion_dpo_matches_numpy():
  errs = _errors(0)
  beta = 5000.0
  loss, metrics = jax.jit(lambda *e: diffusion_dpo_loss(*e, beta=beta))(*errs)
  inside, expected = _np_dpo(*errs, beta)
  assert 0.1 < np.abs(inside).mean() < 20, "inputs should exercise the sigmoid, not saturate it"
  _close(loss, expected, "loss")
  _check_metrics(metrics)
  err_w, err_l, ref_w, ref_l = _f64(*errs)
  reward_w, reward_l = -(err_w - ref_w), -(err_l - ref_l)
  _close(metrics["loss"], expected, "metrics.loss")
  _close(metrics["implicit_accuracy"], np.mean(inside > 0), "implicit_accuracy")
  _close(metrics["tie_fraction"], 0.0, "tie_fraction")
  _close(metrics["reward_w"], reward_w.mean(), "reward_w")
  _close(metrics["reward_l"], reward_l.mean(), "reward_l")
  _close(metrics["reward_margin"], (reward_w - reward_l).mean(), "reward_margin")
  _close(metrics["err_w"], err_w.mean(), "err_w")
  _close(metrics["ref_err_l"], ref_l.mean(), "ref_err_l")


def test_diffusion_dpo_ties_and_zero_beta():
  errs = _errors(1)
  _, metrics = diffusion_dpo_loss(errs[2], errs[3], errs[2], errs[3], beta=5000.0)   # policy == reference
  assert float(metrics["implicit_accuracy"]) == 0.0 and float(metrics["tie_fraction"]) == 1.0
  loss, _ = diffusion_dpo_loss(*errs, beta=0.0)
  _close(loss, np.log(2.0), "beta = 0 loss")


# ----------------------------------------------------------------------------------------------- SC-DPO
def _costs(seed, batch=B):
  rng = np.random.RandomState(seed)
  return [np.asarray(a, np.float32) for a in rng.uniform(-3, 3, (2, batch))]


@pytest.mark.parametrize("transform", ["probability", "raw"])
def test_sc_dpo_matches_numpy(transform):
  errs, costs = _errors(2), _costs(3)
  beta, gamma_c, gamma_f = 5000.0, (1.5 if transform == "probability" else 0.4), 2.0
  loss, metrics = jax.jit(lambda *a: sc_dpo_loss(*a, beta=beta, cost_margin_scale=gamma_c, focus_gamma=gamma_f,
                                                 cost_transform=transform))(*errs, *costs)
  z, w, margin, expected = _np_sc_dpo(*errs, *costs, beta, gamma_c, gamma_f, transform)
  if transform == "probability":
    assert margin.max() <= gamma_c      # bounded by the scale
  assert (margin > 0).any() and (margin == 0).any()
  _close(loss, expected, "loss")
  _check_metrics(metrics)
  inside, _ = _np_dpo(*errs, beta)
  _close(metrics["implicit_accuracy"], np.mean(inside > 0), "implicit_accuracy")
  _close(metrics["margin_accuracy"], np.mean(z > 0), "margin_accuracy")
  _close(metrics["cost_w"], np.mean(costs[0], dtype=np.float64), "cost_w")
  _close(metrics["cost_l"], np.mean(costs[1], dtype=np.float64), "cost_l")
  _close(metrics["margin"], margin.mean(), "margin")
  _close(metrics["loss_unweighted"], np.mean(-_log_sigmoid(z)), "loss_unweighted")
  _close(metrics["focus_weight_min"], w.min(), "focus_weight_min")
  _close(metrics["focus_weight_max"], w.max(), "focus_weight_max", tol=1e-5)   # weights up to ~5
  _close(metrics["focus_weight_std"], w.std(), "focus_weight_std")


def test_sc_dpo_without_margin_and_focusing_is_diffusion_dpo_exactly():
  """Op by op (eager) the two losses and their gradients are bit-identical: the focusing weights are exactly
  1 and the margin exactly 0. Under jit XLA fuses the two programs differently (the gradient program most),
  so there they agree to float32 rounding: measured 1.2e-7 on a loss of 1.9, tolerance 1e-6."""
  errs, costs = _errors(4), _costs(5)
  beta = 5000.0

  def dpo(*e):
    return diffusion_dpo_loss(*e, beta=beta)

  def sc(*e):
    return sc_dpo_loss(*e, *costs, beta=beta, cost_margin_scale=0.0, focus_gamma=0.0)

  (l_dpo, m_dpo), g_dpo = jax.value_and_grad(dpo, argnums=(0, 1, 2, 3), has_aux=True)(*errs)
  (l_sc, m_sc), g_sc = jax.value_and_grad(sc, argnums=(0, 1, 2, 3), has_aux=True)(*errs)
  np.testing.assert_array_equal(l_sc, l_dpo)
  for a, b in zip(g_sc, g_dpo):
    assert np.abs(np.asarray(b)).max() > 0
    np.testing.assert_array_equal(a, b)
  for name, value in m_dpo.items():
    np.testing.assert_array_equal(m_sc[name], value, err_msg=name)
  assert float(m_sc["focus_weight_min"]) == float(m_sc["focus_weight_max"]) == 1.0
  assert float(m_sc["margin"]) == 0.0

  (jl_dpo, _), jg_dpo = jax.jit(jax.value_and_grad(dpo, argnums=(0, 1, 2, 3), has_aux=True))(*errs)
  (jl_sc, _), jg_sc = jax.jit(jax.value_and_grad(sc, argnums=(0, 1, 2, 3), has_aux=True))(*errs)
  _close(jl_sc, jl_dpo, "jitted loss")
  for a, b in zip(jg_sc, jg_dpo):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_dynamic_focusing_weights():
  z = jnp.asarray(np.random.RandomState(6).randn(B) * 3, jnp.float32)
  w = np.asarray(focusing_weights(z, 2.0))
  order = np.argsort(np.asarray(z))                   # hardest (smallest z) first
  assert np.all(np.diff(w[order]) < 0), "harder pairs must get larger weights"
  _close(w.mean(), 1.0, "mean weight")
  # No gradient flows through the weights.
  grad = jax.grad(lambda z: jnp.sum(focusing_weights(z, 2.0) * jnp.arange(B)))(z)
  np.testing.assert_array_equal(grad, np.zeros(B))
  # Stable when every pair is very easy (all (1 - sigmoid(z))^g underflow): still mean 1, finite.
  w_easy = focusing_weights(jnp.linspace(200.0, 400.0, B), 4.0)
  assert np.isfinite(np.asarray(w_easy)).all()
  _close(np.mean(w_easy), 1.0, "mean weight, easy pairs")


def test_sc_dpo_gradient_treats_weights_as_constants():
  """d loss / d err_w = w_i * sigmoid(-z_i) * (beta / 2) / B: the weights enter as constants."""
  errs, costs = _errors(7), _costs(8)
  beta, gamma_c, gamma_f = 5000.0, 0.3, 1.5
  grad = jax.grad(lambda e: sc_dpo_loss(e, *errs[1:], *costs, beta=beta, cost_margin_scale=gamma_c,
                                        focus_gamma=gamma_f)[0])(errs[0])
  z, w, _, _ = _np_sc_dpo(*errs, *costs, beta, gamma_c, gamma_f)
  expected = w * (1.0 / (1.0 + np.exp(z))) * (beta / 2) / B
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # And no gradient reaches the costs (they are data).
  g_cost = jax.grad(lambda c: sc_dpo_loss(*errs, costs[0], c, beta=beta, cost_margin_scale=gamma_c,
                                          focus_gamma=gamma_f)[0])(costs[1])
  np.testing.assert_array_equal(g_cost, np.zeros(B))


def test_sc_dpo_probability_margin_is_the_same_for_rescaled_logits_of_the_same_decision():
  """Two cost models that agree on the harm probability give the same margin whatever their logits' spread
  (here: costs x 10 on saturated pairs give margins within 1e-4 of the scale); raw margins scale with them."""
  errs = _errors(4)
  cost_w, cost_l = np.full(B, -13.0, np.float32), np.full(B, 13.0, np.float32)
  margins = {}
  for scale in (1.0, 10.0):
    for transform in ("probability", "raw"):
      _, m = sc_dpo_loss(*errs, cost_w * scale, cost_l * scale, beta=5000.0, cost_margin_scale=2.0,
                         focus_gamma=0.0, cost_transform=transform)
      margins[scale, transform] = float(m["margin"])
  assert abs(margins[1.0, "probability"] - 2.0) < 1e-4 and abs(margins[10.0, "probability"] - 2.0) < 1e-4
  assert margins[10.0, "raw"] == pytest.approx(10 * margins[1.0, "raw"]) == pytest.approx(520.0)
  with pytest.raises(ValueError, match="cost_transform"):
    sc_dpo_loss(*errs, cost_w, cost_l, beta=1.0, cost_margin_scale=1.0, focus_gamma=0.0, cost_transform="logit")


def test_sc_dpo_retention_terms_match_their_formulas():
  rng = np.random.RandomState(21)
  errs, costs = _errors(5), _costs(6)
  pred = rng.randn(2 * B, 3, 3, 2).astype(np.float32)
  ref = (pred + 0.3 * rng.randn(*pred.shape)).astype(np.float32)
  clean = (np.arange(B) % 2).astype(np.float32)
  # sft: the mean chosen error; preserve: [clean] x the mean squared output change of both images, over all B.
  _close(losses.sc_dpo.retention_term("sft", errs[0]), np.mean(errs[0], dtype=np.float64), "sft")
  per_image = ((pred.astype(np.float64) - ref) ** 2).mean(axis=(1, 2, 3))
  expected = np.mean(clean * 0.5 * (per_image[:B] + per_image[B:]))
  _close(losses.sc_dpo.retention_term("preserve", errs[0], pred, ref, clean), expected, "preserve")
  assert float(losses.sc_dpo.retention_term("none", errs[0])) == 0.0
  # In the loss: loss = preference + weight * R, and R's gradient reaches the policy only.
  r = losses.sc_dpo.retention_term("sft", errs[0])
  loss, metrics = sc_dpo_loss(*errs, *costs, beta=5000.0, cost_margin_scale=1.0, focus_gamma=2.0, retention=r,
                              retention_weight=3.0)
  _close(loss, float(metrics["loss_preference"]) + 3.0 * float(r), "loss = preference + 3 R")
  pr = losses.sc_dpo.retention_term("preserve", errs[0], pred, ref, clean)
  loss, metrics = sc_dpo_loss(*errs, *costs, beta=5000.0, cost_margin_scale=1.0, focus_gamma=2.0, retention=r,
                              retention_weight=3.0, preservation=pr, preserve_weight=7.0)
  _close(loss, float(metrics["loss_preference"]) + 3.0 * float(r) + 7.0 * float(pr), "loss = preference + 3 R + 7 P")
  _close(metrics["preservation"], float(pr), "preservation metric")
  g = jax.grad(lambda p: losses.sc_dpo.retention_term("preserve", errs[0], p, ref, clean))(pred)
  expected_g = clean[:, None, None, None] * 0.5 * 2 * (pred[:B] - ref[:B]) / (3 * 3 * 2) / B
  np.testing.assert_allclose(g[:B], expected_g, rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="retention"):
    losses.sc_dpo.retention_term("kl", errs[0])
  with pytest.raises(ValueError, match="harmful_prompt"):
    losses.sc_dpo.retention_term("preserve", errs[0])


# -------------------------------------------------------------------------------------------------- DUO
def _prior(seed):
  rng = np.random.RandomState(seed)
  pred = rng.randn(4, 3, 3, 2).astype(np.float32)
  return pred, (pred + 0.1 * rng.randn(*pred.shape)).astype(np.float32)


def test_duo_matches_numpy():
  err_safe, err_unsafe, ref_safe, ref_unsafe = _errors(9)
  prior, prior_ref = _prior(10)
  beta, lam = 500.0, 3.0
  loss, metrics = jax.jit(lambda *a: duo_loss(*a, beta=beta, lam=lam))(
      err_safe, ref_safe, err_unsafe, ref_unsafe, prior, prior_ref)
  s, u, rs, ru = _f64(err_safe, err_unsafe, ref_safe, ref_unsafe)
  inside = -beta * ((s - rs) - (u - ru))                         # no 1/2
  loss_dpo = np.mean(-_log_sigmoid(inside))
  loss_prior = np.mean((np.float64(prior) - np.float64(prior_ref)) ** 2)
  _close(loss, loss_dpo + lam * loss_prior, "loss")
  _check_metrics(metrics)
  _close(metrics["loss_dpo"], loss_dpo, "loss_dpo")
  _close(metrics["loss_prior"], loss_prior, "loss_prior")
  _close(metrics["implicit_accuracy"], np.mean(inside > 0), "implicit_accuracy")
  _close(metrics["reward_w"], np.mean(-(s - rs)), "reward_w (safe)")
  _close(metrics["reward_l"], np.mean(-(u - ru)), "reward_l (unsafe)")
  # DUO beta = 500 equals Diffusion-DPO beta = 1000.
  dpo_loss, _ = diffusion_dpo_loss(err_safe, err_unsafe, ref_safe, ref_unsafe, beta=1000.0)
  _close(metrics["loss_dpo"], dpo_loss, "DUO beta 500 vs Diffusion-DPO beta 1000")


@pytest.mark.parametrize("traced_beta", [False, True])
def test_duo_beta_zero_is_gradient_ascent_on_unsafe(traced_beta):
  err_safe, err_unsafe, ref_safe, ref_unsafe = _errors(11)
  prior, prior_ref = _prior(12)

  def f(s, rs, u, ru, p, beta, lam):
    return duo_loss(s, rs, u, ru, p, prior_ref, beta=beta, lam=lam)

  args = (err_safe, ref_safe, err_unsafe, ref_unsafe, prior)
  beta = jnp.float32(0.0) if traced_beta else 0.0
  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)) if traced_beta else \
      jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)
  (loss, metrics), grads = fn(*args, beta, 0.0)
  _close(loss, -np.mean(err_unsafe, dtype=np.float64), "loss = -mean(err_unsafe)")
  g_s, g_rs, g_u, g_ru, g_p = grads
  np.testing.assert_allclose(g_u, np.full(B, -1.0 / B), rtol=1e-7)
  for name, g in (("err_safe", g_s), ("ref_err_safe", g_rs), ("ref_err_unsafe", g_ru), ("prior_pred", g_p)):
    np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=name)
  # With lam > 0 the prior term is still added (as in the official code); the error gradients are unchanged.
  (loss2, m2), grads2 = fn(*args, beta, 2.0)
  _close(loss2, -np.mean(err_unsafe, dtype=np.float64) + 2.0 * float(metrics["loss_prior"]), "loss, lam = 2")
  np.testing.assert_allclose(grads2[2], np.full(B, -1.0 / B), rtol=1e-7)
  np.testing.assert_array_equal(grads2[0], np.zeros(B))
  assert np.abs(np.asarray(grads2[4])).max() > 0


# ------------------------------------------------------------------------------------------------- DDPO
def test_ppo_clip_matches_numpy():
  rng = np.random.RandomState(13)
  logp_old = rng.randn(B).astype(np.float32)
  logp_new = (logp_old + 2e-4 * rng.randn(B)).astype(np.float32)
  adv = (rng.randn(B) * 4).astype(np.float32)
  eps, bound = 1e-4, 5.0
  assert (np.abs(adv) > bound).any()
  loss, metrics = jax.jit(lambda *a: ppo_clip_loss(*a, clip_range=eps, adv_clip=bound))(logp_new, logp_old, adv)
  new, old, a = _f64(logp_new, logp_old, adv)
  a = np.clip(a, -bound, bound)
  ratio = np.exp(new - old)
  expected = np.mean(np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps)))
  clipfrac = np.mean(np.abs(ratio - 1) > eps)
  assert 0 < clipfrac < 1
  _close(loss, expected, "loss")
  _check_metrics(metrics)
  _close(metrics["approx_kl"], 0.5 * np.mean((new - old) ** 2), "approx_kl")
  _close(metrics["clipfrac"], clipfrac, "clipfrac")
  _close(metrics["ratio_mean"], ratio.mean(), "ratio_mean")
  _close(metrics["advantage_clipfrac"], np.mean(np.abs(adv) > bound), "advantage_clipfrac")


def test_ppo_clip_gradient_vanishes_past_the_bound_in_the_favoured_direction():
  eps = 0.1
  log_ratio = np.log(np.array([1.5, 0.5, 0.5, 1.5, 1.05, 1.05], np.float32))
  adv = np.array([1.0, 1.0, -1.0, -1.0, 1.0, -1.0], np.float32)
  logp_old = np.zeros(6, np.float32)
  grad = jax.grad(lambda new: ppo_clip_loss(new, logp_old, adv, clip_range=eps, adv_clip=5.0)[0])(log_ratio)
  grad = np.asarray(grad)
  ratio = np.exp(log_ratio.astype(np.float64))
  # A > 0 and ratio above 1 + eps, A < 0 and ratio below 1 - eps: already moved the favoured way: no push.
  assert grad[0] == 0.0 and grad[2] == 0.0
  # Moved the wrong way (or inside the range): the unclipped term acts, d/dlogp (-A rho) / B.
  np.testing.assert_allclose(grad[[1, 3, 4, 5]], (-adv * ratio)[[1, 3, 4, 5]] / 6, rtol=1e-6)
  assert grad[1] < 0 and grad[3] > 0              # gradient descent raises logp for A > 0, lowers it for A < 0
  # No gradient to logp_old or the advantages (data).
  g_old, g_adv = jax.grad(lambda o, a: ppo_clip_loss(log_ratio, o, a, clip_range=eps, adv_clip=5.0)[0],
                          argnums=(0, 1))(logp_old, adv)
  np.testing.assert_array_equal(g_old, np.zeros(6))
  np.testing.assert_array_equal(g_adv, np.zeros(6))


# ------------------------------------------------------------------------------------------- cost model
def test_cost_loss_matches_numpy():
  rng = np.random.RandomState(14)
  more, less = rng.randn(2, 12).astype(np.float32) * 2
  labelled = rng.randn(9).astype(np.float32) * 2
  labels = np.array([1, -1, 1, 1, -1, -1, 1, -1, 1], np.int32)
  alpha = 0.7
  loss, metrics = jax.jit(lambda *a: cost_loss(*a, anchor_weight=alpha))(more, less, labelled, labels)
  m, l, c = _f64(more, less, labelled)
  rank = np.mean(-_log_sigmoid(m - l))
  anchor = np.mean(-_log_sigmoid(labels * c))
  _close(loss, rank + alpha * anchor, "loss")
  _check_metrics(metrics)
  _close(metrics["rank_loss"], rank, "rank_loss")
  _close(metrics["anchor_loss"], anchor, "anchor_loss")
  _close(metrics["ranking_accuracy"], np.mean(m > l), "ranking_accuracy")
  _close(metrics["anchor_accuracy"], np.mean(labels * c > 0), "anchor_accuracy")
  _close(metrics["cost_harmful"], c[labels > 0].mean(), "cost_harmful")
  _close(metrics["cost_safe"], c[labels < 0].mean(), "cost_safe")


# -------------------------------------------------------------------------------------------- stability
def test_stable_at_huge_inside():
  """beta = 5000 with errors of order one: |inside| ~ 1e3 .. 1e4; nothing may be inf or nan."""
  rng = np.random.RandomState(15)
  errs = [rng.uniform(0.0, 2.0, B).astype(np.float32) for _ in range(4)]
  costs = _costs(16)
  prior, prior_ref = _prior(17)
  calls = {
      "dpo": lambda e: diffusion_dpo_loss(e, *errs[1:], beta=5000.0),
      "sc_dpo": lambda e: sc_dpo_loss(e, *errs[1:], *costs, beta=5000.0, cost_margin_scale=100.0,
                                      focus_gamma=3.0),
      "duo": lambda e: duo_loss(e, errs[1], errs[2], errs[3], prior, prior_ref, beta=5000.0, lam=1e6),
      "cost": lambda e: cost_loss(e * 1e4, -e * 1e4, e * 1e4, np.where(e > 1, 1, -1), anchor_weight=1.0),
  }
  for name, f in calls.items():
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(errs[0])
    assert np.isfinite(float(loss)), name
    assert all(np.isfinite(float(v)) for v in metrics.values()), (name, metrics)
    assert np.isfinite(np.asarray(grad)).all(), name
  inside, expected = _np_dpo(*errs, 5000.0)
  assert np.abs(inside).min() > 10
  _close(calls["dpo"](errs[0])[0], expected, "dpo loss at huge |inside|", tol=1e-6 * max(1.0, expected))


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_argument():
  e = np.zeros(4, np.float32)
  with pytest.raises(ValueError, match="ref_err_l"):
    diffusion_dpo_loss(e, e, e, np.zeros(5, np.float32), beta=1.0)
  with pytest.raises(ValueError, match="err_w must be a non-empty per-sample vector"):
    diffusion_dpo_loss(np.zeros((4, 1), np.float32), e, e, e, beta=1.0)
  with pytest.raises(ValueError, match="beta = -1.0"):
    diffusion_dpo_loss(e, e, e, e, beta=-1.0)
  with pytest.raises(ValueError, match="focus_gamma"):
    sc_dpo_loss(e, e, e, e, e, e, beta=1.0, cost_margin_scale=0.0, focus_gamma=float("nan"))
  with pytest.raises(ValueError, match="cost_w and cost_l have shape"):
    sc_dpo_loss(e, e, e, e, e[:3], e[:3], beta=1.0, cost_margin_scale=0.0, focus_gamma=0.0)
  with pytest.raises(ValueError, match="prior_ref_pred"):
    duo_loss(e, e, e, e, np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32), beta=1.0, lam=1.0)
  with pytest.raises(ValueError, match="lam"):
    duo_loss(e, e, e, e, e, e, beta=1.0, lam=-2.0)
  with pytest.raises(ValueError, match="clip_range"):
    ppo_clip_loss(e, e, e, clip_range=0.0, adv_clip=5.0)
  with pytest.raises(TypeError, match="advantages must be a float array"):
    ppo_clip_loss(e, e, np.zeros(4, np.int32), clip_range=1e-4, adv_clip=5.0)
  with pytest.raises(ValueError, match=r"found \[0\]"):
    cost_loss(e, e, e, np.array([1, 0, -1, 1]), anchor_weight=1.0)
  with pytest.raises(ValueError, match="labels shape"):
    cost_loss(e, e, e, np.array([1, -1, 1]), anchor_weight=1.0)
  with pytest.raises(ValueError, match="beta must be a scalar"):
    diffusion_dpo_loss(e, e, e, e, beta=np.ones(2))


def test_module_exports():
  assert losses.dpo.diffusion_dpo_loss is diffusion_dpo_loss
  assert losses.sc_dpo.sc_dpo_loss is sc_dpo_loss
  assert losses.duo.duo_loss is duo_loss
  assert losses.ddpo.ppo_clip_loss is ppo_clip_loss
  assert losses.cost_model.cost_loss is cost_loss
