"""data.precompute: latents and text states of an image-pair dataset, checked against direct encoding; resume;
bad records; the command line.

Tolerance of the round trip: the stored moments come from batches of 3 (the last one padded), the direct
encoding from one batch of 10, and XLA may order a convolution's sums differently for another batch size, which
changes float32 results in the last bits. Measured on the 2-core CPU: moments 1.6e-6 (of values up to 1.4),
text states 1.1e-6 (up to 3.0), decoded images 5.8e-6 on the [-1, 1] scale. The tolerances (1e-4; 1e-3 for
images, which pass through a second network) leave room for other CPUs' kernels and stay 5000x below the spread
of the moments between images (~0.57), so a mixed-up or mis-scaled record cannot pass.
"""
import io
import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from sc_dpo_jax import models
from sc_dpo_jax.data import pipeline, precompute as precompute_lib, records, schema
from sc_dpo_jax.data.precompute import precompute
from sc_dpo_jax.data.schema import RecordError
from sc_dpo_jax.models.vae import decode_latents, encode_to_latents
from tests.sd_reference import tiny_sd_pipeline

SIZE = 16          # the tiny pipeline's default_size
MOMENTS_TOL = 1e-4
IMAGE_TOL = 1e-3


def _png(array):
  out = io.BytesIO()
  Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
  return out.getvalue()


def _pairs(n):
  out = []
  for i in range(n):
    rng = np.random.default_rng(i)
    out.append(dict(prompt=f"prompt {i}", source_id=f"id{i}", image_chosen=_png(rng.integers(0, 255, (SIZE, SIZE, 3))),
                    image_rejected=_png(rng.integers(0, 255, (SIZE, SIZE, 3))), cost_chosen=0.1 * i,
                    cost_rejected=1.0 + i, harmful_prompt=i % 2))
  return out


