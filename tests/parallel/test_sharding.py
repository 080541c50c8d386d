"""parallel: mesh, logical-axis rules, sharded state and step.

Rules and plans are checked in this process on abstract shapes (``jax.eval_shape``) and ``AbstractMesh`` es,
so nothing compiles. The 8-device checks run in a subprocess with ``--xla_force_host_platform_device_count=8``
(which must be set before JAX starts): ONE worker, started by a module fixture, prints one JSON line that
several tests read (one JAX start; 45-55 s of a CPU, most of it compiling the step programs). For each
DPO-family method it trains one step of a one-block UNet unsharded on one device and sharded under some
meshes, and reports the differences. XLA's backend optimisation is lowered in the worker
(``--xla_backend_optimization_level=0`` and friends): it halves the compile time and changes no arithmetic the
comparison depends on (both sides are compiled the same way).

Optimiser of the comparisons: AdamW with ``eps = 1e-2``. With the default ``eps = 1e-8`` Adam's first update is
``lr * g / (|g| + 1e-8)``, i.e. ``lr * sign(g)``, and a gradient entry within rounding of zero (|g| ~ 1e-9) turns
a 1e-12 difference of summation order into an update difference of up to ``lr``: a property of Adam, not of
sharding (measured: 2.5e-5 at lr 1e-4 with pure data parallelism). ``eps = 1e-2`` keeps the update a smooth
function of the gradient, so the parameters compare the gradients. ``beta = 20``: the DPO logit is ``beta``
times a difference of mean squared errors, so float32 rounding of the errors (1e-7 relative, differing with the
summation order) reaches the loss multiplied by beta; at the published 5000 it is of order 1e-4.
"""
import json
import math
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from sc_dpo_jax import models, parallel
from sc_dpo_jax.models import lora
from sc_dpo_jax.parallel import distributed, rules
from sc_dpo_jax.parallel.mesh import resolve_shape
from sc_dpo_jax.rewards.cost_model import CostAdapter
from tests.subprocess_helper import run

pytestmark = pytest.mark.xdist_group("parallel")

# Quick CPU compiles for the worker processes. jaxlib 0.11 dropped --xla_cpu_use_fusion_emitters (an unknown
# XLA flag aborts the process), so it is passed only to the jaxlib versions that know it.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" + (
    " --xla_cpu_use_fusion_emitters=false" if tuple(map(int, jax.__version__.split(".")[:2])) < (0, 11) else "")
# A one-block SD1-style UNet: resnets with skip convs, time embedding, and in the mid block self- and
# cross-attention and the feed-forward: every kind of parameter of SD's UNet, compiled in a few seconds.
TINY_UNET = dict(block_out_channels=(32,), layers_per_block=(1,), down_block_types=("DownBlock2D",),
                 up_block_types=("UpBlock2D",), transformer_layers_per_block=(1,), attention_head_dim=(2,))
