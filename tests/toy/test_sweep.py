"""The toy sweep: axes parsed against the config (errors name the key), the grid, stages shared between points that
do not change them, the Pareto front, and a real two-point sweep on the quick demo's stages."""
import json
import os
import shutil
import sys

import pytest

from sc_dpo_jax.configs import toy as toy_config
from sc_dpo_jax.toy import sweep
from tests.subprocess_helper import run


def test_axes_parse_to_the_config_types_and_errors_name_the_key():
  c = toy_config.toy_config("quick")
  axes = sweep.parse_axes(c, ["sc_dpo.objective.beta=100,200", "sc_dpo.train.steps=10,20",
                              "data.safe_rewrites=false,true", "world.unsafe=red,blue"])
  assert axes[0].values == (100.0, 200.0) and isinstance(axes[0].values[0], float)
  assert axes[1].values == (10, 20) and isinstance(axes[1].values[0], int)
  assert axes[2].values == (False, True) and axes[3].values == ("red", "blue")
  with pytest.raises(KeyError, match="sc_dpo.objective has no key 'betta'"):
    sweep.parse_axes(c, ["sc_dpo.objective.betta=1"])
  with pytest.raises(ValueError, match="sc_dpo.train.steps: 'many' is not an int"):
    sweep.parse_axes(c, ["sc_dpo.train.steps=many"])
  with pytest.raises(ValueError, match="expected KEY=V1,V2"):
    sweep.parse_axes(c, ["sc_dpo.objective.beta"])
  with pytest.raises(ValueError, match="is a section"):
    sweep.parse_axes(c, ["sc_dpo.objective=1"])
  with pytest.raises(ValueError, match="only scalar keys"):
    sweep.parse_axes(c, ["methods=sc_dpo"])
  with pytest.raises(ValueError, match="given twice"):
    sweep.parse_axes(c, ["sc_dpo.objective.beta=1", "sc_dpo.objective.beta=2"])


def test_grid_names_and_shared_stages(tmp_path):
  c = toy_config.toy_config("quick")
  steps = c.sc_dpo.train.steps
  assert steps not in (10, 20)
  axes = sweep.parse_axes(c, ["sc_dpo.objective.beta=100,200", "sc_dpo.train.steps=10,20"])
  grid = sweep.points(c, axes)
  assert [name for name, _, _ in grid] == [
      "sc_dpo.objective.beta=100.0__sc_dpo.train.steps=10", "sc_dpo.objective.beta=100.0__sc_dpo.train.steps=20",
      "sc_dpo.objective.beta=200.0__sc_dpo.train.steps=10", "sc_dpo.objective.beta=200.0__sc_dpo.train.steps=20"]
  assert grid[1][2].sc_dpo.train.steps == 20 and c.sc_dpo.train.steps == steps   # the base config is untouched
  layouts = [sweep.point_layout(str(tmp_path), pc, name) for name, _, pc in grid]
  assert len({l.stages for l in layouts}) == 1 and len({l.base_eval for l in layouts}) == 1
  assert len({l.run("sc_dpo", 0) for l in layouts}) == 4
  assert len({l.run("duo", 0) for l in layouts}) == 1            # DUO's config is the same at every point
  assert layouts[0].run("sc_dpo", 1) != layouts[0].run("sc_dpo", 0)
  other = sweep.points(c, sweep.parse_axes(c, ["data.min_cost_gap=0.5,1.0"]))
  stages = {sweep.point_layout(str(tmp_path), pc, name).stages for name, _, pc in other}
  assert len(stages) == 2                                          # a data key gives each point its datasets


def _summary(models):
  head = lambda v: {"unsafe_prompts": {"safe_and_intact": v, "unsafe_rate": 1 - v, "broken_rate": 0.0,  # noqa: E731
                                       "intervals": {"safe_and_intact": [v, v]}},
                    "safe_prompts": {"retention": 0.9, "intervals": {"retention": [0.9, 0.9]}}}
  return {"headline": {m: head(v) for m, v in models.items()},
          "models": {m: {"direct": {"unsafe_rate": 1 - v}} for m, v in models.items()}}


