"""``config.mesh_rules`` -> ``parallel.rules_from_config``: the check (errors name the key) and the shardings.

Plans are made on abstract meshes and abstract parameters (``jax.eval_shape``): nothing is compiled.
"""
import json

import flax.linen as nn
import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from sc_dpo_jax import models, parallel
from sc_dpo_jax.parallel import rules
from sc_dpo_jax.configs.dpo_family import dpo_config
from sc_dpo_jax.configs.shielddiff_rl import rl_config

MESHES = ((1, 4, 2), (2, 2, 2), (1, 8, 1), (8, 1, 1))


def _specs(plan):
  return jax.tree.leaves(plan.specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _as_json(rule_list):
  """The rules as a config's JSON copy holds them: lists, None."""
  return json.loads(json.dumps([list(r) for r in rule_list]))


def test_base_configs_default_to_the_default_rules():
  for c in (dpo_config("duo", "tiny"), dpo_config("diffusion_dpo", "sd15"), rl_config("tiny")):
    assert c.mesh_rules is None
    assert parallel.rules_from_config(c.mesh_rules) is None   # plan_shardings reads None as DEFAULT_RULES
    c.lock()
    c.mesh_rules = (("embed", "fsdp"),)   # settable on a locked config, as --config.mesh_rules=...
    c.mesh_rules = [["embed", "fsdp"]]    # a list (JSON) too
    c.mesh_rules = None


def test_explicit_default_rules_give_the_same_shardings():
  unet = models.UNet2DConditionModel(models.tiny_config())
  abstract = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *unet.dummy_inputs())["params"]
  specs = rules.logical_specs(abstract)
  params = nn.meta.unbox(abstract)
  c = dpo_config("duo", "tiny")
  c.mesh_rules = _as_json(rules.DEFAULT_RULES)
  explicit = parallel.rules_from_config(c.mesh_rules)
  assert explicit == rules.normalize_rules(None)
  for shape in MESHES:
    mesh = AbstractMesh(shape, parallel.AXES)
    for min_shard_size in (0, rules.MIN_SHARD_SIZE):
      default = parallel.plan_shardings(params, mesh, parallel.rules_from_config(None), specs=specs,
                                        min_shard_size=min_shard_size)
      given = parallel.plan_shardings(params, mesh, explicit, specs=specs, min_shard_size=min_shard_size)
      assert _specs(given) == _specs(default), shape
      assert len(_specs(given)) == len(jax.tree.leaves(params))
      assert jax.tree.structure(given.specs) == jax.tree.structure(default.specs)
      assert [str(f) for f in given.fallbacks] == [str(f) for f in default.fallbacks]
      assert given.bytes_per_device == default.bytes_per_device
  # And a change of the rules changes the shardings: the same rules with every fsdp rule replicated.
  mesh = AbstractMesh((1, 4, 2), parallel.AXES)
  no_fsdp = parallel.rules_from_config([[n, None if a == "fsdp" else a] for n, a in _as_json(rules.DEFAULT_RULES)])
  plan = parallel.plan_shardings(params, mesh, no_fsdp, specs=specs, min_shard_size=0)
  assert not any("fsdp" in str(s) for s in _specs(plan))
  assert any("fsdp" in str(s) for s in _specs(parallel.plan_shardings(params, mesh, None, specs=specs,
                                                                       min_shard_size=0)))


def test_rules_from_config_accepts_what_a_config_holds():
  defaults = rules.normalize_rules(None)
  as_tuples = tuple((n, a) for n, a in defaults)
  assert parallel.rules_from_config(as_tuples) == defaults
  assert parallel.rules_from_config(_as_json(defaults)) == defaults
  multi = [["heads", ["tensor", "fsdp"]]] + _as_json(defaults)
  assert parallel.rules_from_config(multi)[0] == ("heads", ("tensor", "fsdp"))


@pytest.mark.parametrize("value, match", [
    ("embed=fsdp", r"config\.mesh_rules must be None .* got str"),
    ({"embed": "fsdp"}, r"config\.mesh_rules must be None .* got dict"),
    (3, r"config\.mesh_rules must be None .* got int"),
    ((), r"config\.mesh_rules is empty: set it to None for the default rules"),
    ([["embed"]], r"config\.mesh_rules: logical axis rule #0 \['embed'\] must be a pair"),
    ([["", "fsdp"]], r"config\.mesh_rules: logical axis rule #0 .*non-empty string"),
    ([["embed", ["fsdp", "fsdp"]]], r"config\.mesh_rules: logical axis rule #0 .*distinct names"),
    ([["embed", "fsdpp"]], r"config\.mesh_rules: logical axis rule #0 \('embed', \('fsdpp',\)\) names mesh axis "
                           r"'fsdpp'; the mesh axes are \('data', 'fsdp', 'tensor'\)"),
    ([["embed", "fsdp"]], r"config\.mesh_rules decides no mesh axes for the logical name\(s\) \['conv_height', "),
])
def test_rules_from_config_errors_name_the_key(value, match):
  with pytest.raises(ValueError, match=match):
    parallel.rules_from_config(value)


def test_missing_names_are_listed_with_a_hint():
  without_cost = [r for r in _as_json(rules.DEFAULT_RULES) if r[0] != "cost"]
  with pytest.raises(ValueError, match=r"\['cost'\]: add a rule for each, e\.g\. \('cost', None\)"):
    parallel.rules_from_config(without_cost)
  with pytest.raises(ValueError, match=r"^my\.rules: "):
    parallel.rules_from_config([["embed"]], key="my.rules")