PAIRS, TEXT_LEN, TEXT_DIM = 8, 4, 32
OPTIM = dict(learning_rate=1e-3, eps=1e-2, weight_decay=0.0)
RUNS = {   # name -> (objective, LoRA config or None)
    "diffusion_dpo": (dict(method="diffusion_dpo", beta=20.0), None),
    "sc_dpo": (dict(method="sc_dpo", beta=20.0), None),
    "duo": (dict(method="duo", beta=20.0, duo_lambda=10.0), dict(rank=4, alpha=4, targets="self_attention")),
}
# (run, meshes): every method and every mesh at least once; full fine-tuning and LoRA under (2, 2, 2).
JOBS = [("diffusion_dpo", [(8, 1, 1), (2, 2, 2)]), ("sc_dpo", [(2, 4, 1)]), ("duo", [(2, 2, 2)])]
TOLERANCE = 1e-5
EVAL_AT = ("diffusion_dpo", (2, 2, 2))   # also checks make_sharded_eval there
ATTN = "mid_block/attentions_0/transformer_blocks_0"
NAMED = {   # parameter -> expected mesh spec per (data, fsdp, tensor)
    f"{ATTN}/attn1/to_q/kernel": {(8, 1, 1): P(), (2, 4, 1): P("fsdp"), (2, 2, 2): P("fsdp", "tensor")},
    f"{ATTN}/attn1/to_out_0/kernel": {(8, 1, 1): P(), (2, 4, 1): P(None, "fsdp"), (2, 2, 2): P("tensor", "fsdp")},
    f"{ATTN}/attn2/to_k/kernel": {(8, 1, 1): P(), (2, 4, 1): P("fsdp"), (2, 2, 2): P("fsdp", "tensor")},
    f"{ATTN}/ff/net_0/proj/kernel": {(8, 1, 1): P(), (2, 4, 1): P("fsdp"), (2, 2, 2): P("fsdp", "tensor")},
    "down_blocks_0/resnets_0/conv1/kernel": {(8, 1, 1): P(), (2, 4, 1): P(None, None, None, "fsdp"),
                                             (2, 2, 2): P(None, None, "tensor", "fsdp")},
    "down_blocks_0/resnets_0/time_emb_proj/kernel": {(8, 1, 1): P(), (2, 4, 1): P(None, "fsdp"),
                                                     (2, 2, 2): P(None, "fsdp")},
    "down_blocks_0/resnets_0/norm1/scale": {(8, 1, 1): P(), (2, 4, 1): P(), (2, 2, 2): P()},
}
NAMED_LORA = {   # LoRA leaves (path under .layers) -> expected spec under (2, 2, 2)
    f"{ATTN}/attn1/to_q/kernel/lora_a": P("fsdp"),              # (embed, lora_rank)
    f"{ATTN}/attn1/to_q/kernel/lora_b": P(None, "tensor"),      # (lora_rank, heads)
    f"{ATTN}/attn1/to_out_0/kernel/lora_a": P("tensor"),        # (heads, lora_rank)
    f"{ATTN}/attn1/to_out_0/kernel/lora_b": P(None, "fsdp"),    # (lora_rank, embed)
}


# ------------------------------------------------------------------------------------------ 8-device worker

def _world():
  from sc_dpo_jax import diffusion
  from sc_dpo_jax.models.random_init import host_random_params
  unet = models.UNet2DConditionModel(models.tiny_config(**TINY_UNET))
  params = host_random_params(unet, seed=0)
  rng = np.random.RandomState(0)
  shared = 0.5 * rng.randn(PAIRS, 8, 8, 4)
  pattern = 0.3 * rng.randn(1, 8, 8, 4)
  batch = dict(latents_chosen=(shared + pattern).astype(np.float32),
               latents_rejected=(shared - pattern).astype(np.float32),
               text_states=rng.randn(PAIRS, TEXT_LEN, TEXT_DIM).astype(np.float32),
               cost_chosen=np.full(PAIRS, -1.0, np.float32), cost_rejected=rng.uniform(0, 2, PAIRS).astype(np.float32))
  empty = rng.randn(1, TEXT_LEN, TEXT_DIM).astype(np.float32)
  return unet, diffusion.default_schedule(), params, batch, empty


def _flat(tree):
  return {rules.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _max_diff(a, b) -> float:
  fa, fb = _flat(jax.device_get(a)), _flat(jax.device_get(b))
  assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))[:5]
  return max((float(np.max(np.abs(np.asarray(fa[k], np.float64) - np.asarray(fb[k], np.float64))))
              for k in fa if np.size(fa[k])), default=0.0)


def _mesh_errors():
  """make_mesh's errors on 8 devices: (shape, message) pairs."""
  out = []
  for shape in ({"data": 3}, {"data": -1, "fsdp": 3}, {"data": -1, "fsdp": -1}, {"fsdp": 2, "model": 4},
                {"data": 2, "fsdp": 2, "tensor": 1}):
    try:
      parallel.make_mesh(shape)
    except (ValueError, KeyError) as e:
      out.append([str(shape), f"{type(e).__name__}: {e}"])
    else:
      out.append([str(shape), None])
  return out


