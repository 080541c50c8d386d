"""A tiny SD2-style UNet through the whole interop path: diffusers folder in, training steps, folder out.

A job of its own (``make demo`` runs the toy world). Run it with:

  python -m sc_dpo_jax.main --config=configs/unet_interop.py --workdir=workdir/unet_interop

Override any key on the command line, e.g. ``--config.train.steps=200 --config.attention=xla``.
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.job = "unet_interop"
  c.seed = 0

  # UNetConfig fields (sc_dpo_jax.models.unet_config); SD2-style: linear projections, per-block head
  # dims, upcast attention, v-prediction.
  c.unet = ml_collections.ConfigDict(dict(
      sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=(1, 1, 1),
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4), norm_num_groups=8,
      cross_attention_dim=48, use_linear_projection=True, upcast_attention=True))
  c.attention = "reference"   # models.ATTENTION_IMPLEMENTATIONS: reference | xla | cudnn | auto
  c.dtype = "float32"         # compute dtype; parameters stay float32

  # A diffusers scheduler config (written next to the UNet as scheduler/scheduler_config.json).
  c.schedule = ml_collections.ConfigDict(dict(
      num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
      prediction_type="v_prediction"))

  c.data = ml_collections.ConfigDict(dict(num_examples=64, text_length=8))
  c.train = ml_collections.ConfigDict(dict(steps=120, batch_size=8, learning_rate=1e-3))
  c.eval_batch_size = 16
  # Reload the export with diffusers' PyTorch UNet and compare outputs: "auto" (when torch and diffusers
  # are importable), "yes" (fail if they are not) or "no".
  c.check_with_diffusers = "auto"
  return c