def test_table_lists_the_base_and_each_defence_once_unless_a_point_changes_the_defence():
  results = [("a", {"sc_dpo.objective.beta": 1.0}, _summary({"base": 0.0, "sc_dpo": 0.5, "sld": 0.4})),
             ("b", {"sc_dpo.objective.beta": 2.0}, _summary({"base": 0.0, "sc_dpo": 0.6, "sld": 0.4}))]
  rows = sweep.table(results)
  assert [(r["point"], r["model"]) for r in rows] == [("-", "base"), ("a", "sc_dpo"), ("-", "sld"),
                                                      ("b", "sc_dpo")]
  results = [("p", {"defence.sld_preset": "max"}, _summary({"base": 0.0, "sld": 0.4})),
             ("q", {"defence.sld_preset": "strong"}, _summary({"base": 0.0, "sld": 0.1}))]
  assert [(r["point"], r["model"]) for r in sweep.table(results)] == [("-", "base"), ("p", "sld"), ("q", "sld")]


def test_pareto_front():
  rows = [dict(retention=0.9, safe_and_intact=0.1), dict(retention=0.8, safe_and_intact=0.8),
          dict(retention=0.7, safe_and_intact=0.7), dict(retention=0.5, safe_and_intact=0.9)]
  assert sweep.pareto(rows) == [True, True, False, True]


# The same xdist group as the quick demo: its stages (cost model, SC-DPO pairs) are reused. Slow (about 2 minutes
# beside the rest of the suite): `make test-slow` runs it.
@pytest.mark.slow
@pytest.mark.xdist_group("toy_demo")
def test_sweep_command_runs_a_grid_on_shared_stages(tmp_path, quick_workdir):
  c = toy_config.toy_config("quick")
  overrides = {"eval.images_per_set": 16, "eval.images_per_safe_set": 16, "sc_dpo.train.checkpoint_every": 1000}
  for key, value in overrides.items():
    sweep._set(c, key, value)
  stages = sweep.point_layout(str(tmp_path), c, "x").stages
  os.makedirs(stages)
  for sub in ("cost_model", "data"):
    shutil.copytree(quick_workdir / sub, os.path.join(stages, sub))
  cmd = [sys.executable, "-m", "sc_dpo_jax.toy.sweep", "--config=configs/toy.py:quick", f"--workdir={tmp_path}",
         "--config.progress=false", "--config.methods=sc_dpo", "--sweep", "sc_dpo.train.steps=4,8"] + [
             f"--config.{k}={v}" for k, v in overrides.items()]
  proc = run(cmd, timeout=600)
  assert f"The sweep's table is in {tmp_path}/sweep.md" in proc.stdout
  assert "sweep point 2/2: sc_dpo.train.steps=8" in proc.stdout
  table = json.loads((tmp_path / "sweep.json").read_text())
  assert [(r["model"], r["overrides"]) for r in table["rows"]] == [
      ("base", {}), ("sc_dpo", {"sc_dpo.train.steps": 4}), ("sc_dpo", {"sc_dpo.train.steps": 8})]
  assert all(0 <= r["safe_and_intact"] <= 1 and len(r["retention_interval"]) == 2 for r in table["rows"])
  assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / "shared")) == ["base", "stages"]   # one of each
  runs = sorted(os.listdir(tmp_path / "runs"))
  assert len(runs) == 2 and all(r.startswith("sc_dpo-") for r in runs)
  for name in ("sweep.md", "pareto.png", "points/sc_dpo.train.steps=4/report/report.md"):
    assert (tmp_path / name).stat().st_size > 0, name
  # Resumable: the same command again trains nothing and samples nothing (the runs' files are untouched); the
  # table is the same.
  kept = {p: p.stat().st_mtime_ns for r in runs for p in (tmp_path / "runs" / r / "seed0").iterdir()}
  run(cmd, timeout=600)
  assert {p: p.stat().st_mtime_ns for p in kept} == kept
  assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == table["rows"]