def _extras() -> dict:
  """sharded_init and shard_tree on (2, 2, 2)."""
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  adapter = CostAdapter(hidden_sizes=(64,))
  init = lambda rng: adapter.init(rng, *adapter.dummy_inputs(24))["params"]   # noqa: E731
  sharded = parallel.sharded_init(init, jax.random.PRNGKey(0), mesh=mesh, min_shard_size=0)
  plain = nn.meta.unbox(jax.jit(init)(jax.random.PRNGKey(0)))
  host = {"a": np.arange(64 * 8, dtype=np.float32).reshape(64, 8), "b": np.float32(2.0)}
  placed = parallel.shard_tree(host, {"a": NamedSharding(mesh, P("fsdp", "tensor")), "b": parallel.replicated(mesh)})
  return dict(
      init_diff=_max_diff(sharded, plain), init_boxed=any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
          sharded, is_leaf=lambda x: isinstance(x, nn.Partitioned))),
      init_specs={k: str(v.sharding.spec) for k, v in _flat(sharded).items()},
      placed_equal=bool(np.array_equal(np.asarray(placed["a"]), host["a"])) and float(placed["b"]) == 2.0,
      placed_shard_shapes=sorted({tuple(s.data.shape) for s in placed["a"].addressable_shards}),
      placed_again_is_same=parallel.shard_tree(placed, {"a": placed["a"].sharding, "b": placed["b"].sharding})["a"]
      is placed["a"],
  )


def eight_device_worker() -> dict:
  """Runs JOBS; returns what the tests assert on (JSON-able)."""
  from sc_dpo_jax.data.device import global_batch
  from sc_dpo_jax.train import dpo_steps, optim, sharded_state
  from sc_dpo_jax.train import state as state_lib
  assert jax.device_count() == 8, jax.devices()
  out = {"runs": [], "mesh_errors": _mesh_errors(), "extras": _extras()}
  mesh = parallel.make_mesh({"fsdp": 4})
  out["mesh_default_data"] = [dict(mesh.shape), mesh.axis_names, parallel.mesh.describe(mesh)]
  unet, schedule, params, batch, empty = _world()
  specs = parallel.module_logical_specs(unet)
  key = jax.random.PRNGKey(3)
  for name, meshes in JOBS:
    objective, lora_config = RUNS[name]
    tx, lr_schedule = optim.make_optimizer(OPTIM)
    state, frozen = state_lib.create_train_state(params, tx, lr_schedule, lora=lora_config,
                                                 rng=jax.random.PRNGKey(1), empty_text=empty)
    initial = jax.device_get(state.params)
    step = dpo_steps.make_dpo_step(unet, schedule, objective)
    if name == EVAL_AT[0]:
      ref_eval = jax.device_get(dpo_steps.make_dpo_eval(unet, schedule, objective)(state, frozen, batch, key))
    start = time.time()
    ref_state, ref_metrics = step(state, frozen, batch, key)
    ref = jax.device_get((ref_state.params, ref_state.opt_state, ref_metrics))
    ref_seconds = time.time() - start
    for shape in meshes:
      mesh = parallel.make_mesh(dict(zip(parallel.AXES, shape)))
      start = time.time()
      extra = {"text_encoder": ({"w": np.ones((16, 8), np.float32)}, NamedSharding(mesh, P("fsdp")))}
      s_state, s_frozen, shardings = sharded_state.sharded_train_state(
          params, tx, lr_schedule, mesh=mesh, param_specs=specs, min_shard_size=0, lora=lora_config,
          rng=jax.random.PRNGKey(1), empty_text=empty, frozen_extra=extra)
      init_diff = _max_diff(s_state.params, initial)
      sharded = parallel.make_sharded_step(step.fn, shardings)
      gbatch = global_batch(batch, mesh)
      eval_diff = None
      if (name, shape) == EVAL_AT:   # before the step: the step donates the state
        evaluate = parallel.make_sharded_eval(dpo_steps.dpo_eval_fn(unet, schedule, objective), shardings)
        got_eval = jax.device_get(evaluate(s_state, s_frozen, gbatch, key))
        eval_diff = max(abs(float(got_eval[k]) - float(ref_eval[k])) / max(1.0, abs(float(ref_eval[k])))
                        for k in ref_eval if "accuracy" not in k and "tie" not in k)
      new_state, metrics = sharded(s_state, s_frozen, gbatch, key)
      got = jax.device_get((new_state.params, new_state.opt_state, metrics))
      seconds = time.time() - start
      param_specs = {k: str(v.sharding.spec) for k, v in _flat(new_state.params).items()}
      frozen_key = state_lib.BASE_UNET if lora_config else state_lib.REF_UNET
      frozen_specs = {k: str(v.sharding.spec) for k, v in _flat(s_frozen[frozen_key]).items()}
      opt_specs = {k: str(v.sharding.spec) for k, v in _flat(new_state.opt_state).items()}
      planned = _flat(shardings.state.params)
      sizes = {k: int(np.size(v)) for k, v in _flat(new_state.params).items()}
      out["runs"].append(dict(
          method=name, mesh=list(shape), lora=bool(lora_config), seconds=round(seconds, 1),
          ref_seconds=round(ref_seconds, 1), loss=float(metrics["loss"]), ref_loss=float(ref[2]["loss"]),
          loss_diff=abs(float(metrics["loss"]) - float(ref[2]["loss"])),
          metrics={k: [float(ref[2][k]), float(metrics[k])] for k in ref[2]},
          param_diff=_max_diff(got[0], ref[0]), opt_diff=_max_diff(got[1], ref[1]),
          update_size=_max_diff(ref[0], initial), init_diff=init_diff,
          param_specs=param_specs, frozen_specs=frozen_specs, opt_specs=opt_specs,
          sizes=sizes, planned_kept=all(v.sharding == planned[k] for k, v in _flat(new_state.params).items()),
          fallbacks=[str(f) for f in shardings.trainable_plan.fallbacks],
          fallback_paths=[f.path for f in shardings.trainable_plan.fallbacks],
          bytes_total=shardings.unet_plan.bytes_total, bytes_per_device=shardings.unet_plan.bytes_per_device,
          trace_count=sharded.trace_count, empty_text_spec=str(s_frozen["empty_text"].sharding.spec),
          extra_spec=str(s_frozen["text_encoder"]["w"].sharding.spec), eval_diff=eval_diff,
      ))
  return out


