"""Per-prompt advantages: batch statistics until a prompt's buffer fills, then its own; checkpointable."""
import json

import numpy as np
import pytest

from sc_dpo_jax.train import advantages
from sc_dpo_jax.train.advantages import PerPromptAdvantages


def _reference(history, prompts, rewards, buffer_size, min_count):
  """Independent computation: replays every earlier batch for each prompt."""
  out = np.zeros(len(rewards))
  for p in set(prompts):
    idx = [i for i, q in enumerate(prompts) if q == p]
    seen = (history.get(p, []) + [rewards[i] for i in idx])[-buffer_size:]
    history[p] = seen
    pool = seen if len(seen) >= min_count else list(rewards)
    out[idx] = (np.asarray(rewards)[idx] - np.mean(pool)) / (np.std(pool) + 1e-6)
  return out


def test_matches_an_independent_replay_over_many_batches():
  rng = np.random.RandomState(0)
  tracker, history = PerPromptAdvantages(buffer_size=6, min_count=4), {}
  for _ in range(12):
    prompts = [f"p{k}" for k in rng.randint(0, 4, size=5)]
    rewards = rng.randn(5) * 3 + 1
    np.testing.assert_allclose(tracker(prompts, rewards), _reference(history, prompts, rewards, 6, 4),
                               rtol=1e-5, atol=1e-5)
  assert tracker.stats()["prompts_tracked"] == 4


def test_uses_batch_statistics_until_the_buffer_fills():
  tracker = PerPromptAdvantages(buffer_size=16, min_count=16)
  adv = tracker(["a", "a", "b", "b"], [1.0, 2.0, 3.0, 4.0])
  r = np.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(adv, (r - r.mean()) / (r.std() + 1e-6), rtol=1e-6)


def test_checkpoint_round_trip_continues_identically():
  rng = np.random.RandomState(1)
  batches = [([f"p{k}" for k in rng.randint(0, 3, size=6)], rng.randn(6)) for _ in range(8)]
  a = PerPromptAdvantages(buffer_size=5, min_count=3)
  for prompts, rewards in batches[:4]:
    a(prompts, rewards)
  b = PerPromptAdvantages(buffer_size=5, min_count=3)
  b.load_state_dict(json.loads(json.dumps(a.state_dict())))
  for prompts, rewards in batches[4:]:
    np.testing.assert_array_equal(a(prompts, rewards), b(prompts, rewards))
  with pytest.raises(ValueError, match="buffer_size=5"):
    PerPromptAdvantages(buffer_size=16).load_state_dict(a.state_dict())


def test_bad_input():
  tracker = PerPromptAdvantages()
  with pytest.raises(ValueError, match="one reward each"):
    tracker(["a", "b"], [1.0])
  with pytest.raises(ValueError, match=r"non-finite rewards at positions \[1\]"):
    tracker(["a", "b"], [1.0, np.nan])
  with pytest.raises(ValueError, match="min_count"):
    PerPromptAdvantages(buffer_size=4, min_count=8)


# -- group advantages and the per-term normalisation -----------------------------------------------------------


def test_group_advantages_compare_each_prompts_own_samples():
  from sc_dpo_jax.train.advantages import group_advantages
  prompts = ["red"] * 4 + ["blue"] * 4
  rewards = np.array([-10.0, -9.0, -11.0, -10.0, 5.0, 5.5, 4.5, 5.0])
  adv, stats = group_advantages(prompts, rewards)
  centred = rewards - np.repeat([-10.0, 5.0], 4)
  within = np.sqrt(np.mean(centred ** 2))
  np.testing.assert_allclose(adv, centred / (within + 1e-6), rtol=1e-6)
  # The 15-point gap between the prompts never enters: each group's advantages sum to zero.
  assert abs(adv[:4].sum()) < 1e-5 and abs(adv[4:].sum()) < 1e-5
  assert stats["groups"] == 2 and stats["within_std"] == pytest.approx(within)
  assert stats["between_std"] == pytest.approx(7.5)
  # Interleaved prompts give the same per-sample advantages.
  order = np.array([0, 4, 1, 5, 2, 6, 3, 7])
  adv2, _ = group_advantages([prompts[i] for i in order], rewards[order])
  np.testing.assert_allclose(adv2, adv[order], rtol=1e-6)
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    group_advantages(["a", "a", "b"], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="non-finite"):
    group_advantages(["a", "a"], [1.0, np.nan])


def test_normalised_reward_makes_the_weights_mean_what_they_say():
  from sc_dpo_jax.train.advantages import normalised_reward
  rng = np.random.RandomState(0)
  terms = {"clip_score": 0.85 + 0.05 * rng.randn(1000), "safety_cost": 13.0 * rng.randn(1000)}
  weights = {"clip_score": 1.0, "safety_cost": -1.0}
  total, scales = normalised_reward(terms, weights, "std")
  assert scales == pytest.approx({k: v.std() for k, v in terms.items()})
  np.testing.assert_allclose(total, terms["clip_score"] / scales["clip_score"]
                             - terms["safety_cost"] / scales["safety_cost"], rtol=1e-5)
  # Each term now moves the reward by the same amount per standard deviation; raw, the cost swamps CLIP.
  raw, raw_scales = normalised_reward(terms, weights, "none")
  assert raw_scales == {"clip_score": 1.0, "safety_cost": 1.0}
  assert abs(np.corrcoef(raw, terms["clip_score"])[0, 1]) < 0.2
  assert np.corrcoef(total, terms["clip_score"])[0, 1] > 0.5
  # A constant term adds a constant (no division by zero).
  const, _ = normalised_reward({"a": np.ones(4), "b": np.arange(4.0)}, {"a": 1.0, "b": 1.0}, "std")
  assert np.all(np.isfinite(const))
  with pytest.raises(ValueError, match="config.reward.normalize"):
    normalised_reward(terms, weights, "minmax")


def test_weigh_negative_scales_only_the_negative_advantages():
  a = np.array([-2.0, -0.5, 0.0, 0.25, 3.0], np.float32)
  np.testing.assert_array_equal(advantages.weigh_negative(a, 1.0), a)
  np.testing.assert_array_equal(advantages.weigh_negative(a, 0.0), [0.0, 0.0, 0.0, 0.25, 3.0])
  np.testing.assert_allclose(advantages.weigh_negative(a, 0.5), [-1.0, -0.25, 0.0, 0.25, 3.0])
  assert advantages.weigh_negative(a, 0.5).dtype == np.float32
  for bad in (-0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="negative_advantage_weight"):
      advantages.weigh_negative(a, bad)
