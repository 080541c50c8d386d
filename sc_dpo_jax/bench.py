"""Train-step and sampling benchmark: pairs/s, step time, peak device memory and MFU of a method's jitted step;
images/s of DDIM sampling with classifier-free guidance and VAE decode (``--mode=sample``).

    python -m sc_dpo_jax.bench --config=configs/diffusion_dpo.py:tiny                      # a CPU, seconds
    python -m sc_dpo_jax.bench --config=configs/diffusion_dpo.py:sd15 --peak_tflops=989     # one H100 (bf16 dense)
    python -m sc_dpo_jax.bench --config=configs/duo.py:sd15 --config.data.batch_size=8

The step is the trainer's own (``train.dpo_steps`` inside the NaN guard, sharded by ``parallel`` over the
config's mesh, state donated, compiled ahead of time), fed synthetic device-resident batches of the shapes
``config.model.architecture`` implies: latents ``[B, h, w, 4]`` and text states ``[B, L, D]`` (SD1.5: 64x64
latents, 77x768 states), as a run on precomputed latents and text states sees them. Weights are random
(drawn on the host). Imports no TensorFlow.

FLOPs come from XLA's cost analysis of the compiled step (per device); MFU = achieved FLOP/s per device /
``--peak_tflops``. Peak memory is the device's ``peak_bytes_in_use`` (GPU/TPU; CPUs do not report it); XLA's
memory analysis of the compiled program (arguments, outputs, temporaries, aliased = donated) is reported on
every backend as ``compiled_memory_gb``. ``--profile_dir`` traces a few more steps and ranks the kernels.

``--mode=sample`` times one compiled program: ``--sample_steps`` DDIM steps (eta 0) with guidance ``--guidance``
on a doubled batch (random conditional and unconditional text states, as if the prompts were encoded), then
the VAE decode, at ``--batch`` images; UNet from ``config.model`` (compute dtype, attention), the VAE of the
architecture (SD's for sd15/sd21, the tiny one for tiny; ``xla`` attention where the UNet's is ``cudnn``),
parameters random and stored in the compute dtype (as the fp16 PyTorch pipeline). ``bench/peer_torch.py`` is the
PyTorch peer; ``docs/performance.md`` the table.

    python -m sc_dpo_jax.bench --config=configs/diffusion_dpo.py:sd15 --mode=sample --batch=16

``--mode=check`` measures the numerics the speed rests on, on this backend (:func:`run_check`): the UNet's
forward in the config's compute dtype against the float32 forward (matmuls at "highest" precision), relative
L2 error (issue 9 asks <= 1e-2 for bf16), and the config's attention implementation against the reference one
at the UNet's attention shapes, forward and gradients.

    python -m sc_dpo_jax.bench --config=configs/diffusion_dpo.py:sd15 --mode=check

``--mode=memory`` predicts the step's device memory from shapes alone (``sc_dpo_jax.memory``): the exact train
state and the activations JAX saves for the backward under the config's dtype and remat policy.

    python -m sc_dpo_jax.bench --config=configs/diffusion_dpo.py:sd15 --mode=memory
"""
from __future__ import annotations

import json
import time
import zlib

from absl import app, flags
from ml_collections import config_flags

from sc_dpo_jax import profiling
from sc_dpo_jax.models.architectures import models_for, vae_for

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file of the DPO family.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of one device in the compute dtype (for MFU).")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_MODE = flags.DEFINE_enum("mode", "step", ["step", "sample", "check", "memory"],
                          "Time the train step, or DDIM sampling + decode; check the numerics; or estimate the "
                          "step's device memory from shapes (sc_dpo_jax.memory; nothing runs).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps (--mode=sample).")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (--mode=sample).")
_BATCH = flags.DEFINE_integer("batch", 16, "Images per sampling batch (--mode=sample).")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "After timing, trace --profile_steps more steps (batches) with jax.profiler into this "
    "folder and print the top kernels (sc_dpo_jax.profiling); the summary goes into the JSON as 'profile'.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Steps (batches) traced with --profile_dir.")
_UNET_PATH = flags.DEFINE_string("unet_path", None, "--mode=check: a diffusers UNet folder whose (trained) weights "
                                  "the check uses instead of random ones.")
_CHECK_TOL = flags.DEFINE_float("check_rel_tol", 1e-2, "--mode=check: the largest relative L2 error of the forward "
                                "in the compute dtype against float32 that passes (issue 9: 1e-2 for bf16).")
flags.mark_flags_as_required(["config"])