MARK = "EIGHT_DEVICE_RESULT "


@pytest.fixture(scope="module")
def eight():
  """The worker's results: {"runs": [...], "mesh_errors": [...], ...}."""
  env = dict(TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  code = f"import json, tests.parallel.test_sharding as t; print({MARK!r} + json.dumps(t.eight_device_worker()))"
  start = time.time()
  result = run([sys.executable, "-c", code], env=env, timeout=400)
  lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
  assert lines, f"the worker printed no {MARK.strip()} line:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
  out = json.loads(lines[-1][len(MARK):])
  out["wall_seconds"] = time.time() - start
  return out


def _runs(eight, **match):
  found = [r for r in eight["runs"] if all(r[k] == v for k, v in match.items())]
  assert found, (match, [(r["method"], r["mesh"]) for r in eight["runs"]])
  return found


# --------------------------------------------------------------------------------- sharded = unsharded

def test_every_method_and_mesh_is_covered(eight):
  assert {r["method"] for r in eight["runs"]} == set(RUNS)
  assert {tuple(r["mesh"]) for r in eight["runs"]} == {(8, 1, 1), (2, 4, 1), (2, 2, 2)}
  assert any(r["lora"] for r in eight["runs"]) and any(not r["lora"] for r in eight["runs"])


def test_sharded_step_matches_the_single_device_step(eight):
  report = []
  for r in eight["runs"]:
    # relative differences of the continuous metrics (accuracies and tie counts jump when a tie at step 0
    # rounds differently, so they are left out)
    r["metric_diff"] = max(abs(got - ref) / max(1.0, abs(ref)) for k, (ref, got) in r["metrics"].items()
                           if np.isfinite(ref) and not any(w in k for w in ("accuracy", "tie", "fraction")))
    report.append(f"{r['method']:14s} {tuple(r['mesh'])}: loss {r['loss']:.6f} (diff {r['loss_diff']:.1e}), "
                  f"params diff {r['param_diff']:.1e} (update size {r['update_size']:.1e}), opt state diff "
                  f"{r['opt_diff']:.1e}, metrics rel. diff {r['metric_diff']:.1e}, init diff {r['init_diff']:.1e}, "
                  f"{r['seconds']}s (single device {r['ref_seconds']}s)")
  print("\n".join(report))
  for r in eight["runs"]:
    assert r["init_diff"] == 0.0, r["method"]            # sharded creation = create_train_state
    assert r["loss_diff"] <= TOLERANCE, report
    assert r["metric_diff"] <= TOLERANCE, report         # grad_norm, rewards, errors, ...
    assert r["param_diff"] <= TOLERANCE, report
    assert r["opt_diff"] <= TOLERANCE, report
    assert r["update_size"] > 50 * TOLERANCE, report       # the step did move the parameters (by ~lr = 1e-3)
    assert r["trace_count"] == 1
    assert r["planned_kept"]                                # out_shardings keep the planned layout


def test_named_parameters_are_split_as_the_rules_say(eight):
  for r in _runs(eight, lora=False):
    mesh = tuple(r["mesh"])
    for path, expected in NAMED.items():
      assert r["param_specs"][path] == str(expected[mesh]), (path, mesh, r["param_specs"][path])
      assert r["frozen_specs"][path] == str(expected[mesh]), (path, mesh)
    # AdamW's mu and nu follow their parameters; its count is replicated
    q = f"{ATTN}/attn1/to_q/kernel"
    mirrored = [k for k in r["opt_specs"] if k.endswith(q)]
    assert len(mirrored) == 2 and all(r["opt_specs"][k] == str(NAMED[q][mesh]) for k in mirrored), mirrored
    assert all(r["opt_specs"][k] == str(P()) for k in r["opt_specs"] if k.endswith("count"))
    assert r["empty_text_spec"] == str(P())
  for r in _runs(eight, lora=True, mesh=[2, 2, 2]):
    for path, expected in NAMED_LORA.items():
      assert r["param_specs"][f"layers/{path}"] == str(expected), (path, r["param_specs"][f"layers/{path}"])
    assert r["frozen_specs"][f"{ATTN}/attn1/to_q/kernel"] == str(P("fsdp", "tensor"))   # the base, frozen


def test_fsdp_leaves_no_kernel_replicated(eight):
  """With fsdp > 1 (and min_shard_size=0) no kernel stays replicated, and every UNet kernel carries "fsdp",
  except where a fallback was recorded (none here: the tiny UNet's dims divide; see the CLIP test below)."""
  checked = 0
  for r in eight["runs"]:
    if r["mesh"][1] == 1:
      continue
    for path, spec in r["param_specs"].items():
      if not path.endswith(("kernel", "lora_a", "lora_b")) or path in r["fallback_paths"]:
        continue
      checked += 1
      assert spec != str(P()), (r["method"], r["mesh"], path)
      if not r["lora"]:
        assert "fsdp" in spec, (r["method"], r["mesh"], path, spec)
    for text in r["fallbacks"]:
      assert "not divisible" in text
  assert checked > 40
  # memory: the full-fine-tuning parameters on (2, 4, 1) are split about four ways
  r = _runs(eight, method="sc_dpo")[0]
  assert r["bytes_per_device"] < 0.3 * r["bytes_total"], r


def test_sharded_eval_init_and_placement(eight):
  evals = [r["eval_diff"] for r in eight["runs"] if r["eval_diff"] is not None]
  assert len(evals) == 1 and evals[0] <= TOLERANCE, evals
  for r in eight["runs"]:
    assert r["extra_spec"] == str(P("fsdp")), r["extra_spec"]   # frozen_extra keeps its sharding
  x = eight["extras"]
  assert x["init_diff"] == 0.0 and not x["init_boxed"]
  assert x["init_specs"]["hidden_0/kernel"] == str(P("fsdp", "tensor"))   # (projection 24, mlp 64)
  assert x["init_specs"]["out/kernel"] == str(P("tensor"))                # (mlp 64, cost 1)
  assert x["placed_equal"] and x["placed_shard_shapes"] == [[32, 4]] and x["placed_again_is_same"]


def test_make_mesh_errors_name_axes_and_device_count(eight):
  errors = dict(map(tuple, eight["mesh_errors"]))
  assert "8 devices" in errors["{'data': 3}"] and "data" in errors["{'data': 3}"]
  assert "does not divide the 8 devices" in errors["{'data': -1, 'fsdp': 3}"]
  assert "at most one axis may be -1" in errors["{'data': -1, 'fsdp': -1}"]
  assert errors["{'fsdp': 2, 'model': 4}"].startswith("KeyError") and "'model'" in errors["{'fsdp': 2, 'model': 4}"]
  assert "has 4 devices" in errors["{'data': 2, 'fsdp': 2, 'tensor': 1}"]
  shape, names, text = eight["mesh_default_data"]
  assert shape == {"data": 2, "fsdp": 4, "tensor": 1} and names == list(parallel.AXES)
  assert text == "mesh data=2 fsdp=4 tensor=1 (8 devices, cpu, 1 process)"


# ------------------------------------------------------------------------------ rules on abstract shapes

def _abstract(module, *inputs):
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *(inputs or module.dummy_inputs()))["params"]