SPEC = schema.pair_spec(has_costs=True, has_harmful_prompt=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sd") / "tiny-sd")
  tiny_sd_pipeline().save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def pipe(model_dir):
  return models.load_pipeline(model_dir)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """10 pairs with costs and harmful flags in 2 shards."""
  return records.write_records(str(tmp_path_factory.mktemp("pairs")), SPEC, _pairs(10), num_shards=2)


KWARGS = dict(batch_size=3, records_per_shard=4, progress=False)     # 3 shards, ending inside batches


@pytest.fixture(scope="module")
def latents(source, model_dir, tmp_path_factory):
  """The uninterrupted run over ``source``."""
  return precompute(os.path.dirname(source.files[0]), model_dir, str(tmp_path_factory.mktemp("out") / "full"),
                    **KWARGS)


def _read_all(src, **kwargs):
  kwargs.setdefault("resolution", None if src.spec.image_format == schema.LATENT else SIZE)
  it = pipeline.DataIterator(src, batch_size=src.total, shuffle=False, num_epochs=1, drop_remainder=False,
                             process_index=0, process_count=1, **kwargs)
  return next(it)


def _raw_records(src):
  import tensorflow as tf
  return [raw.numpy() for file in src.files for raw in tf.data.TFRecordDataset(file)]


def test_round_trip_matches_direct_encoding(source, latents, model_dir, pipe):
  result = latents
  out = os.path.dirname(result.files[0])
  assert list(result.num_records) == [4, 4, 2] and not os.path.exists(os.path.join(out, "progress.json"))
  spec = result.spec
  assert spec.latent_shape == (SIZE // 2, SIZE // 2, 8) and spec.text_states_shape == (16, 32)
  assert spec.latent_scaling_factor == pipe.vae.config.scaling_factor and spec.latent_shift_factor is None
  assert spec.has_costs and spec.has_harmful_prompt
  assert records.read_info(out)["format"] == records.FORMAT == "sc_dpo_jax.records/2"
  import tensorflow as tf
  stored = set(tf.train.Example.FromString(_raw_records(result)[0]).features.feature)
  assert {"moments_chosen", "moments_rejected"} <= stored and "latent_chosen" not in stored, stored
  stats = records.read_info(out)["stats"]
  assert (stats["input_records"], stats["written"], stats["bad_records_skipped"]) == (10, 10, 0)
  assert stats["resolution"] == pipe.default_size == SIZE
  assert stats["model_dir"] == os.path.abspath(model_dir)

  images = _read_all(source)
  got = _read_all(result, latents="moments")
  params = pipe.params["vae"]
  encode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode").moments)
  for which in ("chosen", "rejected"):
    x = images[f"image_{which}"].astype(np.float32) / 255.0 * 2.0 - 1.0
    direct = np.asarray(encode(params, x))
    np.testing.assert_allclose(got[f"moments_{which}"], direct, rtol=0, atol=MOMENTS_TOL)
    assert np.ptp(direct[..., :4], axis=0).mean() > 100 * MOMENTS_TOL          # the tolerance is meaningful
  mean = _read_all(result, latents="mean")
  np.testing.assert_allclose(mean["latents_chosen"], got["moments_chosen"][..., :4] * spec.latent_scaling_factor,
                             rtol=1e-6, atol=1e-7)
  # Decoding the stored latents reproduces decoding the model's own encode_to_latents (scaling convention).
  x = images["image_rejected"].astype(np.float32) / 255.0 * 2.0 - 1.0
  direct_latents = jax.jit(lambda p, x: encode_to_latents(pipe.vae, p, x))(params, x)
  decode = jax.jit(lambda p, z: decode_latents(pipe.vae, p, z))
  np.testing.assert_allclose(decode(params, mean["latents_rejected"]), decode(params, direct_latents), rtol=0,
                             atol=IMAGE_TOL)
  np.testing.assert_allclose(got["text_states"], pipe.encode_prompts(list(images["prompt"])), rtol=0,
                             atol=MOMENTS_TOL)
  for key in ("prompt", "source_id", "cost_chosen", "cost_rejected", "harmful_prompt"):
    np.testing.assert_array_equal(got[key], images[key], err_msg=key)
  assert list(got["source_id"]) == [f"id{i}" for i in range(10)]

  with pytest.raises(FileExistsError, match="overwrite"):
    precompute(os.path.dirname(source.files[0]), model_dir, out, **KWARGS)


def test_chosen_prompts_pass_through_with_their_text_states(model_dir, pipe, tmp_path):
  """A source with prompt_chosen (DUO pairs): the latent dataset keeps it and stores its text states
  (text_states_chosen), as duo_prompts = "given" reads them."""
  spec = schema.pair_spec(has_costs=True, has_harmful_prompt=True, has_chosen_prompt=True)
  recs = [dict(r, prompt_chosen=f"safe {i}") for i, r in enumerate(_pairs(4))]
  src = records.write_records(str(tmp_path / "pairs"), spec, recs)
  result = precompute(os.path.dirname(src.files[0]), model_dir, str(tmp_path / "out"), **KWARGS)
  assert result.spec.has_chosen_prompt and "text_states_chosen" in result.spec.array_fields
  got = _read_all(result, latents="moments")
  assert list(got["prompt_chosen"]) == [f"safe {i}" for i in range(4)]
  assert list(got["prompt"]) == [f"prompt {i}" for i in range(4)]
  np.testing.assert_allclose(got["text_states_chosen"], pipe.encode_prompts([f"safe {i}" for i in range(4)]),
                             rtol=0, atol=MOMENTS_TOL)
  np.testing.assert_allclose(got["text_states"], pipe.encode_prompts([f"prompt {i}" for i in range(4)]), rtol=0,
                             atol=MOMENTS_TOL)
  no_text = precompute(os.path.dirname(src.files[0]), model_dir, str(tmp_path / "no_text"), text_states=False,
                       **KWARGS)
  assert no_text.spec.has_chosen_prompt and set(no_text.spec.array_fields) == {"moments_chosen", "moments_rejected"}
  assert list(_read_all(no_text, latents="moments")["prompt_chosen"]) == [f"safe {i}" for i in range(4)]


def test_resume_gives_the_uninterrupted_records(source, latents, model_dir, tmp_path):
  src, full, kwargs = os.path.dirname(source.files[0]), latents, KWARGS
  out = str(tmp_path / "resumed")
  progress_path = os.path.join(out, precompute_lib.PROGRESS_FILE)
  assert precompute(src, model_dir, out, max_shards=1, **kwargs) is None
  with open(progress_path) as f:
    saved = json.load(f)
  assert saved["shards"] == [4] and saved["resume"]["skip"] == 1     # record 4 is the 2nd of batch [3, 4, 5]
  assert not os.path.exists(os.path.join(out, records.INFO_FILE))
  with pytest.raises(ValueError, match=r"batch_size=3, this call has batch_size=2"):
    precompute(src, model_dir, out, **dict(kwargs, batch_size=2))
  with pytest.raises(ValueError, match=r"text_states=True, this call has text_states=False"):
    precompute(src, model_dir, out, text_states=False, **kwargs)
  assert precompute(src, model_dir, out, max_shards=1, **kwargs) is None
  resumed = precompute(src, model_dir, out, **kwargs)
  assert list(resumed.num_records) == list(full.num_records) == [4, 4, 2]
  assert _raw_records(resumed) == _raw_records(full)
  assert not os.path.exists(progress_path)

  # overwrite clears the finished dataset (and only it) and starts again.
  open(os.path.join(out, "notes.txt"), "w").close()
  assert precompute(src, model_dir, out, max_shards=2, overwrite=True, **kwargs) is None
  assert sorted(os.listdir(out)) == ["latents-00000-of-00003.tfrecord", "latents-00001-of-00003.tfrecord",
                                     "notes.txt", "progress.json"]


def test_bad_records_are_skipped_and_counted_or_named(model_dir, pipe, tmp_path, capsys):
  recs = _pairs(10)
  recs[3]["image_rejected"] = b"garbage"
  bad = records.write_records(str(tmp_path / "bad"), SPEC, recs, num_shards=1)
  with pytest.raises(RecordError) as info:
    precompute(str(tmp_path / "bad"), model_dir, str(tmp_path / "strict"), batch_size=4, records_per_shard=4,
               progress=False)
  assert f"{bad.files[0]}: record 3:" in str(info.value) and "'image_rejected'" in str(info.value)

  # The command line, skipping: 9 good records in shards of 3 (the 4th empty), no text states; stopped after 3
  # shards at the end of the input, then resumed there.
  fv = flags.FlagValues()
  precompute_lib.define_flags(fv)
  out = str(tmp_path / "skipped")
  fv(["precompute", f"--source={tmp_path / 'bad'}", f"--model={model_dir}", f"--out={out}", "--batch_size=4",
      "--records_per_shard=3", "--skip_bad_records", "--notext_states", "--max_shards=3"])
  precompute_lib.main(["precompute"], fv)
  assert "stopped after 3 shards (--max_shards=3)" in capsys.readouterr().out
  fv.max_shards = None
  precompute_lib.main(["precompute"], fv)
  printed = capsys.readouterr().out
  assert f"wrote 9 records in 4 shards to {out}" in printed and '"bad_records_skipped": 1' in printed
  result = records.open_source(out)
  assert list(result.num_records) == [3, 3, 3, 0] and result.spec.text_states_shape is None
  got = _read_all(result, latents="mean")
  assert list(got["source_id"]) == [f"id{i}" for i in range(10) if i != 3]
  assert "text_states" not in got

  with pytest.raises(ValueError, match="latent pair dataset; precompute reads pair datasets of encoded images"):
    precompute(out, model_dir, str(tmp_path / "again"), progress=False)