def _add_memory_and_profile(out, compiled, profile):
  """Adds XLA's memory analysis of ``compiled``, the device's peak memory (GPU/TPU) and the profile to ``out``."""
  import jax  # pylint: disable=g-import-not-at-top
  out["compiled_memory_gb"] = profiling.compiled_memory_gb(compiled)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
  if profile:
    out["profile"] = profile
  return out


def _profile(fn, steps: int):
  """The kernel ranking of ``steps`` more calls of ``fn``; a profiler that fails costs the profile, not the run."""
  try:
    summary = profiling.profile(fn, steps=steps, logdir=_PROFILE_DIR.value)
  except Exception as e:  # pylint: disable=broad-except  # e.g. no CUPTI: the timings above still stand
    print(f"profile failed ({type(e).__name__}: {e}); the timings stand without it")
    return {"error": f"{type(e).__name__}: {e}"}
  print(profiling.format_summary(summary))
  return summary


def run(config, *, steps: int, warmup: int, peak_tflops=None, profile_steps: int = 0):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from sc_dpo_jax import diffusion, parallel  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.data import device as device_lib  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.models.random_init import host_random_params  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.train import dpo_steps, guard, optim, sharded_state  # pylint: disable=g-import-not-at-top

  c = config
  objective = dpo_steps.resolve_config(c.objective)
  mesh = parallel.make_mesh(c.mesh.to_dict())
  unet, latent_shape, text_shape = models_for(c.model.architecture, jnp.dtype(c.model.dtype), c.model.attention,
                                              c.model.remat_policy)
  t0 = time.time()
  params = host_random_params(unet.clone(dtype=jnp.float32), seed=c.seed, fast=True)
  init_s = time.time() - t0
  schedule = diffusion.NoiseSchedule.from_config(
      {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
       "prediction_type": "v_prediction" if c.model.architecture == "sd21" else "epsilon"}, source="bench")
  batch_size = int(c.data.batch_size)
  tx, lr = optim.make_optimizer(c.optim, total_batch_size=batch_size, beta=float(objective.beta))
  lora = {k: c.lora[k] for k in ("rank", "alpha", "targets")} if c.lora.enabled else None
  rng = jax.random.PRNGKey(c.seed)
  empty = np.zeros((1,) + tuple(text_shape), np.float32)
  state, frozen, shardings = sharded_state.sharded_train_state(
      params, tx, lr, mesh=mesh, param_specs=parallel.module_logical_specs(unet),
      rules=parallel.rules_from_config(c.mesh_rules), min_shard_size=c.min_shard_size,
      lora=lora, rng=jax.random.fold_in(rng, 1), ref_dtype=None if lora else jnp.dtype(c.model.ref_dtype),
      empty_text=empty)
  del params
  fn = guard.skip_nonfinite(dpo_steps.dpo_step_fn(unet, schedule, objective))
  step = parallel.make_sharded_step(fn, shardings)
  host = np.random.default_rng(0)
  local = batch_size // jax.process_count()
  batch = {"latents_chosen": host.normal(size=(local,) + latent_shape).astype(np.float32),
           "latents_rejected": host.normal(size=(local,) + latent_shape).astype(np.float32),
           "text_states": host.normal(size=(local,) + tuple(text_shape)).astype(np.float32)}
  if objective.method == "sc_dpo":
    batch["cost_chosen"] = np.zeros((local,), np.float32)
    batch["cost_rejected"] = np.ones((local,), np.float32)
  batch = device_lib.global_batch(batch, mesh)
  t0 = time.time()
  compiled = step.jitted.lower(state, frozen, batch, rng).compile()
  compile_s = time.time() - t0
  flops = profiling.compiled_flops(compiled)
  metrics = None

  def advance():   # the state is donated: each call consumes it and keeps the new one
    nonlocal state, metrics
    state, metrics = compiled(state, frozen, batch, rng)

  for _ in range(warmup):
    advance()
  jax.block_until_ready(state)
  t0 = time.time()
  for _ in range(steps):
    advance()
  jax.block_until_ready((state, metrics))
  elapsed = time.time() - t0
  step_s = elapsed / steps
  profile = _profile(lambda: (advance(), jax.block_until_ready(state)), profile_steps) if profile_steps else None
  out = {
      "method": objective.method, "architecture": c.model.architecture, "lora": bool(lora),
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "batch_pairs": batch_size, "dtype": c.model.dtype, "attention": c.model.attention,
      "remat_policy": c.model.remat_policy, "compile_s": round(compile_s, 2), "host_init_s": round(init_s, 2),
      "step_s": step_s, "pairs_per_s": batch_size / step_s,
      "loss": float(np.asarray(metrics["loss"])),
  }
  if flops:
    out["tflop_per_step_per_device"] = flops / 1e12
    out["tflops_per_device"] = flops / step_s / 1e12
    if peak_tflops:
      out["mfu"] = out["tflops_per_device"] / peak_tflops
  return _add_memory_and_profile(out, compiled, profile)


