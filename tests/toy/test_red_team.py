"""``toy.red_team`` on the shipped toy base with tiny attack settings: the stages' caches (a second run searches,
optimises and samples nothing; another setting redoes its stage) and the shape of the results."""
import os

import pytest

from sc_dpo_jax import models
from sc_dpo_jax.attack import ring_a_bell as rab
from sc_dpo_jax.attack import unlearndiff as ud
from sc_dpo_jax.configs import toy as toy_config
from sc_dpo_jax.toy import evaluate, pretrain, red_team, world


def _team():
  c = toy_config.toy_config("quick").attack
  c.prompts, c.images_per_prompt = 3, 2
  c.ring_a_bell.update(dict(population=8, generations=2, elite=2))
  c.unlearndiff.update(dict(steps=2, batch_size=4))
  w = world.World("red")
  evaluator = evaluate.Evaluator(w, None, images_per_set=1, images_per_safe_set=1, steps=2, batch_size=8)
  return red_team.RedTeam(c, w, evaluator)


def test_a_second_run_does_no_work_and_a_changed_setting_redoes_its_stage(tmp_path, monkeypatch):
  pipe = models.load_pipeline(os.path.join(pretrain.pretrained_folder(), "pipeline"))
  team = _team()
  key = {"model": "base", "weights": 1}
  defences = {"negative_prompt": (str(tmp_path / "neg"), {"negative_prompt": "red"})}

  def attack_all(t):
    return red_team.run_attacks(t, red_team.ATTACKS, pipe, base_params=pipe.params["unet"], base_key=key,
                                base_folder=str(tmp_path / "base"), models={}, defences=defences)

  first = attack_all(team)
  assert set(first) == {"base", "negative_prompt"}
  for row in first.values():
    assert set(row) == set(red_team.SETS) and all(r["images"] == 6 for r in row.values())
  assert all(not set(p.split()) & set(team.blocklist) for p in first["base"]["ring_a_bell"]["prompts"])

  calls = []
  real_generate = type(pipe).generate

  def counting_generate(self, *args, **kwargs):
    calls.append(len(args[0]))
    return real_generate(self, *args, **kwargs)

  def boom(*args, **kwargs):
    raise AssertionError("a cached stage ran again")

  with monkeypatch.context() as m:
    m.setattr(rab, "attack", boom)
    m.setattr(ud, "attack", boom)
    m.setattr(type(pipe), "generate", boom)
    again = attack_all(team)
  strip = lambda res: {row: {s: {k: v for k, v in r.items() if k != "pictures"} for s, r in sets.items()}  # noqa
                       for row, sets in res.items()}
  assert strip(again) == strip(first)

  # Another UnlearnDiff setting: its prompts and their images are made again, nothing else.
  team.settings.unlearndiff.steps = 3
  with monkeypatch.context() as m:
    m.setattr(rab, "attack", boom)
    m.setattr(type(pipe), "generate", counting_generate)
    attack_all(team)
  assert calls == [6, 6]          # the base's and the defence's images of the new UnlearnDiff prompts


def test_settings_are_checked():
  team = _team()
  assert len(team.sources) == 3 and team.draws(["x"]) == ["x", "x"]
  c = toy_config.toy_config("quick").attack
  c.prompts = 0
  with pytest.raises(ValueError, match="config.attack.prompts"):
    red_team.RedTeam(c, world.World("red"), team.evaluator)
