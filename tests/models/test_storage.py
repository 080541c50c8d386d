"""Model folders through etils.epath: export to ``gs://`` and load back, served by the local GCS stand-in
(``tests.gcs_standin``: the real epath and fsspec code paths, with a local folder behind ``gs://``); local relative
paths keep working.

"""
import os

import jax
import numpy as np
from etils import epath

from sc_dpo_jax import models
from sc_dpo_jax.models import storage, tiny
from tests.gcs_standin import gcs_root  # noqa: F401  pylint: disable=unused-import

PROMPTS = ["a red cat", "blue square, small"]


def _assert_same_pipeline(a, b):
  for name in ("unet", "text_encoder", "vae"):
    jax.tree.map(np.testing.assert_array_equal, a.params[name], b.params[name])
  assert a.unet.config == b.unet.config and a.vae.config == b.vae.config
  assert a.text_encoder.config == b.text_encoder.config
  np.testing.assert_array_equal(a.schedule.betas, b.schedule.betas)
  assert a.scheduler_class == b.scheduler_class
  np.testing.assert_array_equal(a.tokenizer(PROMPTS), b.tokenizer(PROMPTS))


def test_pipeline_saved_to_gs_loads_back_and_in_diffusers(gcs_root, tmp_path):  # pylint: disable=redefined-outer-name
  from diffusers import StableDiffusionPipeline
  pipe = tiny.tiny_pipeline(seed=1)
  models.save_pipeline("gs://bucket/run/export", pipe)
  remote = gcs_root / "bucket" / "run" / "export"
  assert sorted(os.listdir(remote)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
  assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")   # nothing written as a local "gs:" folder
  assert storage.is_file("gs://bucket/run/export/unet/diffusion_pytorch_model.safetensors")
  # The same bytes as a local export (which test_pipeline runs in diffusers image for image).
  local = tmp_path / "local"
  models.save_pipeline(str(local), pipe)
  files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
  assert files == sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
  for name in files:
    assert (local / name).read_bytes() == (remote / name).read_bytes(), name

  again = models.load_pipeline("gs://bucket/run/export")
  _assert_same_pipeline(again, pipe)
  again = models.load_pipeline(epath.Path("gs://bucket/run/export"))   # an epath.Path works as well as a string
  _assert_same_pipeline(again, pipe)

  theirs = StableDiffusionPipeline.from_pretrained(str(remote))
  np.testing.assert_array_equal(theirs.unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0),
                                pipe.params["unet"]["conv_in"]["kernel"])
  ids = theirs.tokenizer(PROMPTS, padding="max_length", max_length=theirs.tokenizer.model_max_length,
                         truncation=True, return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(ids, pipe.tokenizer(PROMPTS))


def test_sharded_weights_on_gs_replace_the_old_file(gcs_root):  # pylint: disable=redefined-outer-name
  pipe = tiny.tiny_pipeline(seed=2)
  folder = "gs://bucket/unet"
  models.save_unet(folder, pipe.unet, pipe.params["unet"])
  models.save_unet(folder, pipe.unet, pipe.params["unet"], max_shard_bytes=20_000)
  names = sorted(os.listdir(gcs_root / "bucket" / "unet"))
  assert "diffusion_pytorch_model.safetensors" not in names          # the single file gave way to the shards
  assert "diffusion_pytorch_model.safetensors.index.json" in names and len(names) > 3
  unet, params = models.load_unet(folder)
  assert unet.config == pipe.unet.config
  jax.tree.map(np.testing.assert_array_equal, params, pipe.params["unet"])


def test_clip_folder_on_gs_round_trips(gcs_root):  # pylint: disable=redefined-outer-name
  del gcs_root
  pipe = tiny.tiny_pipeline(seed=3)
  models.save_clip_text("gs://bucket/text", pipe.text_encoder, pipe.params["text_encoder"])
  text, params = models.load_clip_text("gs://bucket/text")
  assert text.config == pipe.text_encoder.config
  jax.tree.map(np.testing.assert_array_equal, params, pipe.params["text_encoder"])


def test_relative_local_paths_keep_working(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  pipe = tiny.tiny_pipeline(seed=4)
  models.save_pipeline(os.path.join("out", "sd"), pipe)
  assert (tmp_path / "out" / "sd" / "unet" / "config.json").is_file()
  _assert_same_pipeline(models.load_pipeline(os.path.join("out", "sd")), pipe)
