"""``attention="auto"`` and the load-time check of ``"cudnn"`` (``models.attention.resolve``).

On this CPU ``auto`` must resolve to ``xla`` (and the UNet then computes exactly what it computes with ``xla``),
and ``cudnn`` must fail at load time saying to use ``auto`` or ``xla``. The GPU rule (compute capability, dtype,
head widths) is checked with the platform passed in explicitly, so it runs everywhere.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax import models
from sc_dpo_jax.models import attention, sd15_config, sd21_config, tiny
from sc_dpo_jax.models.attention import Platform

HOPPER = Platform("gpu", cuda=True, compute_capability=(9, 0), device_kind="NVIDIA H200")
AMPERE = Platform("gpu", cuda=True, compute_capability=(8, 0), device_kind="NVIDIA A100-SXM4-80GB")
TURING = Platform("gpu", cuda=True, compute_capability=(7, 5), device_kind="Tesla T4")
ROCM = Platform("gpu", cuda=False, device_kind="AMD Instinct MI300X")
TPU = Platform("tpu", device_kind="TPU v5 lite")
CPU = Platform("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("attention") / "tiny"
  models.save_pipeline(str(path), tiny.tiny_pipeline(seed=0))
  return str(path)


@pytest.fixture
def logged(monkeypatch):
  lines = []
  monkeypatch.setattr(attention.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  return lines


def test_auto_is_xla_on_cpu_and_computes_what_xla_computes(folder, logged):
  unet, params = models.load_unet(f"{folder}/unet", attention="auto")
  assert unet.attention == "xla"
  assert logged == ["unet attention: auto -> xla (platform cpu)"]
  xla, _ = models.load_unet(f"{folder}/unet", attention="xla")
  inputs = unet.dummy_inputs(size=8)
  rng = np.random.RandomState(0)
  inputs = [rng.randn(*np.shape(x)).astype(np.float32) for x in inputs]
  inputs[1] = np.array([10] * len(inputs[1]))
  assert unet == xla                     # the very module "xla" builds, so one compiled program serves both
  run = jax.jit(lambda module, *args: module.apply({"params": params}, *args), static_argnums=0)
  np.testing.assert_array_equal(np.asarray(run(unet, *inputs)), np.asarray(run(xla, *inputs)))
  pipe = models.load_pipeline(folder, attention="auto")
  assert (pipe.unet.attention, pipe.text_encoder.attention, pipe.vae.attention) == ("xla", "xla", "xla")
  assert [line.split(":")[0] for line in logged[1:]] == ["unet attention", "CLIP text attention", "vae attention"]


def test_cudnn_on_cpu_fails_at_load_naming_the_fix(folder):
  fix = r"cannot run here: cuDNN flash attention runs on NVIDIA GPUs only, and this is platform cpu.*'auto'.*'xla'"
  with pytest.raises(ValueError, match="unet attention 'cudnn' " + fix):
    models.load_unet(f"{folder}/unet", attention="cudnn")
  with pytest.raises(ValueError, match="unet attention 'cudnn' " + fix):
    models.load_pipeline(folder, attention="cudnn", dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="CLIP text attention 'cudnn' " + fix):
    models.load_clip_text(f"{folder}/text_encoder", attention="cudnn")
  with pytest.raises(ValueError, match="unknown attention implementation 'flash9'"):
    models.load_unet(f"{folder}/unet", attention="flash9")


def test_unet_with_attention_resolves_for_the_trainer(logged):
  unet = tiny.tiny_pipeline(seed=0).unet
  assert models.unet_with_attention(unet, "auto").attention == "xla"
  assert models.unet_with_attention(unet, "reference") is unet           # nothing to change
  assert logged == ["unet attention: auto -> xla (platform cpu)"]
  with pytest.raises(ValueError, match="'auto'"):
    models.unet_with_attention(unet, "cudnn")


def test_head_widths_of_the_sd_unets():
  assert attention.unet_head_dims(sd15_config()) == (40, 80, 160)
  assert attention.unet_head_dims(sd21_config()) == (64,)


@pytest.mark.parametrize("platform,head_dims,dtype,refusal", [
    (HOPPER, (40, 80, 160), jnp.bfloat16, None),                     # SD1.5's UNet on an H100/H200
    (HOPPER, (64,), jnp.float16, None),                              # SD2.1's UNet, CLIP
    (HOPPER, (256,), jnp.bfloat16, None),                            # the widest Hopper takes
    (HOPPER, (512,), jnp.bfloat16, r"heads \[512\] wide .*at most 256"),   # the SD VAE
    (HOPPER, (36, 64), jnp.bfloat16, r"heads \[36\] wide .*multiples of 8"),
    (HOPPER, (64,), jnp.float32, "float16/bfloat16 .* float32"),
    (AMPERE, (40, 80, 160), jnp.bfloat16, r"heads \[160\] wide .*at most 128"),   # SD1.5 on an A100
    (AMPERE, (64,), jnp.bfloat16, None),
    (TURING, (64,), jnp.bfloat16, "compute capability 8.0 or later"),
    (ROCM, (64,), jnp.bfloat16, "NVIDIA GPUs only"),
    (TPU, (64,), jnp.bfloat16, "NVIDIA GPUs only, and this is platform tpu"),
    (CPU, (64,), jnp.bfloat16, "NVIDIA GPUs only, and this is platform cpu"),
])
def test_cudnn_rule_per_platform_dtype_and_head_width(platform, head_dims, dtype, refusal, logged):
  reason = attention.cudnn_refusal(head_dims, dtype, platform)
  if refusal is None:
    assert reason is None
  else:
    assert reason is not None and re.search(refusal, reason), reason
  choice = attention.resolve("auto", head_dims=head_dims, dtype=dtype, platform=platform, what="unet")
  assert choice == ("cudnn" if refusal is None else "xla")
  assert logged[-1].startswith(f"unet attention: auto -> {choice} (platform {platform.backend}")
  if refusal is None:
    assert attention.resolve("cudnn", head_dims=head_dims, dtype=dtype, platform=platform) == "cudnn"
  else:
    with pytest.raises(ValueError, match="'cudnn' cannot run here.*'auto'.*'xla'"):
      attention.resolve("cudnn", head_dims=head_dims, dtype=dtype, platform=platform)


def test_reference_and_xla_do_not_query_the_platform(monkeypatch):
  def boom():
    raise AssertionError("the platform was queried")
  monkeypatch.setattr(attention, "current_platform", boom)
  for name in ("reference", "xla"):
    assert attention.resolve(name, head_dims=(512,), dtype=jnp.float32) == name


def test_auto_in_a_module_decides_per_call():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (2, 9, 3, 16)) for key in (k1, k2, k3))
  np.testing.assert_array_equal(models.dot_product_attention(q, k, v, implementation="auto"),
                                models.dot_product_attention(q, k, v, implementation="xla"))