def _names(specs):
  return {n for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) for n in s if n is not None}


@pytest.fixture(scope="module")
def abstract_models():
  """name -> (abstract boxed params) of every model family we shard, tiny configs."""
  unet = models.UNet2DConditionModel(models.tiny_config())
  adapter = CostAdapter(hidden_sizes=(16, 16))
  return {
      "unet": _abstract(unet),
      "clip_text": _abstract(models.CLIPTextModel(models.tiny_text_config(), with_projection=True)),
      "clip_vision": _abstract(models.CLIPVisionModel(models.tiny_vision_config(), with_projection=True)),
      "vae": _abstract(models.AutoencoderKL(models.tiny_vae_config())),
      "cost_adapter": _abstract(adapter, *adapter.dummy_inputs(24)),
  }


def test_every_logical_name_has_a_rule(abstract_models):
  names = set()
  for tree in abstract_models.values():
    names |= _names(rules.logical_specs(tree))
  unet = abstract_models["unet"]
  adapters = lora.init_lora(nn.meta.unbox(unet), jax.random.PRNGKey(0), rank=2, alpha=2, targets="attention_and_ff")
  names |= _names(lora.logical_axes(adapters, rules.logical_specs(unet)))
  expected = {"conv_height", "conv_width", "conv_in", "conv_out", "embed", "heads", "mlp", "cross_embed", "norm",
              "time_embed", "vocab", "positions", "projection", "cost", "lora_rank"}
  assert expected <= names, expected - names    # the list below is what the models really use
  assert names <= rules.rule_names(rules.DEFAULT_RULES), names - rules.rule_names(rules.DEFAULT_RULES)
  # and every model plans on a mesh that uses all three axes
  for name, tree in abstract_models.items():
    rules.plan_shardings(tree, AbstractMesh((2, 2, 2), parallel.AXES), min_shard_size=0)