def run_sample(config, *, batch: int, sample_steps: int, guidance: float, steps: int, warmup: int,
               profile_steps: int = 0):
  """Images/s of ``sample_steps`` DDIM steps with guidance ``guidance`` and the VAE decode, at ``batch``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from sc_dpo_jax import diffusion  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.models.random_init import host_random_params  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.models.vae import decode_latents  # pylint: disable=g-import-not-at-top

  c = config
  if batch < 1 or sample_steps < 1:
    raise ValueError(f"--batch ({batch}) and --sample_steps ({sample_steps}) must be positive")
  dtype = jnp.dtype(c.model.dtype)
  # The VAE's one attention has a single 512-wide head, beyond cuDNN flash attention's head sizes: XLA's then.
  vae_attention = "xla" if c.model.attention == "cudnn" else c.model.attention
  unet, latent_shape, text_shape = models_for(c.model.architecture, dtype, c.model.attention)
  vae = vae_for(c.model.architecture, dtype, vae_attention)
  t0 = time.time()
  cast = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)  # noqa: E731
  params = {"unet": cast(host_random_params(unet.clone(dtype=jnp.float32), seed=c.seed, fast=True)),
            "vae": cast(host_random_params(vae.clone(dtype=jnp.float32), seed=c.seed + 2, fast=True))}
  init_s = time.time() - t0
  schedule = diffusion.NoiseSchedule.from_config(
      {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
       "prediction_type": "v_prediction" if c.model.architecture == "sd21" else "epsilon", "clip_sample": False,
       "set_alpha_to_one": False, "steps_offset": 1}, source="bench")
  use_guidance = guidance > 1.0

  def denoise(unet_params, x, t, context):
    return unet.apply({"params": unet_params}, x, t, context)

  def sample(params, noise, context, uncond):
    latents = diffusion.sample(denoise, params["unet"], noise, context, schedule=schedule, num_steps=sample_steps,
                               guidance_scale=guidance if use_guidance else 1.0,
                               uncond_context=uncond if use_guidance else None)
    images = decode_latents(vae, params["vae"], latents.astype(dtype))
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)

  host = np.random.default_rng(0)
  noise = jnp.asarray(host.normal(size=(batch,) + latent_shape).astype(np.float32))
  context = jnp.asarray(host.normal(size=(batch,) + tuple(text_shape)).astype(dtype))
  uncond = jnp.asarray(host.normal(size=(batch,) + tuple(text_shape)).astype(dtype))
  t0 = time.time()
  compiled = jax.jit(sample).lower(params, noise, context, uncond).compile()
  compile_s = time.time() - t0
  for _ in range(warmup):
    images = compiled(params, noise, context, uncond)
    jax.block_until_ready(images)
  t0 = time.time()
  for _ in range(steps):
    images = compiled(params, noise, context, uncond)
  images = np.asarray(jax.block_until_ready(images))
  batch_s = (time.time() - t0) / steps
  profile = (_profile(lambda: jax.block_until_ready(compiled(params, noise, context, uncond)), profile_steps)
             if profile_steps else None)
  out = {
      "mode": "sample", "architecture": c.model.architecture, "devices": 1,
      "device_kind": jax.devices()[0].device_kind, "batch": batch, "sample_steps": sample_steps,
      "guidance": guidance, "unet_evals_per_step": 2 if use_guidance else 1, "dtype": c.model.dtype,
      "attention": c.model.attention, "image_shape": list(images.shape[1:]), "compile_s": round(compile_s, 2),
      "host_init_s": round(init_s, 2), "batch_s": batch_s, "images_per_s": batch / batch_s,
      "finite": bool(np.isfinite(images).all()),
  }
  return _add_memory_and_profile(out, compiled, profile)


# bf16 keeps 8 mantissa bits (half an ulp is 2e-3 to 4e-3 near 0.5-1) and kernels sum in different orders:
ATTENTION_OUT_ATOL = 1.5e-2      # attention outputs are O(1): absolute error
ATTENTION_GRAD_REL_TOL = 2e-2    # gradients: relative L2 against the float32 reference


def attention_shapes(unet, latent_shape, text_shape):
  """``(name, Lq, Lk, heads, head_dim)`` of every distinct attention call of ``unet`` at these input shapes."""
  cfg, shapes = unet.config, []
  for i, (block, width) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
    if block != "CrossAttnDownBlock2D":
      continue
    tokens = (latent_shape[0] // 2 ** i) ** 2
    heads = cfg.attention_head_dim[i]
    shapes.append((f"self {tokens}", tokens, tokens, heads, width // heads))
    shapes.append((f"cross {tokens}x{text_shape[0]}", tokens, text_shape[0], heads, width // heads))
  tokens = (latent_shape[0] // 2 ** (len(cfg.block_out_channels) - 1)) ** 2   # the mid block
  heads = cfg.attention_head_dim[-1]
  for name, lk in ((f"self {tokens} (mid)", tokens), (f"cross {tokens}x{text_shape[0]} (mid)", text_shape[0])):
    shapes.append((name, tokens, lk, heads, cfg.block_out_channels[-1] // heads))
  return shapes


def run_check(config, *, batch: int = 1, rel_tol: float = 1e-2, unet_path=None):
  """Numerics of ``config.model`` on this backend; see the module docstring (``--mode=check``).

  Weights: random (the architecture's shapes), or a diffusers UNet folder ``unet_path`` (trained weights).
  Besides the compute-dtype forward, the float32 forward with weights rounded to the compute dtype is
  compared too (``weights_only_rel_l2``): the part of the error that rounding the weights alone makes, which
  no kernel computing from such weights can avoid.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.models import dot_product_attention  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.models.random_init import host_random_params  # pylint: disable=g-import-not-at-top

  c = config
  dtype, attention = jnp.dtype(c.model.dtype), c.model.attention
  if unet_path:
    unet, params = models.load_unet(unet_path)
    unet = unet.clone(dtype=dtype, attention=attention)
    size = int(unet.config.sample_size)
    latent_shape, text_shape = (size, size, int(unet.config.in_channels)), (77, int(unet.config.cross_attention_dim))
  else:
    unet, latent_shape, text_shape = models_for(c.model.architecture, dtype, attention)
  # cuDNN takes no float32 inputs: the float32 forward uses XLA's attention (what the check compares is dtype).
  unet32 = unet.clone(dtype=jnp.float32, attention="xla" if attention == "cudnn" else attention)
  if not unet_path:
    params = host_random_params(unet32, seed=c.seed, fast=True)
  host = np.random.default_rng(0)
  x = jnp.asarray(host.normal(size=(batch,) + latent_shape).astype(np.float32))
  t = jnp.asarray(np.linspace(100, 900, batch).astype(np.int32))
  text = jnp.asarray(host.normal(size=(batch,) + tuple(text_shape)).astype(np.float32))
  with jax.default_matmul_precision("highest"):
    forward32 = jax.jit(unet32.apply).lower({"params": params}, x, t, text).compile()
    want = np.asarray(forward32({"params": params}, x, t, text), np.float64)
  got = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, text), np.float64)
  relative = lambda a: float(np.linalg.norm(a - want) / np.linalg.norm(want))  # noqa: E731
  rel = relative(got)
  rounded = jax.tree.map(lambda a: a.astype(dtype).astype(jnp.float32), params)
  with jax.default_matmul_precision("highest"):
    weights_only = relative(np.asarray(forward32({"params": rounded}, x, t, text), np.float64))
  out = {"mode": "check", "architecture": "loaded" if unet_path else c.model.architecture,
         "weights": unet_path or f"random (seed {c.seed})",
         "device_kind": jax.devices()[0].device_kind, "dtype": c.model.dtype, "attention": attention,
         "batch": batch, "forward_rel_l2_vs_float32": rel, "weights_only_rel_l2": weights_only,
         "forward_finite": bool(np.isfinite(got).all()),
         "forward_rel_tol": rel_tol, "attention_checks": [],
         # XLA's count for the float32 forward (every op, attention products included), per image.
         "forward_gflop_per_image_xla": (profiling.compiled_flops(forward32) or 0.0) / batch / 1e9}
  out["forward_ok"] = rel <= rel_tol and out["forward_finite"]
  if attention != "reference":
    compute = dtype if attention != "cudnn" or dtype != jnp.float32 else jnp.bfloat16

    def loss(q, k, v, cot, implementation):
      y = dot_product_attention(q, k, v, implementation=implementation)
      return jnp.sum(y.astype(jnp.float32) * cot), y

    for name, lq, lk, heads, dim in attention_shapes(unet, latent_shape, text_shape):
      keys = jax.random.split(jax.random.PRNGKey(zlib.crc32(name.encode())), 4)
      q, k, v = (jax.random.normal(kk, (batch, n, heads, dim)).astype(compute)
                 for kk, n in zip(keys[:3], (lq, lk, lk)))
      cot = jax.random.normal(keys[3], (batch, lq, heads, dim))
      grad = lambda impl: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),  # noqa: E731
                                  static_argnums=4)
      (_, y), g = grad(attention)(q, k, v, cot, attention)
      with jax.default_matmul_precision("highest"):
        (_, y_ref), g_ref = grad("reference")(*(a.astype(jnp.float32) for a in (q, k, v)), cot, "reference")
      err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - y_ref)))
      grad_rel = max(float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) / jnp.linalg.norm(b.ravel()))
                     for a, b in zip(g, g_ref))
      out["attention_checks"].append({
          "shape": name, "lq": lq, "lk": lk, "heads": heads, "head_dim": dim, "dtype": str(jnp.dtype(compute)),
          "out_max_abs": err, "grad_max_rel_l2": grad_rel,
          "ok": err <= ATTENTION_OUT_ATOL and grad_rel <= ATTENTION_GRAD_REL_TOL})
  out["ok"] = out["forward_ok"] and all(a["ok"] for a in out["attention_checks"])
  return out


