"""The PyTorch peer of ``python -m sc_dpo_jax.bench``: the Diffusion-DPO step and DDIM sampling in diffusers.

    python bench/peer_torch.py --arch=tiny --mode=step --steps=2                        # a CPU smoke test
    python bench/peer_torch.py --arch=sd15 --mode=step --peak_tflops=989 --json=peer_step.json   # one H100
    python bench/peer_torch.py --arch=sd15 --mode=step --compile
    python bench/peer_torch.py --arch=sd15 --mode=sample --batch=16 --sample_steps=50

``--mode=step`` is the official Diffusion-DPO training step (METHODS.md): ``--batch_pairs`` pairs = a ``[w; l]``
batch of ``2 * batch_pairs`` latents ``[B, 4, 64, 64]`` with text states ``[B, 77, 768]``, the same noise and
timestep for both images of a pair, per-sample MSE of the policy and of the frozen reference, ``inside =
-0.5 * beta * (model_diff - ref_diff)``, ``loss = -logsigmoid(inside).mean()``. The policy is full fine-tuning:
float32 master weights, forward and backward under ``torch.autocast(bfloat16)`` (AMP), AdamW. The reference is
a frozen bfloat16 copy in eval mode under ``no_grad``. Weights are random (nothing is downloaded).

``--mode=sample``: ``--sample_steps`` DDIM steps (diffusers' ``DDIMScheduler``, SD1.5's settings) with
classifier-free guidance ``--guidance`` on a doubled batch (random conditional and unconditional text states),
then the ``AutoencoderKL`` decode, at ``--batch`` images; float16 on CUDA, float32 on CPU.

FLOP accounting (issue 9): one SD1.5 UNet forward at 64x64 latents = 677 GFLOP per image; a DPO pair = 8
forward-equivalents (policy forward + backward = 3 on each of 2 images, reference forward on 2) = 5.42 TFLOP.
TFLOP/s = pairs/s x 5.42 (sd15 only; for tiny the figures are counted by ``torch.utils.flop_counter``, they do
not compare with anything). MFU = TFLOP/s / ``--peak_tflops`` (H100 SXM dense bf16: 989).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

SD15_FORWARD_GFLOP = 677.0            # one SD1.5 UNet forward, one image, 64x64x4 latents (issue 9)
FORWARDS_PER_PAIR = 8                 # 2 images x (policy forward + backward = 3) + 2 reference forwards
SD15_PAIR_TFLOP = SD15_FORWARD_GFLOP * FORWARDS_PER_PAIR / 1e3   # 5.42

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
VAE_DOWN = ("DownEncoderBlock2D",) * 4
VAE_UP = ("UpDecoderBlock2D",) * 4

# runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json, written out (no download).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=DOWN_BLOCKS, up_block_types=UP_BLOCKS,
                 mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
                 norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=VAE_DOWN, up_block_types=VAE_UP,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=4,
                norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# sc_dpo_jax.models.unet_config.tiny_config(cross_attention_dim=32) and vae_config.tiny_vae_config().
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                 layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=VAE_DOWN[:2], up_block_types=VAE_UP[:2],
                block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                sample_size=16)
ARCHS = {"sd15": (SD15_UNET, SD15_VAE, (77, 768)), "tiny": (TINY_UNET, TINY_VAE, (16, 32))}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
  p.add_argument("--mode", choices=("step", "sample", "flops"), default="step",
                 help="flops: count one UNet forward's FLOPs per image (meta tensors, nothing runs).")
  p.add_argument("--batch_pairs", type=int, default=8, help="DPO pairs per step (2x images).")
  p.add_argument("--batch", type=int, default=16, help="Images per sampling batch.")
  p.add_argument("--sample_steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--beta", type=float, default=5000.0, help="Diffusion-DPO beta (SD1.5 recipe: 5000).")
  p.add_argument("--lr", type=float, default=1e-8)
  p.add_argument("--steps", type=int, default=10, help="Timed steps (sampling: timed batches).")
  p.add_argument("--warmup", type=int, default=2, help="Untimed steps first (compilation, autotuning).")
  p.add_argument("--compile", action="store_true", help="torch.compile the UNet (default: eager).")
  p.add_argument("--gradient_checkpointing", action="store_true",
                 help="Step: the policy UNet recomputes activations in the backward (diffusers' own switch).")
  p.add_argument("--device", default=None, help="cuda if available, else cpu.")
  p.add_argument("--peak_tflops", type=float, default=None, help="Peak dense TFLOP/s of the device (for MFU).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="Also write the results here.")
  p.add_argument("--profile_steps", type=int, default=0,
                 help="After timing, run this many more steps under torch.profiler and report the top kernels.")
  return p.parse_args(argv)


def dpo_loss(model_err, ref_err, beta: float):
  """Official Diffusion-DPO loss from per-sample errors over the ``[w; l]`` batch (first half preferred).

  Returns ``(loss, inside)`` with ``inside = -0.5 * beta * (model_diff - ref_diff)``, ``*_diff = err_w - err_l``.
  """
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  model_w, model_l = model_err.chunk(2)
  ref_w, ref_l = ref_err.chunk(2)
  inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
  return -F.logsigmoid(inside).mean(), inside


def _sync(device):
  import torch  # pylint: disable=g-import-not-at-top
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _models(arch, device):
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  unet_config, vae_config, text_shape = ARCHS[arch]
  unet = UNet2DConditionModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()})
  vae = AutoencoderKL(**{k: list(v) if isinstance(v, tuple) else v for k, v in vae_config.items()})
  return unet.to(device), vae, text_shape


def run_step(args, device):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  policy, _, text_shape = _models(args.arch, device)
  reference = copy.deepcopy(policy).to(torch.bfloat16).eval().requires_grad_(False)
  policy.train()
  if args.gradient_checkpointing:
    policy.enable_gradient_checkpointing()
  if args.compile:
    policy = torch.compile(policy)
    reference = torch.compile(reference)
  optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=1e-2)
  alphas_cumprod = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"}
                                 ).alphas_cumprod.to(device)
  n = args.batch_pairs
  size = ARCHS[args.arch][0]["sample_size"]
  g = torch.Generator(device="cpu").manual_seed(args.seed)
  latents = torch.randn((2 * n, 4, size, size), generator=g).to(device)              # [w; l]
  text = torch.randn((2 * n,) + text_shape, generator=g).to(device)
  amp = dict(device_type=device.type, dtype=torch.bfloat16)

  def step():
    noise = torch.randn((n, 4, size, size), device=device).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (n,), device=device).repeat(2)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.autocast(**amp):
      pred = policy(noisy, t, text).sample
    model_err = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    with torch.no_grad():
      ref_pred = reference(noisy.to(torch.bfloat16), t, text.to(torch.bfloat16)).sample
      ref_err = F.mse_loss(ref_pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    loss, _ = dpo_loss(model_err, ref_err, args.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  warmup_s = _warmup(step, args.warmup, device)
  flops = None
  if args.arch != "sd15":   # count one step (tiny: quick); sd15 uses the accounting
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    counter = FlopCounterMode(display=False)
    with counter:
      step()
    flops = counter.get_total_flops()
  loss, step_s = _timed(step, args.steps, device)
  profile = _profile(step, args.profile_steps, device)
  out = {"mode": "step", "arch": args.arch, "compile": args.compile,
         "gradient_checkpointing": args.gradient_checkpointing, "device": str(device),
         "device_name": _device_name(device), "torch": torch.__version__, "batch_pairs": n, "beta": args.beta,
         "warmup_s": round(warmup_s, 2), "step_s": step_s, "pairs_per_s": n / step_s,
         "loss": float(loss.detach()), "peak_memory_gb": _peak_memory(device)}
  if profile:
    out["profile"] = profile
  if args.arch == "sd15":
    out["tflop_per_step"] = SD15_PAIR_TFLOP * n
    out["flop_accounting"] = "issue 9: 677 GFLOP per UNet forward per image, 8 forward-equivalents per pair"
  else:
    out["tflop_per_step"] = flops / 1e12
    out["flop_accounting"] = "torch.utils.flop_counter (tiny: not comparable with sd15 figures)"
  out["tflops"] = out["tflop_per_step"] / step_s
  if args.peak_tflops:
    out["mfu"] = out["tflops"] / args.peak_tflops
  return out


def run_sample(args, device):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  dtype = torch.float16 if device.type == "cuda" else torch.float32
  unet, vae, text_shape = _models(args.arch, device)
  unet, vae = unet.to(dtype).eval(), vae.to(device, dtype).eval()
  if args.compile:
    unet = torch.compile(unet)
  scheduler = DDIMScheduler(**SCHEDULER)
  size = ARCHS[args.arch][0]["sample_size"]
  b = args.batch
  g = torch.Generator(device="cpu").manual_seed(args.seed)
  init = torch.randn((b, 4, size, size), generator=g).to(device, dtype)
  context = torch.randn((b,) + text_shape, generator=g).to(device, dtype)
  uncond = torch.randn((b,) + text_shape, generator=g).to(device, dtype)
  both = torch.cat([uncond, context])
  use_guidance = args.guidance > 1.0

  @torch.no_grad()
  def sample():
    scheduler.set_timesteps(args.sample_steps, device=device)
    x = init * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
      if use_guidance:
        out_u, out_c = unet(torch.cat([x, x]), t, both).sample.chunk(2)
        out = out_u + args.guidance * (out_c - out_u)
      else:
        out = unet(x, t, context).sample
      x = scheduler.step(out, t, x, eta=0.0).prev_sample
    images = vae.decode(x / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)

  warmup_s = _warmup(sample, args.warmup, device)
  images, batch_s = _timed(sample, args.steps, device)
  profile = _profile(sample, args.profile_steps, device)
  out = {"mode": "sample", "arch": args.arch, "compile": args.compile, "device": str(device),
          "device_name": _device_name(device), "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
          "batch": b, "sample_steps": args.sample_steps, "guidance": args.guidance,
          "image_shape": list(images.shape[1:]), "warmup_s": round(warmup_s, 2), "batch_s": batch_s,
          "images_per_s": b / batch_s, "finite": bool(torch.isfinite(images).all()),
          "peak_memory_gb": _peak_memory(device)}
  if profile:
    out["profile"] = profile
  return out


def _profile(fn, steps: int, device, top: int = 15):
  """The top kernels (CUDA) or operators (CPU) by self time over ``steps`` calls of ``fn``; None if 0 steps."""
  if steps < 1:
    return None
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  cuda = device.type == "cuda"
  activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
  try:
    with profile(activities=activities) as prof:
      for _ in range(steps):
        fn()
      _sync(device)
  except Exception as e:  # pylint: disable=broad-except  # the timings stand without a profile
    print(f"profile failed ({type(e).__name__}: {e}); the timings stand without it", file=sys.stderr)
    return {"error": f"{type(e).__name__}: {e}"}
  rows = []
  for e in prof.key_averages():
    us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
        else e.self_cpu_time_total
    if us > 0:
      rows.append((e.key, us / 1e3 / steps, e.count / steps))
  rows.sort(key=lambda r: -r[1])
  # On a GPU, CPU-side operator rows carry no device time; what remains are the kernels (and memcpy/memset).
  total = sum(ms for _, ms, _ in rows)
  return {"source": "cuda kernels (torch.profiler)" if cuda else "cpu operators (torch.profiler)",
          "steps": steps, "device_ms_per_step": total,
          "top": [{"name": name, "ms_per_step": ms, "share": ms / total if total else 0.0, "calls_per_step": n}
                  for name, ms, n in rows[:top]]}


def run_flops(args):
  """FLOPs of one UNet forward on one image, by operator (``torch.utils.flop_counter`` on meta tensors)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  unet_config, _, text_shape = ARCHS[args.arch]
  size = unet_config["sample_size"]
  with torch.device("meta"):
    unet = UNet2DConditionModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()})
    counter = FlopCounterMode(display=False)
    with counter:
      unet(torch.zeros(1, 4, size, size), torch.tensor([500]), torch.zeros((1,) + text_shape))
  by_op = {str(op).removeprefix("aten.").split(".")[0]: n / 1e9
           for op, n in counter.get_flop_counts()["Global"].items()}
  conv = sum(v for k, v in by_op.items() if "convolution" in k)
  linear = sum(v for k, v in by_op.items() if k in ("addmm", "mm"))
  return {"mode": "flops", "arch": args.arch, "compile": False, "gflop_per_image": counter.get_total_flops() / 1e9,
          "gflop_by_op": by_op, "conv_and_linear_gflop": conv + linear,
          "attention_gflop": sum(v for k, v in by_op.items() if k in ("bmm", "baddbmm") or "attention" in k),
          "params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


def _warmup(fn, n: int, device) -> float:
  """Calls ``fn`` ``n`` times (compilation, autotuning), then resets the peak-memory counter; seconds taken."""
  import torch  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  for _ in range(n):
    fn()
  _sync(device)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  return time.time() - t0


def _timed(fn, n: int, device):
  """``(fn's last output, seconds per call)`` over ``n`` synchronised calls."""
  _sync(device)
  t0 = time.time()
  for _ in range(n):
    out = fn()
  _sync(device)
  return out, (time.time() - t0) / n


def _device_name(device):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _peak_memory(device):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def summary(out) -> str:
  """The one-line result, with the figures ``python -m sc_dpo_jax.bench`` prints."""
  if out["mode"] == "flops":
    return (f"peer flops {out['arch']}: one UNet forward, one image: {out['gflop_per_image']:.4g} GFLOP = "
            f"convolutions and linear layers {out['conv_and_linear_gflop']:.4g} + attention products "
            f"{out['attention_gflop']:.4g} "
            f"({out['params_m']:.1f} M parameters)")
  kind = "torch.compile" if out["compile"] else "eager"
  memory = "n/a (CPU)" if out["peak_memory_gb"] is None else f"{out['peak_memory_gb']:.1f} GB"
  if out["mode"] == "step":
    line = (f"peer diffusion_dpo {out['arch']} ({kind}, AMP bf16) x{out['batch_pairs']} pairs on "
            f"{out['device_name']}: {out['pairs_per_s']:.2f} pairs/s, step {out['step_s'] * 1e3:.1f} ms, "
            f"{out['tflops']:.2f} TFLOP/s")
    if out["arch"] != "sd15":
      line += " (tiny: not meaningful)"
    if "mfu" in out:
      line += f", MFU {100 * out['mfu']:.1f}%"
    return line + f", loss {out['loss']:.4f}, peak memory {memory}"
  return (f"peer sample {out['arch']} ({kind}, {out['dtype']}) DDIM {out['sample_steps']} steps, guidance "
          f"{out['guidance']}, + VAE decode, batch {out['batch']} on {out['device_name']}: "
          f"{out['images_per_s']:.2f} images/s, {out['batch_s']:.3f} s per batch, peak memory {memory}")


def main(argv=None):
  args = parse_args(argv)
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    sys.exit(f"bench/peer_torch.py needs torch and diffusers ({e}); see bench/README.md")
  diffusers.utils.logging.set_verbosity_error()
  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  if args.steps < 1 or args.warmup < 0:
    sys.exit("--steps must be >= 1 and --warmup >= 0")
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  if args.mode == "flops":
    out = run_flops(args)
  else:
    out = run_step(args, device) if args.mode == "step" else run_sample(args, device)
  if out["mode"] == "step" and not math.isfinite(out["loss"]):
    print(f"warning: non-finite loss {out['loss']}", file=sys.stderr)
  print(summary(out))
  print(json.dumps(out, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
