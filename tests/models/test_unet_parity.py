"""Our Flax UNet against diffusers' PyTorch UNet2DConditionModel on the same weights.

Tolerance: 1e-4 absolute in float32. Both sides compute in float32 but sum in different orders (XLA's conv
and dot kernels vs oneDNN/ATen); over ~40 layers the rounding differences grow to ~1e-6 relative, and the
outputs of these randomly perturbed nets are O(1), so 1e-4 leaves two orders of margin while a single wrong
transpose, epsilon or activation shows up as >= 1e-2.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sc_dpo_jax import models
from sc_dpo_jax.models import tiny_config
from sc_dpo_jax.models.random_init import host_random_params as random_params
from tests.torch_reference import torch_unet, torch_unet_output, unet_inputs

TOL = 1e-4

SD1_TINY = tiny_config()
SD2_TINY = tiny_config(block_out_channels=(32, 64, 64), layers_per_block=(1, 1, 1),
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
                       use_linear_projection=True, upcast_attention=True, cross_attention_dim=48)

VARIANTS = {
    "sd1": SD1_TINY,
    "sd2": SD2_TINY,
    # Every other architecture knob we accept, at a non-default value.
    "knobs": tiny_config(layers_per_block=(2, 1), transformer_layers_per_block=(2, 1),
                         downsample_padding=0, mid_block_scale_factor=1.5, center_input_sample=True,
                         flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, time_embedding_dim=96,
                         in_channels=3, out_channels=5, conv_in_kernel=1, conv_out_kernel=5),
}


def _load(tmp_path, config, **kwargs):
  ref = torch_unet(config)
  ref.save_pretrained(tmp_path / "unet")
  unet, params = models.load_unet(str(tmp_path / "unet"), **kwargs)
  return ref, unet, params


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_diffusers(tmp_path, name):
  config = VARIANTS[name]
  ref, unet, params = _load(tmp_path, config)
  assert unet.config == config
  x, t, text = unet_inputs(config)
  expected = torch_unet_output(ref, x, t, text)
  got = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, text))
  assert got.shape == expected.shape
  assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero tensors
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_odd_sample_size_forwards_upsample_size(tmp_path):
  # 10 -> 5 -> 3 on the way down; diffusers upsamples 3 -> 5 -> 10 by forwarding the skip sizes.
  ref, unet, params = _load(tmp_path, SD2_TINY)
  x, t, text = unet_inputs(SD2_TINY, size=10)
  expected = torch_unet_output(ref, x, t, text)
  got = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, text))
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_scalar_and_float_timesteps(tmp_path):
  ref, unet, params = _load(tmp_path, SD1_TINY)
  x, _, text = unet_inputs(SD1_TINY)
  expected = torch_unet_output(ref, x, np.array([417, 417]), text)
  apply = jax.jit(unet.apply)
  for t in (417, jnp.float32(417.0)):
    np.testing.assert_allclose(np.asarray(apply({"params": params}, x, t, text)), expected,
                               atol=TOL, rtol=0)


def test_save_round_trip_through_diffusers(tmp_path):
  """save_unet -> diffusers.from_pretrained gives the same outputs as our module (and a sharded save too)."""
  from diffusers import UNet2DConditionModel
  unet = models.UNet2DConditionModel(SD2_TINY)
  x, t, text = unet_inputs(SD2_TINY)
  params = random_params(unet)
  ours = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, text))
  for sub, shard in (("single", None), ("sharded", 64 * 1024)):
    models.save_unet(str(tmp_path / sub), unet, params, max_shard_bytes=shard)
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / sub)).eval()
    np.testing.assert_allclose(torch_unet_output(reloaded, x, t, text), ours, atol=TOL, rtol=0)
    unet2, params2 = models.load_unet(str(tmp_path / sub))
    assert unet2.config == SD2_TINY
    jax.tree.map(np.testing.assert_array_equal, params2, params)
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1


def test_fp16_variant_and_param_dtype(tmp_path):
  import torch
  ref = torch_unet(SD1_TINY)
  ref.to(torch.float16).save_pretrained(tmp_path / "unet", variant="fp16")
  unet, params = models.load_unet(str(tmp_path / "unet"), variant="fp16", param_dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  unet32, params32 = models.load_unet(str(tmp_path / "unet"), variant="fp16")
  x, t, text = unet_inputs(SD1_TINY)
  expected = torch_unet_output(ref.to(torch.float32), x, t, text)   # same fp16-rounded weights
  np.testing.assert_allclose(np.asarray(jax.jit(unet32.apply)({"params": params32}, x, t, text)), expected,
                             atol=TOL, rtol=0)


def test_bfloat16_compute_stays_close(tmp_path):
  _, unet, params = _load(tmp_path, SD1_TINY)
  x, t, text = unet_inputs(SD1_TINY)
  full = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, text))
  half = dataclasses.replace(unet, dtype=jnp.bfloat16)
  out = jax.jit(half.apply)({"params": params}, x, t, text)
  assert out.dtype == jnp.float32  # the last conv runs in float32
  # bf16 keeps 8 mantissa bits: ~0.4% per op; the relative RMS error over the net stays a few percent.
  rel = np.sqrt(np.mean((np.asarray(out) - full) ** 2) / np.mean(full ** 2))
  assert rel < 0.05, rel


def _mean_square(params, module):
  x, t, text = unet_inputs(module.config)
  return jnp.mean(module.apply({"params": params}, x, t, text) ** 2)


_value_and_grad = jax.jit(jax.value_and_grad(_mean_square), static_argnums=1)


@functools.lru_cache(maxsize=None)
def _baseline():
  unet = models.UNet2DConditionModel(SD1_TINY)
  params = random_params(unet)
  return unet, params, _value_and_grad(params, unet)


# The second policy takes as long as the first (about a minute) and checks the same code path with another
# jax.checkpoint_policies name: `make test-slow` runs it.
@pytest.mark.parametrize("policy", ["nothing_saveable",
                                    pytest.param("dots_with_no_batch_dims_saveable", marks=pytest.mark.slow),
                                    pytest.param("convs_and_dots_saveable", marks=pytest.mark.slow)])
def test_remat_same_values_and_grads(policy):
  unet, params, (l1, g1) = _baseline()
  remat = dataclasses.replace(unet, remat_policy=policy)
  l2, g2 = _value_and_grad(params, remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)
  # Remat really is applied: the forward jaxpr holds remat primitives, and only with a policy.
  jaxpr = lambda module: str(jax.make_jaxpr(_mean_square, static_argnums=1)(params, module))
  assert "remat" in jaxpr(remat) and "remat" not in jaxpr(unet)


@pytest.mark.parametrize("block", ["resnet", "transformer"])
def test_convs_and_dots_policy_keeps_only_conv_and_matmul_outputs(block, capsys):
  from jax.ad_checkpoint import print_saved_residuals
  from sc_dpo_jax.models import unet as unet_lib
  from sc_dpo_jax.models.layers import remat_policy
  opts = unet_lib.Options(jnp.float32, jnp.float32, "reference", None)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 16)).astype(np.float32))
  if block == "resnet":
    module, extra = unet_lib.ResnetBlock2D(24, 4, 1e-5, opts), jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
  else:
    module, extra = unet_lib.Transformer2DModel(2, 1, 4, False, False, opts), jnp.asarray(
        rng.normal(size=(2, 5, 12)), jnp.float32)
  params = module.init(jax.random.PRNGKey(0), x, extra)
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, extra)))  # noqa: E731
  remat = jax.checkpoint(loss, policy=remat_policy("convs_and_dots_saveable"))
  np.testing.assert_allclose(remat(params, x), loss(params, x), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.grad(remat)(params, x), jax.grad(loss)(params, x))
  print_saved_residuals(remat, params, x)
  saved = [line for line in capsys.readouterr().out.splitlines() if "output of" in line]
  assert saved and all("output of conv_general_dilated" in line or "output of dot_general" in line
                       for line in saved), saved
  print_saved_residuals(loss, params, x)   # without remat: norms and activations are kept as well
  assert len([line for line in capsys.readouterr().out.splitlines() if "output of" in line]) > 2 * len(saved)


def test_remat_unknown_policy_is_an_error():
  unet = models.UNet2DConditionModel(SD1_TINY, remat_policy="save_everything_please")
  with pytest.raises(ValueError, match="save_everything_please"):
    unet.init(jax.random.PRNGKey(0), *unet_inputs(SD1_TINY))


@pytest.mark.parametrize("impl", ["xla"])
def test_attention_implementations_agree_in_unet(impl):
  unet = models.UNet2DConditionModel(SD2_TINY)
  x, t, text = unet_inputs(SD2_TINY)
  params = random_params(unet)
  ref = jax.jit(unet.apply)({"params": params}, x, t, text)
  other = jax.jit(dataclasses.replace(unet, attention=impl).apply)({"params": params}, x, t, text)
  np.testing.assert_allclose(other, ref, atol=1e-5, rtol=0)


def test_every_parameter_has_logical_axes():
  import flax.linen as nn
  unet = models.UNet2DConditionModel(SD2_TINY)
  abstract = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *unet.dummy_inputs())
  leaves = jax.tree.leaves(abstract["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for v in leaves:
    assert len(v.names) == v.value.ndim and all(isinstance(n, str) for n in v.names)
  specs = nn.get_partition_spec(abstract["params"])
  assert specs["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"] == \
      jax.sharding.PartitionSpec("cross_embed", "heads")
  assert specs["conv_in"]["kernel"] == jax.sharding.PartitionSpec(
      "conv_height", "conv_width", "conv_in", "conv_out")


def test_nchw_input_is_refused_with_a_hint():
  unet = models.UNet2DConditionModel(SD1_TINY)
  x, t, text = unet_inputs(SD1_TINY)
  with pytest.raises(ValueError, match="NCHW"):
    unet.init(jax.random.PRNGKey(0), x.transpose(0, 3, 1, 2), t, text)
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    unet.init(jax.random.PRNGKey(0), x, t, text[..., :7])


def test_fast_host_random_params_same_distributions_and_reproducible():
  unet = models.UNet2DConditionModel(SD1_TINY)
  slow, fast = random_params(unet, seed=3), random_params(unet, seed=3, fast=True)
  assert jax.tree.structure(slow) == jax.tree.structure(fast)
  for a, b in zip(jax.tree.leaves(slow), jax.tree.leaves(fast)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
  jax.tree.map(np.testing.assert_array_equal, fast, random_params(unet, seed=3, fast=True))   # reproducible
  assert not np.array_equal(fast["conv_in"]["kernel"], random_params(unet, seed=4, fast=True)["conv_in"]["kernel"])
  kernel = np.asarray(fast["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])
  fan_in = int(np.prod(kernel.shape[:-1]))
  assert abs(kernel.std() * np.sqrt(fan_in) - 1) < 0.1 and abs(kernel.mean()) * np.sqrt(fan_in) < 0.05
  scales = np.concatenate([np.ravel(v) for k, v in jax.tree_util.tree_leaves_with_path(fast)
                           if jax.tree_util.keystr(k).endswith("['scale']")])
  assert abs(scales.mean() - 1) < 0.02 and abs(scales.std() - 0.1) < 0.02


def test_remat_none_by_name_means_no_remat():
  from sc_dpo_jax.models.layers import remat_policy
  assert remat_policy(None) is None and remat_policy("none") is None and remat_policy("None") is None
  unet = models.UNet2DConditionModel(SD1_TINY, remat_policy="none")
  params = random_params(models.UNet2DConditionModel(SD1_TINY))
  assert "remat" not in str(jax.make_jaxpr(_mean_square, static_argnums=1)(params, unet))