def _write(result):
  print(json.dumps(result, indent=2))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from sc_dpo_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize()
  profile_steps = _PROFILE_STEPS.value if _PROFILE_DIR.value else 0
  if _MODE.value == "memory":
    from sc_dpo_jax import memory  # pylint: disable=g-import-not-at-top
    result = memory.estimate(_CONFIG.value)
    print(memory.format_estimate(result))
    _write(result)
    return
  if _MODE.value == "check":
    result = run_check(_CONFIG.value, rel_tol=_CHECK_TOL.value, unet_path=_UNET_PATH.value)
    print(f"check {result['architecture']} ({result['weights']} weights) on {result['device_kind']}: "
          f"{result['dtype']} forward vs float32, relative L2 {result['forward_rel_l2_vs_float32']:.2e} "
          f"(<= {result['forward_rel_tol']:g}: {'ok' if result['forward_ok'] else 'FAILED'}; rounding the weights "
          f"alone: {result['weights_only_rel_l2']:.2e}); XLA counts {result['forward_gflop_per_image_xla']:.4g} "
          f"GFLOP per image for the float32 forward")
    for a in result["attention_checks"]:
      print(f"  attention {result['attention']} vs reference, {a['shape']} tokens, {a['heads']}x{a['head_dim']} "
            f"{a['dtype']}: output max abs {a['out_max_abs']:.2e}, gradients rel L2 {a['grad_max_rel_l2']:.2e} "
            f"({'ok' if a['ok'] else 'FAILED'})")
    _write(result)
    if not result["ok"]:
      raise SystemExit(1)
    return
  if _MODE.value == "sample":
    result = run_sample(_CONFIG.value, batch=_BATCH.value, sample_steps=_SAMPLE_STEPS.value,
                        guidance=_GUIDANCE.value, steps=_STEPS.value, warmup=_WARMUP.value,
                        profile_steps=profile_steps)
    line = (f"sample {result['architecture']} DDIM {result['sample_steps']} steps, guidance {result['guidance']}, "
            f"+ VAE decode, batch {result['batch']} on {result['device_kind']}: {result['images_per_s']:.2f} "
            f"images/s, {result['batch_s']:.3f} s per batch")
    if "peak_memory_gb" in result:
      line += f", peak memory {result['peak_memory_gb']:.1f} GB"
    print(line)
    _write(result)
    return
  result = run(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value, peak_tflops=_PEAK.value,
               profile_steps=profile_steps)
  line = (f"{result['method']} {result['architecture']} x{result['batch_pairs']} pairs on {result['devices']} "
          f"{result['device_kind']}: {result['pairs_per_s']:.2f} pairs/s, step {result['step_s'] * 1e3:.1f} ms")
  if "tflops_per_device" in result:
    line += f", {result['tflops_per_device']:.2f} TFLOP/s per device"
  if "mfu" in result:
    line += f", MFU {100 * result['mfu']:.1f}%"
  if "peak_memory_gb" in result:
    line += f", peak memory {result['peak_memory_gb']:.1f} GB"
  print(line)
  _write(result)


if __name__ == "__main__":
  app.run(main)