def test_fallbacks_are_recorded_for_non_divisible_dims(abstract_models):
  """The tiny CLIP text tower has a 37-wide MLP and a 99-token vocabulary: nothing divides them."""
  tree = abstract_models["clip_text"]
  plan = rules.plan_shardings(tree, AbstractMesh((1, 4, 2), parallel.AXES), min_shard_size=0)
  specs = {rules.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      plan.specs, is_leaf=lambda x: isinstance(x, P))[0]}
  by_path = {}
  for f in plan.fallbacks:
    assert f.size % f.mesh_size != 0, f
    by_path.setdefault(f.path, []).append(f)
  fc1 = "text_model/encoder/layers_0/mlp/fc1/kernel"     # (embed 32, mlp 37)
  assert specs[fc1] == P("fsdp"), specs[fc1]             # mlp stays whole, embed takes fsdp
  # mlp asked for tensor (37 % 2): recorded; its second choice fsdp was never tried (embed had taken it)
  assert {(f.logical, f.mesh_axes) for f in by_path[fc1]} == {("mlp", ("tensor",))}
  assert "size 37" in str(by_path[fc1][0]) and "final spec" in str(by_path[fc1][0])
  token = "text_model/embeddings/token_embedding/embedding"   # (vocab 99, embed 32)
  assert specs[token] == P(None, "fsdp")
  assert ("vocab", ("tensor",)) in {(f.logical, f.mesh_axes) for f in by_path[token]}
  assert all(f.path in specs for f in plan.fallbacks)
  # with fsdp > 1 every kernel is split over fsdp or has a recorded fallback
  for path, spec in specs.items():
    if path.endswith(("kernel", "embedding")) and "fsdp" not in tuple(spec):
      assert path in by_path, (path, spec)


def test_stable_diffusion_unet_under_fsdp_8():
  """The real SD1.5 UNet (abstract, 860M parameters): every kernel of at least MIN_SHARD_SIZE elements is split
  over fsdp, nothing falls back, and a device holds about an eighth of the 3.3 GB."""
  unet = models.UNet2DConditionModel(models.sd15_config())
  tree = _abstract(unet)
  plan = rules.plan_shardings(tree, AbstractMesh((1, 8, 1), parallel.AXES))
  assert plan.fallbacks == []
  flat = jax.tree_util.tree_flatten_with_path(plan.specs, is_leaf=lambda x: isinstance(x, P))[0]
  shapes = {rules.path_str(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]}
  large = [(rules.path_str(p), s) for p, s in flat if math.prod(shapes[rules.path_str(p)]) >= rules.MIN_SHARD_SIZE]
  assert len(large) > 200
  assert all("fsdp" in tuple(s) for _, s in large), [p for p, s in large if "fsdp" not in tuple(s)][:5]
  assert plan.bytes_per_device < 1.01 * plan.bytes_total / 8, plan.describe()
  assert all(math.prod(shapes[p]) < rules.MIN_SHARD_SIZE for p in plan.small)


def test_rule_semantics():
  mesh = {"data": 2, "fsdp": 4, "tensor": 2}
  r = rules.normalize_rules(rules.DEFAULT_RULES)
  # priority in rule order; a taken mesh axis passes to the next rule; axes of size 1 are skipped
  assert rules.mesh_spec((64, 128), ("embed", "heads"), mesh, r)[0] == P("fsdp", "tensor")
  assert rules.mesh_spec((64, 128), ("embed", "heads"), dict(mesh, tensor=1), r)[0] == P("fsdp")
  assert rules.mesh_spec((3, 3, 64, 128), ("conv_height", "conv_width", "conv_in", "conv_out"), mesh, r)[0] == \
      P(None, None, "tensor", "fsdp")
  # a conv whose output channels do not divide: conv_in takes fsdp, and the fallback is recorded
  spec, fallbacks = rules.mesh_spec((3, 3, 64, 6), ("conv_height", "conv_width", "conv_in", "conv_out"), mesh, r,
                                    "x/kernel")
  assert spec == P(None, None, "fsdp", "tensor") and [(f.dim, f.mesh_axes) for f in fallbacks] == [(3, ("fsdp",))]
  # a tuple of mesh axes
  assert rules.mesh_spec((64,), ("embed",), mesh, [("embed", ("fsdp", "tensor"))])[0] == P(("fsdp", "tensor"))
  assert rules.mesh_spec((12,), ("embed",), mesh, [("embed", ("fsdp", "tensor"))])[0] == P()
  with pytest.raises(KeyError, match=r"a/kernel: logical axis name 'widgets'.*has no rule"):
    rules.mesh_spec((4, 4), ("embed", "widgets"), mesh, r, "a/kernel")
  with pytest.raises(ValueError, match=r"name more than one dim"):
    rules.mesh_spec((4, 4), ("embed", "embed"), mesh, r)
  with pytest.raises(ValueError, match=r"rule #1"):
    rules.normalize_rules([("embed", "fsdp"), ("mlp",)])
  with pytest.raises(ValueError, match=r"rule #0"):
    rules.normalize_rules([("embed", ("fsdp", "fsdp"))])
  # config-file form: lists
  assert rules.normalize_rules([["embed", ["fsdp"]], ["norm", None]]) == (("embed", ("fsdp",)), ("norm", None))


def test_small_parameters_stay_replicated():
  tree = {"big": jax.ShapeDtypeStruct((256, 128), np.float32), "small": jax.ShapeDtypeStruct((64, 32), np.float32)}
  specs = {"big": P("embed", "mlp"), "small": P("embed", "mlp")}
  mesh = AbstractMesh((2, 4, 1), parallel.AXES)
  plan = rules.plan_shardings(tree, mesh, specs=specs)
  assert plan.specs == {"big": P("fsdp"), "small": P()} and plan.small == ["small"]
  assert rules.plan_shardings(tree, mesh, specs=specs, min_shard_size=0).specs["small"] == P("fsdp")
  assert plan.bytes_per_device == 256 * 128 * 4 // 4 + 64 * 32 * 4


def test_optimizer_state_follows_the_parameters():
  params = {"w": jax.ShapeDtypeStruct((256, 512), np.float32), "b": jax.ShapeDtypeStruct((512,), np.float32)}
  specs = {"w": P("embed", "mlp"), "b": P("mlp")}
  mesh = AbstractMesh((2, 4, 1), parallel.AXES)
  shardings = rules.mesh_shardings(params, mesh, specs=specs, min_shard_size=0)
  for name, tx in [("adamw", optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))),
                   ("adafactor", optax.adafactor(1e-3, min_dim_size_to_factor=128))]:
    opt = jax.eval_shape(tx.init, params)
    out = parallel.opt_state_shardings(opt, params, shardings, mesh)
    flat = {rules.path_str(p): (s.spec, s.mesh) for p, s in jax.tree_util.tree_flatten_with_path(
        out, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
    leaves = {rules.path_str(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(opt)[0]}
    for path, shape in leaves.items():
      spec, _ = flat[path]
      if path.endswith("/w") and shape == (256, 512):
        assert spec == P("fsdp"), (name, path)
      elif path.endswith("/b") and shape == (512,):
        assert spec == P("fsdp"), (name, path)
      else:
        assert spec == P(), (name, path, shape)   # counts, factored statistics
    if name == "adamw":
      assert sum(1 for p in leaves if p.endswith("/w")) == 2      # mu and nu


def test_resolve_shape():
  assert resolve_shape(None, 8) == (8, 1, 1)
  assert resolve_shape({"fsdp": 4}, 8) == (2, 4, 1)
  assert resolve_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
  import ml_collections
  assert resolve_shape(ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 2}), 16) == (4, 2, 2)
  with pytest.raises(ValueError, match=r"mesh axis 'tensor' = 0"):
    resolve_shape({"tensor": 0}, 8)
  with pytest.raises(ValueError, match=r"\{'data': 2, 'fsdp': 2, 'tensor': 1\} has 4 devices.*8 devices"):
    resolve_shape({"data": 2, "fsdp": 2}, 8)


# ------------------------------------------------------------------------------------------ distributed

def test_distributed_plan():
  assert distributed.plan(env={}).mode == "single"
  assert distributed.plan(env={"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "1",
                               "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).mode == "single"   # one task
  slurm = distributed.plan(env={"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
                                "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
  assert slurm.mode == "auto" and "slurm" in slurm.reason and slurm.coordinator_address is None
  assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "h0,h1"}).mode == "auto"
  assert distributed.plan(env={"SC_DPO_DISTRIBUTED": "auto"}).mode == "auto"
  assert distributed.plan(env={"SC_DPO_DISTRIBUTED": "off", "TPU_WORKER_HOSTNAMES": "h0,h1"}).mode == "single"
  explicit = distributed.plan("localhost:1234", 2, 1, env={})
  assert explicit == distributed.Plan("explicit", "from the arguments", "localhost:1234", 2, 1, None)
  from_env = distributed.plan(env={"SC_DPO_COORDINATOR": "10.0.0.1:9999", "SC_DPO_NUM_PROCESSES": "4",
                                   "SC_DPO_PROCESS_ID": "3", "SC_DPO_LOCAL_DEVICE_IDS": "0,1"})
  assert (from_env.mode, from_env.coordinator_address, from_env.num_processes, from_env.process_id,
          from_env.local_device_ids) == ("explicit", "10.0.0.1:9999", 4, 3, [0, 1])
  with pytest.raises(ValueError, match=r"\['process_id'\] missing"):
    distributed.plan("localhost:1", 2, env={})
  with pytest.raises(ValueError, match=r"SC_DPO_NUM_PROCESSES='two' must be an integer"):
    distributed.plan(env={"SC_DPO_COORDINATOR": "h:1", "SC_DPO_NUM_PROCESSES": "two", "SC_DPO_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match=r"process_id 2 must be in \[0, num_processes = 2\)"):
    distributed.plan("h:1", 2, 2, env={})
  with pytest.raises(ValueError, match=r"'host:port'"):
    distributed.plan("localhost", 2, 0, env={})
  with pytest.raises(ValueError, match="SC_DPO_DISTRIBUTED"):
    distributed.plan(env={"SC_DPO_DISTRIBUTED": "yes"})


def test_initialize_single_process_does_nothing(monkeypatch):
  for key in ("SC_DPO_COORDINATOR", "SC_DPO_NUM_PROCESSES", "SC_DPO_PROCESS_ID", "SC_DPO_DISTRIBUTED",
              "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(key, raising=False)
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
  assert parallel.initialize().mode == "single" and called == []
